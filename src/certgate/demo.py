"""``certgate demo``: the whole system end to end on loopback, with rich output of each step.

1. a console on a fresh data directory (embedded SQLite) creates the instance PKI;
2. admins get an API key and a client certificate each;
3. a tunnel node is set up with ``certgate tunnel setup`` (API key AND admin certificate)
   and started with ``certgate tunnel run``;
4. a device enrolls, receives its Per-App Tunnel profile and, on its app's first
   authentication, a Proxy-mode app certificate (chains checked with real ``openssl``);
5. the device fetches an intranet page through the tunnel in both modes (real ``curl``);
6. an admin marks the device non-compliant: the live tunnel is closed and the next request
   refused, and the time from the change to enforcement is measured;
7. the audit chain is verified. Everything started is stopped; ``--keep`` leaves it running.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12
from rich.console import Console
from rich.table import Table

from certgate.console import local
from certgate.console.services import admins, ca
from certgate.errors import CertgateError
from certgate.pki.csr import build_csr
from certgate.pki.keys import KeyAlgorithm, generate_key, private_key_pem
from certgate.pki.thumbprint import thumbprint

out = Console()
GROUP = "demo"
APP = "com.example.browser"
INTRANET_PAGE = b"<h1>Welcome to the intranet</h1>\n"
P12_PASSWORD = "demo-p12-password"
CERTGATE = [sys.executable, "-m", "certgate"]


class DemoError(CertgateError):
    """A demo step did not show what it should."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Demo:
    work: Path
    ports: dict[str, int] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    origin: http.server.ThreadingHTTPServer | None = None

    def __post_init__(self) -> None:
        for name in ("console", "proxy", "per_app", "admin"):
            self.ports[name] = free_port()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.ports['console']}"

    def path(self, name: str) -> Path:
        return self.work / name

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.path(name)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        path.chmod(0o600)
        return path

    def client(self, api_key: str | None = None, cert: str | None = None) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.path("chain.pem")))
        if cert:
            ctx.load_cert_chain(self.path(f"{cert}.pem"), self.path(f"{cert}.key"))
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, verify=ctx, headers=headers, timeout=60)

    def admin(self) -> httpx.Client:
        return self.client(self.keys["ops"], "ops")

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with self.path(f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [*CERTGATE, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=40)
        if self.origin is not None:
            self.origin.shutdown()
            self.origin.server_close()


def listing(*columns: str) -> Table:
    """Thumbprints are shown whole (wrapped, never cut), so they can be compared."""
    table = Table()
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def step(title: str) -> None:
    out.rule(f"[bold cyan]{title}")


def expect(response: httpx.Response, status: int, what: str) -> Any:
    if response.status_code != status:
        raise DemoError(f"{what}: HTTP {response.status_code} {response.text[:300]}")
    return response.json() if response.content else None


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"{what} exited with {proc.returncode}; see its log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise DemoError(f"{what} did not listen on port {port} within 30 s")


def start_console(demo: Demo) -> None:
    step("1. Console: instance PKI and HTTPS API")
    data_dir, port = demo.path("console"), demo.ports["console"]
    _, pki = local.init(data_dir, KeyAlgorithm.EC_P256, demo.url, "127.0.0.1", port, None)
    table = listing("CA", "CertThumbprint (SHA-256 of DER)")
    for label, cert in pki.certs.items():
        table.add_row(label, thumbprint(cert))
    out.print(table)
    demo.write("chain.pem", "".join(ca.pem(pki.certs[c]) for c in (ca.ROOT, *ca.INTERMEDIATES)))
    demo.write("root.pem", ca.pem(pki.certs[ca.ROOT]))
    proc = demo.spawn("console", "console", "serve", "-d", str(data_dir))
    wait_for_port(port, proc, "console")
    out.print(f"console listening on {demo.url}")


def make_admins(demo: Demo) -> None:
    step("2. Admins: an API key and a client certificate each")
    db, pki = local.open_db(local.load_config(demo.path("console")))
    try:
        for name, role in (("ops", "superadmin"), ("tunnel-admin", "tunnel-setup")):
            with db.transaction() as session:
                admin = admins.create_admin(session, name, role, "global")
                key = admins.issue_api_key(session, admin)
                cert, private = admins.issue_admin_cert(session, pki, admin)
            demo.write(f"{name}.pem", ca.pem(cert))
            demo.write(f"{name}.key", private_key_pem(private))
            demo.write(
                f"{name}.p12",
                pkcs12.serialize_key_and_certificates(
                    name.encode(),
                    private,
                    cert,
                    None,
                    BestAvailableEncryption(P12_PASSWORD.encode()),
                ),
            )
            demo.keys[name] = key.token
            out.print(
                f"admin [bold]{name}[/] ({role}): cert {thumbprint(cert)[:16]}…, "
                f"API key id {key.id}"
            )
    finally:
        db.dispose()


def create_group(demo: Demo) -> None:
    settings = {
        "initial_compliance": "compliant",
        "feed": {"long_poll_s": 10, "max_staleness_s": 60},
        "server_rules": {
            "default": "deny",
            "rules": [{"action": "allow", "cidrs": ["127.0.0.0/8"]}],
        },
        "device_rules": {
            "default": "block",
            "rules": [{"apps": [APP], "domains": ["*"], "action": "tunnel"}],
        },
    }
    with demo.admin() as ops:
        expect(
            ops.post(
                "/api/v1/groups", json={"id": GROUP, "parent_id": "global", "settings": settings}
            ),
            201,
            "create group",
        )
    out.print(f"group [bold]{GROUP}[/]: its own console identity and tunnel identity issued")


def setup_tunnel(demo: Demo) -> None:
    step("3. Tunnel: setup with API key AND admin certificate, then run")
    create_group(demo)
    with demo.client(demo.keys["tunnel-admin"]) as no_cert:
        denied = no_cert.post(f"/api/v1/groups/{GROUP}/tunnel/setup", json={"node_name": "x"})
    out.print(f"API key alone → HTTP {denied.status_code}: {denied.json()['detail']}")
    for node in ("tunnel-1", "tunnel-2"):
        result = subprocess.run(
            [
                *CERTGATE,
                "tunnel",
                "setup",
                "--console",
                demo.url,
                "--group",
                GROUP,
                "--api-key",
                demo.keys["tunnel-admin"],
                "--admin-cert",
                str(demo.path("tunnel-admin.p12")),
                "--p12-password",
                P12_PASSWORD,
                "--ca-file",
                str(demo.path("root.pem")),
                "--state-dir",
                str(demo.path(node)),
                "--node-name",
                node,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise DemoError(f"tunnel setup {node}: {result.stderr or result.stdout}")
    certs = [demo.path(f"{n}/tunnel.pem").read_bytes() for n in ("tunnel-1", "tunnel-2")]
    if certs[0] != certs[1]:
        raise DemoError("HA nodes did not receive the same tunnel certificate")
    out.print("tunnel-1 and tunnel-2 hold the same group tunnel certificate (HA) ✔")
    proc = demo.spawn(
        "tunnel-1",
        "tunnel",
        "run",
        "--state-dir",
        str(demo.path("tunnel-1")),
        "--proxy-listen",
        f"127.0.0.1:{demo.ports['proxy']}",
        "--per-app-listen",
        f"127.0.0.1:{demo.ports['per_app']}",
        "--admin-listen",
        f"127.0.0.1:{demo.ports['admin']}",
    )
    wait_for_port(demo.ports["proxy"], proc, "tunnel")
    out.print(
        f"tunnel-1 running: Proxy mode on {demo.ports['proxy']}, Per-App Tunnel on "
        f"{demo.ports['per_app']}, /healthz and /metrics on {demo.ports['admin']}"
    )


class _Intranet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(INTRANET_PAGE)))
        self.end_headers()
        self.wfile.write(INTRANET_PAGE)

    def log_message(self, *args: Any) -> None:
        pass


def start_intranet(demo: Demo) -> None:
    demo.origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Intranet)
    demo.ports["intranet"] = demo.origin.server_address[1]
    threading.Thread(target=demo.origin.serve_forever, daemon=True).start()


def enroll_device(demo: Demo) -> dict[str, Any]:
    step("4. Device: enrollment, Per-App Tunnel profile, Proxy-mode app certificate")
    with demo.admin() as ops:
        expect(
            ops.post(
                f"/api/v1/groups/{GROUP}/enrollment-users",
                json={"username": "alice", "password": "alice-password"},
            ),
            201,
            "enrollment user",
        )
    with demo.client() as anon:
        device: dict[str, Any] = expect(
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
    out.print(f"DeviceUid [bold]{device['device_uid']}[/] (keys stay on the device; CSRs only)")
    with demo.client(device["credential"]) as dev:
        device_key, app_key = generate_key(), generate_key()
        device["profile"] = expect(
            dev.post(
                "/api/v1/device/profile", json={"csr": build_csr(device_key, "device").decode()}
            ),
            201,
            "profile delivery",
        )
        device["app"] = expect(
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
    demo.write("device.pem", device["profile"]["certificate"])
    demo.write("device.key", private_key_pem(device_key))
    demo.write("app.pem", device["app"]["certificate"])
    demo.write("app.key", private_key_pem(app_key))
    demo.write("device-root.pem", device["profile"]["chain"][0])
    table = listing("certificate", "issued when", "CertThumbprint")
    table.add_row(
        "per-device (Per-App Tunnel)",
        f"profile v{device['profile']['version']} delivered",
        device["profile"]["thumbprint"],
    )
    table.add_row(f"app+device ({APP})", "app's first authentication", device["app"]["thumbprint"])
    out.print(table)
    for name in ("device.pem", "app.pem"):
        openssl_verify(demo, name)
    return device


def openssl_verify(demo: Demo, name: str) -> None:
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(demo.path("root.pem")),
            "-untrusted",
            str(demo.path("device-root.pem")),
            "-purpose",
            "sslclient",
            str(demo.path(name)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise DemoError(f"openssl verify {name}: {result.stdout} {result.stderr}")
    out.print(f"openssl verify -purpose sslclient {name}: [green]OK[/] (X.509 v3, Device Root)")


def curl_proxy_mode(demo: Demo, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            *extra,
            "--proxy",
            f"https://localhost:{demo.ports['proxy']}",
            "--proxy-cacert",
            str(demo.path("chain.pem")),
            "--proxy-cert",
            str(demo.path("app.pem")),
            "--proxy-key",
            str(demo.path("app.key")),
            f"http://127.0.0.1:{demo.ports['intranet']}/",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def per_app_tunnel(demo: Demo) -> ssl.SSLSocket:
    """Open a Per-App Tunnel the way the device agent does: mTLS with the device cert,
    CONNECT naming the app."""
    ctx = ssl.create_default_context(cafile=str(demo.path("chain.pem")))
    ctx.load_cert_chain(demo.path("device.pem"), demo.path("device.key"))
    raw = socket.create_connection(("127.0.0.1", demo.ports["per_app"]), timeout=20)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    target = f"127.0.0.1:{demo.ports['intranet']}"
    tls.sendall(
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nCertgate-App: {APP}\r\n\r\n".encode()
    )
    head = tls.recv(4096)
    if not head.startswith(b"HTTP/1.1 200"):
        tls.close()
        raise DemoError(f"Per-App Tunnel refused: {head[:200]!r}")
    return tls


def wait_until_admitted(demo: Demo) -> None:
    """The tunnel learns the new device from the console's feed; wait (bounded) for it."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if curl_proxy_mode(demo).stdout.encode() == INTRANET_PAGE:
            return
        time.sleep(0.2)
    raise DemoError("the tunnel never admitted the enrolled device (see tunnel-1.log)")


def fetch_both_modes(demo: Demo) -> None:
    step("5. Traffic: the intranet page through the tunnel, in both modes")
    wait_until_admitted(demo)
    result = curl_proxy_mode(demo)
    out.print(f"Proxy mode, real curl with the app certificate → {result.stdout.strip()}")
    tls = per_app_tunnel(demo)
    with tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: intranet\r\nConnection: close\r\n\r\n")
        body = b""
        while chunk := tls.recv(65536):
            body += chunk
    if not body.endswith(INTRANET_PAGE):
        raise DemoError(f"Per-App Tunnel fetch failed: {body[:200]!r}")
    out.print(f"Per-App Tunnel, device certificate, app {APP} → {INTRANET_PAGE.decode().strip()}")


def enforce(demo: Demo, device: dict[str, Any]) -> float:
    step("6. Compliance: an admin marks the device non-compliant")
    tls = per_app_tunnel(demo)
    tls.settimeout(20)
    with demo.admin() as ops:
        changed_at = time.monotonic()
        expect(
            ops.put(
                f"/api/v1/devices/{device['device_uid']}/compliance",
                json={"status": "noncompliant"},
            ),
            200,
            "compliance change",
        )
    try:
        leftover = tls.recv(4096)
    except (ssl.SSLError, ConnectionError):
        leftover = b""
    except TimeoutError as exc:
        raise DemoError("the live tunnel stayed open after the compliance change") from exc
    elapsed_ms = (time.monotonic() - changed_at) * 1000
    tls.close()
    if leftover:
        raise DemoError(f"unexpected data on the live tunnel: {leftover[:100]!r}")
    out.print(f"live Per-App Tunnel closed [bold]{elapsed_ms:.0f} ms[/] after the change")
    refused = curl_proxy_mode(demo, "-w", " (HTTP %{http_code})")
    out.print(f"next Proxy-mode request → {' '.join(refused.stdout.split())}")
    if "403" not in refused.stdout:
        raise DemoError(f"the next request was not refused: {refused.stdout}")
    return elapsed_ms


def audit_verify(demo: Demo) -> None:
    step("7. Audit chain")
    result = subprocess.run(
        [*CERTGATE, "console", "audit", "verify", "-d", str(demo.path("console"))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise DemoError(f"audit verify failed: {result.stderr}")
    out.print(result.stdout.strip())


def run(keep: bool = False, work_dir: Path | None = None) -> int:
    work = work_dir or Path(tempfile.mkdtemp(prefix="certgate-demo-"))
    demo = Demo(work)
    try:
        start_console(demo)
        make_admins(demo)
        setup_tunnel(demo)
        start_intranet(demo)
        device = enroll_device(demo)
        fetch_both_modes(demo)
        enforce(demo, device)
        audit_verify(demo)
    except (CertgateError, httpx.HTTPError, OSError, subprocess.SubprocessError) as exc:
        out.print(f"[bold red]demo failed:[/] {exc}  (logs in {work})")
        demo.stop()
        return 1
    if keep:
        print_kept(demo)
        return 0
    demo.stop()
    if work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    out.print("[bold green]demo passed[/]: everything it started is stopped")
    return 0


def print_kept(demo: Demo) -> None:
    w = demo.work
    out.print(
        f"[bold]still running[/] (files in {w}); stop with: kill "
        + " ".join(str(p.pid) for p in demo.procs)
    )
    out.print(
        f"  console API: curl --cacert {w}/chain.pem --cert {w}/ops.pem --key {w}/ops.key "
        f"-H 'Authorization: Bearer {demo.keys['ops']}' {demo.url}/api/v1/groups"
    )
    out.print(
        f"  Proxy mode:  curl --proxy https://localhost:{demo.ports['proxy']} "
        f"--proxy-cacert {w}/chain.pem --proxy-cert {w}/app.pem --proxy-key {w}/app.key "
        f"http://127.0.0.1:<port>/  (the demo's intranet stops with this process)"
    )
    out.print(f"  tunnel health: curl http://127.0.0.1:{demo.ports['admin']}/healthz")
