"""``certgate demo``: the whole system end to end on loopback, with rich output of each step.

1. a console on a fresh data directory (embedded SQLite) creates the instance PKI;
2. admins get an API key and a client certificate each (the key files under a per-run
   passphrase: an encrypted PEM for curl, a PKCS#12 for browsers); Access is installed
   with an `access` admin's credentials, every key and its API key sealed;
3. three tunnel nodes are set up with ``certgate tunnel setup`` (API key AND admin
   certificate; one group tunnel identity) and started with ``certgate tunnel run``:
   tunnel-1 standalone, tunnel-2 as a cascade back end and tunnel-3 as its front end;
4. the device agent enrolls (``certgate device enroll``), receives its Per-App Tunnel
   profile and, on its app's first authentication, a Proxy-mode app certificate;
5. the intranet page is fetched through the tunnel in both modes: real ``curl`` with the
   app certificate, and ``certgate device exec`` through the agent's per-app rules;
6. UDP: a datagram sent to the agent's local UDP forward (``--udp-forward``) crosses the
   device's tunnel to a UDP echo service, and its answer comes back the same way;
7. cascade: the intranet page is fetched through tunnel-3, the front end, which relays to
   tunnel-2; the connection the intranet answers is held by the back end (Linux: the
   kernel's socket table names it);
8. an admin marks the device non-compliant: the live tunnel is closed and the next request
   refused, and the time from the change to enforcement is measured;
9. the audit chain is verified. Everything started is stopped; ``--keep`` leaves it running.

No private key is on disk in clear afterwards, anywhere under the work directory
(tests/integration/test_demo.py scans it): the console, tunnel nodes, device agent and
Access seal theirs, and the files meant for a human are protected by the passphrase.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12
from rich.console import Console
from rich.table import Table
from rich.text import Text

from certgate.access.config import ClientRegistration
from certgate.access.install import InstallRequest, install, load_material
from certgate.console import local
from certgate.console.services import admins, ca, signin
from certgate.demo_intranet import Intranet, UDPEcho
from certgate.errors import CertgateError
from certgate.pki.authority import Authority, Issuer, Names
from certgate.pki.keys import KeyAlgorithm, PrivateKey, generate_key, private_key_pem
from certgate.pki.profiles import CONSOLE_TLS, ROOT_CA
from certgate.pki.thumbprint import thumbprint
from certgate.tlsconf import pem_of

out = Console()
GROUP = "demo"
APP = "com.example.browser"
INTRANET_PAGE = b"<h1>Welcome to the intranet</h1>\n"
CERTGATE = [sys.executable, "-m", "certgate"]
NODES = ("tunnel-1", "tunnel-2", "tunnel-3")  # tunnel-1 standalone; 2 and 3 a cascade


class DemoError(CertgateError):
    """A demo step did not show what it should."""


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Demo:
    work: Path
    ports: dict[str, int] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)  # pid -> the name it was spawned as
    keys: dict[str, str] = field(default_factory=dict)
    origin: Intranet | None = None
    echo: UDPEcho | None = None
    # Protects every key file the demo writes for a human (admin keys, app key exports).
    passphrase: str = field(default_factory=lambda: secrets.token_urlsafe(18))

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
            ctx.load_cert_chain(
                self.path(f"{cert}.pem"), self.path(f"{cert}.key"), password=self.passphrase
            )
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
        self.names[proc.pid] = name
        return proc

    def process(self, name: str) -> subprocess.Popen[bytes]:
        return next(proc for proc in self.procs if self.names[proc.pid] == name)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=40)
        if self.origin is not None:
            self.origin.shutdown()
            self.origin.server_close()
        if self.echo is not None:
            self.echo.close()


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
            write_admin_files(demo, name, cert, private)
            demo.keys[name] = key.token
            out.print(
                f"admin [bold]{name}[/] ({role}): cert {thumbprint(cert)[:16]}…, "
                f"API key id {key.id}"
            )
        web_sign_in(demo, db, pki)
    finally:
        db.dispose()


def write_admin_files(demo: Demo, name: str, cert: x509.Certificate, private: PrivateKey) -> None:
    """The certificate, its key as an encrypted PEM (curl --key with --pass) and as a
    PKCS#12 (browsers, ``tunnel setup``): both under the demo's passphrase."""
    secret = demo.passphrase.encode()
    demo.write(f"{name}.pem", ca.pem(cert))
    demo.write(f"{name}.key", private_key_pem(private, secret))
    demo.write(
        f"{name}.p12",
        pkcs12.serialize_key_and_certificates(
            name.encode(), private, cert, None, BestAvailableEncryption(secret)
        ),
    )


def public_certificate() -> tuple[bytes, bytes]:
    """A stand-in for the publicly trusted certificate of Access's VIP (chain, key PEM),
    made in memory: its CA key is dropped here and the leaf key goes straight to Access."""
    authority = Authority()
    root_key, leaf_key = generate_key(), generate_key()
    root = authority.create_root(root_key, Names("demo public root"), ROOT_CA)
    names = Names("localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1",))
    leaf = authority.issue(Issuer(root, root_key), CONSOLE_TLS, names, leaf_key.public_key())
    return pem_of([leaf, root]), private_key_pem(leaf_key)


def install_access(demo: Demo) -> None:
    """Access, installed with the credentials of an admin with the `access` role (device
    reads and shared sign-in transactions), held in memory only."""
    db, pki = local.open_db(local.load_config(demo.path("console")))
    try:
        with db.transaction() as session:
            admin = admins.create_admin(session, "access", "access", "global")
            api_key = admins.issue_api_key(session, admin)
            cert, private = admins.issue_admin_cert(session, pki, admin)
    finally:
        db.dispose()
    public_chain, public_key = public_certificate()
    config = install(
        demo.path("access"),
        InstallRequest(
            issuer="https://127.0.0.1:8443",
            console_url=demo.url,
            certproxy_url="https://127.0.0.1:5262",
            clients=(ClientRegistration("com.example.mail", ("com.example.mail:/cb",)),),
            console_chain_pem=demo.path("chain.pem").read_bytes(),
            console_admin_cert_pem=ca.pem(cert).encode(),
            console_admin_key_pem=private_key_pem(private),
            console_api_key=api_key.token,
            public_chain_pem=public_chain,
            public_key_pem=public_key,
        ),
    )
    load_material(config)  # opens every sealed key again, as `access serve` does
    out.print(
        f"Access installed in {config.data_dir}: its keys and console API key sealed "
        "under its master key ✔"
    )


def web_sign_in(demo: Demo, db: Any, pki: ca.InstancePKI) -> None:
    """Give ``ops`` a web console password and TOTP factor, and say how to sign in."""
    password = secrets.token_urlsafe(12)
    with db.transaction() as session:
        ops = admins.by_username(session, "ops")
        signin.set_password(session, ops, password)
        uri = signin.new_totp(session, pki.master, ops)
    out.print(f"web console: {demo.url}/ui/ - user ops, password {password}", soft_wrap=True)
    out.print(f"  TOTP (add to an authenticator app): {uri}", soft_wrap=True)
    code = f"import pyotp; print(pyotp.parse_uri('{uri}').now())"
    out.print(f'  or a current code: python3 -c "{code}"', soft_wrap=True)


def create_group(demo: Demo) -> None:
    settings = {
        "initial_compliance": "compliant",
        "tunnel": {
            "hostnames": ["localhost"],
            "ip_addresses": ["127.0.0.1"],
            "proxy_port": demo.ports["proxy"],
            "per_app_port": demo.ports["per_app"],
        },
        "feed": {"long_poll_s": 10, "max_staleness_s": 60},
        "server_rules": {
            "default": "deny",
            "rules": [{"action": "allow", "cidrs": ["127.0.0.0/8"], "protocols": ["tcp", "udp"]}],
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
    with ThreadPoolExecutor() as pool:  # side by side: each is a process of its own
        list(pool.map(lambda node: tunnel_setup(demo, node), NODES))
    certs = {demo.path(f"{node}/tunnel.pem").read_bytes() for node in NODES}
    if len(certs) != 1:
        raise DemoError("HA nodes did not receive the same group tunnel certificate")
    out.print(f"{', '.join(NODES)} hold the same group tunnel certificate (HA) ✔")
    ports = (demo.ports["proxy"], demo.ports["per_app"], demo.ports["admin"])
    tunnel_1 = tunnel_run(demo, "tunnel-1", ports)
    start_cascade(demo)  # used in step 7; starting meanwhile
    wait_for_port(demo.ports["proxy"], tunnel_1, "tunnel")
    out.print(
        f"tunnel-1 running: Proxy mode on {demo.ports['proxy']}, Per-App Tunnel on "
        f"{demo.ports['per_app']}, /healthz and /metrics on {demo.ports['admin']}"
    )
    out.print("tunnel-2 (cascade back end) and tunnel-3 (its front end) starting, for step 7")


def tunnel_setup(demo: Demo, node: str) -> None:
    """``certgate tunnel setup`` of ``node`` in the demo's group, with both credentials."""
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
            demo.passphrase,
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


def tunnel_run(
    demo: Demo, node: str, ports: tuple[int, int, int], *role: str
) -> subprocess.Popen[bytes]:
    """Start ``node`` on loopback ``ports`` (proxy, Per-App, admin); ``role``: cascade
    options. The caller waits for it to listen."""
    proxy, per_app, admin = ports
    return demo.spawn(
        node,
        "tunnel",
        "run",
        "--state-dir",
        str(demo.path(node)),
        "--proxy-listen",
        f"127.0.0.1:{proxy}",
        "--per-app-listen",
        f"127.0.0.1:{per_app}",
        "--admin-listen",
        f"127.0.0.1:{admin}",
        *role,
    )


def start_intranet(demo: Demo) -> None:
    demo.origin = Intranet(INTRANET_PAGE, demo.names)
    demo.ports["intranet"] = demo.origin.server_address[1]
    threading.Thread(target=demo.origin.serve_forever, daemon=True).start()
    demo.echo = UDPEcho()
    demo.ports["echo"] = demo.echo.port


def device_cli(demo: Demo, *args: str) -> str:
    """Run ``certgate device ...`` on the demo device's state directory; its output."""
    env = {
        **os.environ,
        "DEMO_PASSWORD": "alice-password",
        "DEMO_EXPORT_PASSWORD": demo.passphrase,
        "COLUMNS": str(out.width),
    }
    result = subprocess.run(
        [*CERTGATE, "device", *args, "-s", str(demo.path("device"))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    if result.returncode != 0:
        raise DemoError(f"certgate device {args[0]}: {result.stderr or result.stdout}")
    out.print(Text(result.stdout.rstrip(), style="dim"))
    return result.stdout


def enroll_device(demo: Demo) -> str:
    step("4. Device agent: enrollment, Per-App Tunnel profile, Proxy-mode app certificate")
    with demo.admin() as ops:
        expect(
            ops.post(
                f"/api/v1/groups/{GROUP}/enrollment-users",
                json={"username": "alice", "password": "alice-password"},
            ),
            201,
            "enrollment user",
        )
    out.print("$ certgate device enroll (keys are generated on the device; CSRs only)")
    enrolled = device_cli(
        demo,
        "enroll",
        "--console",
        demo.url,
        "--ca-file",
        str(demo.path("root.pem")),
        "--user",
        "alice",
        "--password-env",
        "DEMO_PASSWORD",
        "--platform",
        "android",
        "--name",
        "alice-pixel",
    )
    out.print("$ certgate device profile (delivery generates the per-device certificate)")
    device_cli(demo, "profile")
    out.print(f"$ certgate device app-auth --app {APP} (first app authentication)")
    device_cli(
        demo,
        "app-auth",
        "--app",
        APP,
        "--user",
        "alice",
        "--password-env",
        "DEMO_PASSWORD",
        "--export-password-env",
        "DEMO_EXPORT_PASSWORD",
    )
    openssl_verify(demo, str(demo.path(f"device/apps/{APP}/cert.pem")))
    found = re.search(r"DeviceUid ([0-9a-f]{32})", enrolled)
    if found is None:
        raise DemoError("enrollment did not report a DeviceUid")
    return found.group(1)


def openssl_verify(demo: Demo, cert: str) -> None:
    with demo.client() as anon:
        demo.write(
            "device-root.pem",
            anon.get("/pki/chain.pem").text.split("-----END CERTIFICATE-----\n")[2]
            + "-----END CERTIFICATE-----\n",
        )
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
            cert,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise DemoError(f"openssl verify {cert}: {result.stdout} {result.stderr}")
    out.print("openssl verify -purpose sslclient app cert: [green]OK[/] (X.509 v3, Device Root)")


def curl_proxy_mode(
    demo: Demo, *extra: str, port: int | None = None
) -> subprocess.CompletedProcess[str]:
    """Real curl in Proxy mode with the app certificate (tunnel-1 unless ``port``)."""
    app = demo.path(f"device/apps/{APP}")
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            *extra,
            "--proxy",
            f"https://localhost:{port or demo.ports['proxy']}",
            "--proxy-cacert",
            str(demo.path("chain.pem")),
            "--proxy-cert",
            str(app / "cert.pem"),
            "--proxy-key",
            str(app / "key.pem"),
            "--proxy-pass",
            demo.passphrase,
            f"http://127.0.0.1:{demo.ports['intranet']}/",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def start_agent(demo: Demo) -> None:
    demo.ports["agent"] = free_port()
    demo.ports["udp_forward"] = free_port(socket.SOCK_DGRAM)
    proc = demo.spawn(
        "agent",
        "device",
        "run",
        "-s",
        str(demo.path("device")),
        "--socks",
        "",
        "--http",
        f"127.0.0.1:{demo.ports['agent']}",
        "--udp-forward",
        f"{APP}={demo.ports['udp_forward']}:127.0.0.1:{demo.ports['echo']}",
    )
    wait_for_port(demo.ports["agent"], proc, "device agent")
    out.print(
        f"device agent running: HTTP proxy on 127.0.0.1:{demo.ports['agent']} "
        "(per-app rules: tunnel / bypass / block); UDP forward for "
        f"{APP} on 127.0.0.1:{demo.ports['udp_forward']} → 127.0.0.1:{demo.ports['echo']}"
    )


def exec_as(demo: Demo, app: str) -> str:
    result = subprocess.run(
        [
            *CERTGATE,
            "device",
            "exec",
            "--app",
            app,
            "-s",
            str(demo.path("device")),
            "--",
            "curl",
            "-sS",
            "--max-time",
            "20",
            "-w",
            " (HTTP %{http_code})",
            f"http://127.0.0.1:{demo.ports['intranet']}/",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return " ".join(result.stdout.split())


def fetch_both_modes(demo: Demo) -> None:
    step("5. Traffic: the intranet page through the tunnel, in both modes")
    result = wait_until_served(demo, demo.ports["proxy"])
    out.print(f"Proxy mode, real curl with the app certificate → {result}")
    start_agent(demo)
    page = exec_as(demo, APP)
    if INTRANET_PAGE.decode().strip() not in page:
        raise DemoError(f"Per-App Tunnel fetch failed: {page}")
    out.print(f"Per-App Tunnel: certgate device exec --app {APP} -- curl → {page}")
    out.print(f"  rule 0: apps ({APP}), domains (*) → tunnel")
    blocked = exec_as(demo, "com.example.mail")
    if "403" not in blocked:
        raise DemoError(f"an app without a tunnel rule was not blocked: {blocked}")
    out.print(f"certgate device exec --app com.example.mail -- curl → {blocked}")
    out.print("  rule: no rule for com.example.mail → group default: block")


def udp_exchange(demo: Demo) -> None:
    step("6. UDP: a datagram through the agent's UDP forward and the tunnel")
    sent = b"ping from " + APP.encode()
    answer = udp_ask(("127.0.0.1", demo.ports["udp_forward"]), sent)
    if answer != b"echo: " + sent:
        raise DemoError(f"the UDP echo answered {answer!r} through the tunnel")
    out.print(
        f"UDP {sent!r} → agent's UDP forward 127.0.0.1:{demo.ports['udp_forward']} → "
        f"tunnel-1 (Per-App Tunnel, datagram frames) → UDP echo 127.0.0.1:{demo.ports['echo']}"
    )
    out.print(f"  UDP echo answered through the tunnel → {answer!r}")
    routed = re.search(r"udp route (app=\S+ dest=\S+ via=tunnel \S+)", agent_log(demo))
    if routed is None or not routed[1].endswith(f":{demo.ports['per_app']}"):
        raise DemoError("the agent logged no UDP route through tunnel-1's Per-App Tunnel")
    out.print(f"  agent log: udp route {routed[1]} (tunnel-1's Per-App Tunnel port)")


def agent_log(demo: Demo) -> str:
    return demo.path("agent.log").read_text(errors="replace")


def udp_ask(address: tuple[str, int], payload: bytes) -> bytes | None:
    """Send ``payload``, the first answer (None after 10 tries of 2 s: UDP may lose the
    first datagrams while the agent opens its tunnel)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        for _ in range(10):
            sock.sendto(payload, address)
            try:
                return sock.recv(65535)
            except TimeoutError:
                continue
    return None


def cascade_hop(demo: Demo) -> None:
    step("7. Cascade: a front end relays to a back end, which alone reaches the intranet")
    back_end = demo.ports["back_end"]
    wait_for_port(back_end, demo.process("tunnel-2"), "tunnel-2 (back end)")
    wait_for_port(demo.ports["front_end"], demo.process("tunnel-3"), "tunnel-3 (front end)")
    out.print(f"tunnel-2 running as the back end (internal network), hop port {back_end}")
    out.print(
        f"tunnel-3 running as a front end (DMZ): Proxy mode on {demo.ports['front_end']}, "
        f"relaying over mTLS (group tunnel identity) to 127.0.0.1:{back_end}"
    )
    result = wait_until_served(demo, demo.ports["front_end"])
    out.print(f"Proxy mode through tunnel-3, real curl with the app certificate → {result}")
    visitor = demo.origin.visitors[-1] if demo.origin and demo.origin.visitors else None
    if visitor is None:
        out.print("  intranet: which process dialed it is not known here (no /proc)")
    elif visitor != "tunnel-2":
        raise DemoError(f"the intranet was dialed by {visitor}, not by the back end")
    else:
        out.print("  intranet: the connection it answered is held by tunnel-2 (back end) ✔")


def start_cascade(demo: Demo) -> None:
    """tunnel-2 as a back end, tunnel-3 as its front end (``cascade_hop`` waits for them)."""
    back, front = node_ports(), node_ports()
    demo.ports["back_end"], demo.ports["front_end"] = back[0], front[0]
    tunnel_run(demo, "tunnel-2", back, "--role", "back-end")
    relay = ("--role", "front-end", "--back-end", f"127.0.0.1:{back[0]}")
    tunnel_run(demo, "tunnel-3", front, *relay)


def node_ports() -> tuple[int, int, int]:
    """Proxy, Per-App and admin ports for a node."""
    return free_port(), free_port(), free_port()


def wait_until_served(demo: Demo, port: int) -> str:
    """The intranet page through the node on ``port``; new nodes learn the device from
    the console's feed first (bounded wait)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        result = curl_proxy_mode(demo, port=port)
        if result.stdout.encode() == INTRANET_PAGE:
            return result.stdout.strip()
        time.sleep(0.2)
    raise DemoError(f"no page through the node on port {port} (see tunnel-*.log)")


def agent_tunnel(demo: Demo) -> socket.socket:
    """A live Per-App Tunnel through the agent: CONNECT attributed to the app."""
    sock = socket.create_connection(("127.0.0.1", demo.ports["agent"]), timeout=20)
    target = f"127.0.0.1:{demo.ports['intranet']}"
    sock.sendall(
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nCertgate-App: {APP}\r\n\r\n".encode()
    )
    head = sock.recv(4096)
    if not head.startswith(b"HTTP/1.1 200"):
        sock.close()
        raise DemoError(f"Per-App Tunnel refused: {head[:200]!r}")
    return sock


def enforce(demo: Demo, device_uid: str) -> float:
    step("8. Compliance: an admin marks the device non-compliant")
    sock = agent_tunnel(demo)
    out.print("a live Per-App Tunnel is open (device → agent → tunnel-1 → intranet)")
    with demo.admin() as ops:
        changed_at = time.monotonic()
        expect(
            ops.put(f"/api/v1/devices/{device_uid}/compliance", json={"status": "noncompliant"}),
            200,
            "compliance change",
        )
    try:
        leftover = sock.recv(4096)
    except ConnectionError:
        leftover = b""
    except TimeoutError as exc:
        raise DemoError("the live tunnel stayed open after the compliance change") from exc
    finally:
        sock.close()
    elapsed_ms = (time.monotonic() - changed_at) * 1000
    if leftover:
        raise DemoError(f"unexpected data on the live tunnel: {leftover[:100]!r}")
    out.print(f"live Per-App Tunnel closed [bold]{elapsed_ms:.0f} ms[/] after the change")
    refused = curl_proxy_mode(demo, "-w", " (HTTP %{http_code})")
    out.print(f"next Proxy-mode request → {' '.join(refused.stdout.split())}")
    if "403" not in refused.stdout:
        raise DemoError(f"the next request was not refused: {refused.stdout}")
    return elapsed_ms


def audit_verify(demo: Demo) -> None:
    step("9. Audit chain")
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
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    demo = Demo(work)
    try:
        start_console(demo)
        make_admins(demo)
        install_access(demo)
        setup_tunnel(demo)
        start_intranet(demo)
        device_uid = enroll_device(demo)
        fetch_both_modes(demo)
        udp_exchange(demo)
        cascade_hop(demo)
        enforce(demo, device_uid)
        audit_verify(demo)
    except (CertgateError, httpx.HTTPError, OSError, subprocess.SubprocessError) as exc:
        out.print(f"[bold red]demo failed:[/] {exc}  (logs in {work})")
        demo.stop()
        return 1
    if keep:
        with demo.admin() as ops:  # so that the device works again by hand
            ops.put(f"/api/v1/devices/{device_uid}/compliance", json={"status": "compliant"})
        out.print("device marked compliant again for use by hand")
        print_kept(demo)
        return 0
    demo.stop()
    if work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    out.print("[bold green]demo passed[/]: everything it started is stopped")
    return 0


def print_kept(demo: Demo) -> None:
    w, app = demo.work, demo.work / f"device/apps/{APP}"
    out.print(
        f"[bold]still running[/] (files in {w}); stop with: kill "
        + " ".join(str(p.pid) for p in demo.procs)
    )
    out.print(f"  key files' passphrase (admin keys, app key exports): {demo.passphrase}")
    out.print(
        f"  console API:  curl --cacert {w}/chain.pem --cert {w}/ops.pem --key "
        f"{w}/ops.key --pass '{demo.passphrase}' -H 'Authorization: Bearer "
        f"{demo.keys['ops']}' {demo.url}/api/v1/groups"
    )
    out.print(
        f"  Proxy mode:   curl --proxy https://localhost:{demo.ports['proxy']} "
        f"--proxy-cacert {w}/chain.pem --proxy-cert {app}/cert.pem --proxy-key "
        f"{app}/key.pem --proxy-pass '{demo.passphrase}' http://127.0.0.1:<port>/"
    )
    out.print(
        f"  Per-App:      certgate device exec -s {w}/device --app {APP} -- curl "
        "http://127.0.0.1:<port>/"
    )
    out.print(
        f"  cascade:      the Proxy mode command with --proxy https://localhost:"
        f"{demo.ports['front_end']} (tunnel-3, front end → tunnel-2, back end)"
    )
    out.print(
        f"  UDP forward:  127.0.0.1:{demo.ports['udp_forward']} (app {APP}) → tunnel-1 → "
        f"127.0.0.1:{demo.ports['echo']}"
    )
    out.print(f"  tunnel:       curl http://127.0.0.1:{demo.ports['admin']}/healthz (and /metrics)")
    out.print("  (the demo's intranet page and UDP echo servers end with this process)")
