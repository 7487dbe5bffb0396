"""``certgate demo``: the system end to end on loopback, with rich output of each step.

Starts a console on a fresh data directory (embedded SQLite), sets a tunnel up through the
API with an API key + admin certificate, enrolls a device, delivers its Per-App Tunnel
profile and a Proxy-mode app certificate, verifies the chains with the real ``openssl``,
then marks the device non-compliant and measures how fast the signed feed carries it.
Everything it started is stopped at the end; ``--keep`` leaves the console running.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from rich.console import Console
from rich.table import Table

from certgate import jws
from certgate.console import local
from certgate.console.services import admins, ca
from certgate.errors import CertgateError
from certgate.pki.csr import build_csr
from certgate.pki.keys import KeyAlgorithm, generate_key, private_key_pem
from certgate.pki.thumbprint import thumbprint

out = Console()
GROUP = "demo"
APP = "com.example.browser"


class DemoError(CertgateError):
    """A demo step did not show what it should."""


@dataclass
class Demo:
    work: Path
    port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def step(self, title: str) -> None:
        out.rule(f"[bold cyan]{title}")

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.work / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        path.chmod(0o600)
        self.files[name] = path
        return path

    def client(self, api_key: str | None = None, cert: str | None = None) -> httpx.Client:
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.files["chain.pem"]))
        if cert:
            ctx.load_cert_chain(self.files[f"{cert}.pem"], self.files[f"{cert}.key"])
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, verify=ctx, headers=headers, timeout=60)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=20)


def expect(response: httpx.Response, status: int, what: str) -> Any:
    if response.status_code != status:
        raise DemoError(f"{what}: HTTP {response.status_code} {response.text[:300]}")
    return response.json() if response.content else None


def start_console(demo: Demo) -> None:
    demo.step("1. Console: instance PKI and HTTPS API")
    data_dir = demo.work / "console"
    _, pki = local.init(data_dir, KeyAlgorithm.EC_P256, demo.url, "127.0.0.1", demo.port, None)
    table = Table("CA", "CertThumbprint (SHA-256 of DER)")
    for label, cert in pki.certs.items():
        table.add_row(label, thumbprint(cert))
    out.print(table)
    demo.write("chain.pem", "".join(ca.pem(pki.certs[c]) for c in (ca.ROOT, *ca.INTERMEDIATES)))
    log = (demo.work / "console.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "certgate", "console", "serve", "-d", str(data_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    demo.procs.append(proc)
    _wait_healthy(demo, proc)
    out.print(f"console up at {demo.url} (log: {demo.work / 'console.log'})")


def _wait_healthy(demo: Demo, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"console exited with {proc.returncode}; see console.log")
        try:
            with demo.client() as client:
                if client.get("/healthz").status_code == 200:
                    return
        except httpx.TransportError:
            time.sleep(0.1)
    raise DemoError("console did not become healthy within 30 s")


def make_admins(demo: Demo) -> dict[str, str]:
    demo.step("2. Admins: API key + client certificate each")
    data_dir = demo.work / "console"
    db, pki = local.open_db(local.load_config(data_dir))
    keys = {}
    try:
        for name, role in (("ops", "superadmin"), ("tunnel-admin", "tunnel-setup")):
            with db.transaction() as session:
                admin = admins.create_admin(session, name, role, "global")
                key = admins.issue_api_key(session, admin)
                cert, private = admins.issue_admin_cert(session, pki, admin)
            demo.write(f"{name}.pem", ca.pem(cert))
            demo.write(f"{name}.key", private_key_pem(private))
            keys[name] = key.token
            out.print(
                f"admin [bold]{name}[/] role={role} cert={thumbprint(cert)[:16]}… "
                f"API key id={key.id}"
            )
    finally:
        db.dispose()
    return keys


def setup_tunnel(demo: Demo, keys: dict[str, str]) -> dict[str, Any]:
    demo.step("3. Group and tunnel setup (API key AND admin certificate)")
    with demo.client(keys["ops"], "ops") as ops:
        expect(
            ops.post(
                "/api/v1/groups",
                json={
                    "id": GROUP,
                    "parent_id": "global",
                    "settings": {"initial_compliance": "compliant"},
                },
            ),
            201,
            "create group",
        )
    with demo.client(keys["tunnel-admin"]) as no_cert:
        denied = no_cert.post(f"/api/v1/groups/{GROUP}/tunnel/setup", json={"node_name": "t1"})
        out.print(
            f"API key without certificate → HTTP {denied.status_code}: {denied.json()['detail']}"
        )
    bundles = []
    with demo.client(keys["tunnel-admin"], "tunnel-admin") as admin:
        for node in ("tunnel-1", "tunnel-2"):
            bundles.append(
                expect(
                    admin.post(f"/api/v1/groups/{GROUP}/tunnel/setup", json={"node_name": node}),
                    200,
                    "tunnel setup",
                )
            )
    if bundles[0]["tunnel_identity"] != bundles[1]["tunnel_identity"]:
        raise DemoError("HA nodes did not receive the same tunnel certificate")
    bundle = bundles[0]
    console_cert = x509.load_pem_x509_certificate(bundle["console_identity"].encode())
    trust = jws.verify(bundle["trust"], console_cert, jws.TYP_TRUST, GROUP)
    demo.write("console-identity.pem", bundle["console_identity"])
    demo.write("tunnel.pem", bundle["tunnel_identity"])
    demo.write("tunnel.key", bundle["tunnel_key"])
    out.print(f"tunnel identity (same on both nodes): {trust['tunnel_identity_thumbprint']}")
    out.print(f"trust config signed by console identity {thumbprint(console_cert)[:16]}… ✔")
    setup: dict[str, Any] = bundle
    return setup


def enroll_device(demo: Demo, keys: dict[str, str]) -> dict[str, Any]:
    demo.step("4. Device: enrollment, Per-App Tunnel profile, Proxy-mode app certificate")
    with demo.client(keys["ops"], "ops") as ops:
        expect(
            ops.post(
                f"/api/v1/groups/{GROUP}/enrollment-users",
                json={"username": "alice", "password": "alice-password"},
            ),
            201,
            "enrollment user",
        )
    with demo.client() as anon:
        device = expect(
            anon.post(
                "/api/v1/enroll",
                json={
                    "username": "alice",
                    "password": "alice-password",
                    "platform": "android",
                    "name": "alice-pixel",
                },
            ),
            201,
            "enroll",
        )
    out.print(f"DeviceUid {device['device_uid']} (compliance: {device['compliance_status']})")
    with demo.client(device["credential"]) as dev:
        device_key = generate_key()
        profile = expect(
            dev.post(
                "/api/v1/device/profile", json={"csr": build_csr(device_key, "device").decode()}
            ),
            201,
            "profile delivery",
        )
        app_key = generate_key()
        app = expect(
            dev.post(
                f"/api/v1/device/apps/{APP}/certificate",
                json={
                    "username": "alice",
                    "password": "alice-password",
                    "csr": build_csr(app_key, APP).decode(),
                },
            ),
            201,
            "app certificate",
        )
    demo.write("device.pem", profile["certificate"] + "".join(profile["chain"][:1]))
    demo.write("device.key", private_key_pem(device_key))
    demo.write("app.pem", app["certificate"] + "".join(app["chain"][:1]))
    demo.write("app.key", private_key_pem(app_key))
    table = Table("certificate", "issued when", "CertThumbprint")
    table.add_row(
        "per-device (Per-App Tunnel)",
        f"profile v{profile['version']} delivered",
        profile["thumbprint"],
    )
    table.add_row(f"app+device ({APP})", "first app authentication", app["thumbprint"])
    out.print(table)
    _openssl_verify(demo, ("device.pem", "app.pem"))
    result: dict[str, Any] = {**device, "profile": profile, "app": app}
    return result


def _openssl_verify(demo: Demo, names: tuple[str, ...]) -> None:
    root = demo.work / "root-only.pem"
    root.write_text(
        demo.files["chain.pem"].read_text().split("-----END CERTIFICATE-----")[0]
        + "-----END CERTIFICATE-----\n"
    )
    for name in names:
        result = subprocess.run(
            [
                "openssl",
                "verify",
                "-CAfile",
                str(root),
                "-untrusted",
                str(demo.files[name]),
                "-purpose",
                "sslclient",
                str(demo.files[name]),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise DemoError(f"openssl verify {name}: {result.stdout} {result.stderr}")
        out.print(f"openssl verify -purpose sslclient {name}: [green]OK[/] (X.509 v3, Device Root)")


def enforce(demo: Demo, keys: dict[str, str], device: dict[str, Any]) -> float:
    demo.step("5. Sync: a compliance change reaches the tunnel's signed feed")
    console_cert = x509.load_pem_x509_certificate(demo.files["console-identity.pem"].read_bytes())
    with demo.client(cert="tunnel") as tunnel:
        snapshot = jws.verify(
            tunnel.get("/api/v1/tunnel/feed/snapshot").text, console_cert, jws.TYP_SNAPSHOT, GROUP
        )
        out.print(f"snapshot seq {snapshot['seq']}: {len(snapshot['entries'])} certificates known")
        got: dict[str, Any] = {}

        def poll() -> None:
            response = tunnel.get(
                "/api/v1/tunnel/feed", params={"after": snapshot["seq"], "wait": 20}
            )
            got["at"], got["response"] = time.monotonic(), response

        waiter = threading.Thread(target=poll)
        waiter.start()
        time.sleep(0.3)  # let the long-poll settle on the console before the change
        with demo.client(keys["ops"], "ops") as ops:
            changed_at = time.monotonic()
            expect(
                ops.put(
                    f"/api/v1/devices/{device['device_uid']}/compliance",
                    json={"status": "noncompliant"},
                ),
                200,
                "compliance change",
            )
        waiter.join(timeout=30)
    response = got.get("response")
    if response is None or response.status_code != 200:
        raise DemoError("the feed did not deliver the change")
    batch = jws.verify(response.text, console_cert, jws.TYP_BATCH, GROUP)
    elapsed_ms = float(got["at"] - changed_at) * 1000
    for entry in batch["entries"]:
        out.print(
            f"seq {batch['to_seq']}: {entry['thumbprint'][:16]}… app="
            f"{entry['app_bundle_id'] or '-'} complianceStatus={entry['compliance_status']}"
        )
    out.print(f"change → signed feed batch at the tunnel: [bold]{elapsed_ms:.1f} ms[/]")
    return elapsed_ms


def run(keep: bool = False, work_dir: Path | None = None) -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    work = work_dir or Path(tempfile.mkdtemp(prefix="certgate-demo-"))
    demo = Demo(work, port)
    try:
        start_console(demo)
        keys = make_admins(demo)
        setup_tunnel(demo, keys)
        device = enroll_device(demo, keys)
        enforce(demo, keys, device)
        demo.step("6. Audit chain")
        _audit_verify(demo)
    except (CertgateError, httpx.HTTPError, OSError) as exc:
        out.print(f"[bold red]demo failed:[/] {exc}")
        demo.stop()
        return 1
    if keep:
        out.print(f"[bold]kept running[/]: console {demo.url}, files in {work}")
        out.print(
            f"  curl --cacert {work}/chain.pem --cert {work}/ops.pem --key {work}/ops.key "
            f"-H 'Authorization: Bearer {keys['ops']}' {demo.url}/api/v1/groups"
        )
        return 0
    demo.stop()
    if work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    out.print("[bold green]demo passed[/]: everything it started is stopped")
    return 0


def _audit_verify(demo: Demo) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "certgate",
            "console",
            "audit",
            "verify",
            "-d",
            str(demo.work / "console"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise DemoError(f"audit verify failed: {result.stderr}")
    out.print(result.stdout.strip())
