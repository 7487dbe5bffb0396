"""Shared test harness for Access and CertProxy: stand-in PKIs, installations, servers.

Everything is real apart from the console in the in-process tests: a stand-in console
(:class:`ConsoleStandIn`) answers the two admin API reads Access makes, from certificates
signed by the real ``Authority``. Integration tests use a real console instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certgate.access import renewal
from certgate.access.app import AccessState, access_tls_context, create_app
from certgate.access.config import (
    AccessConfig,
    ClientRegistration,
    SignInStoreKind,
    TLSMode,
    parse_networks,
)
from certgate.access.install import (
    ACCESS_TLS_KEY,
    InstallRequest,
    Material,
    install,
    load_material,
    seal_key,
    write_public,
)
from certgate.access.proxied import make_access_server
from certgate.certproxy.cli import build_proxy
from certgate.certproxy.server import CertProxy, Limits
from certgate.httpserver import make_server
from certgate.pki import identity
from certgate.pki.authority import Authority, Issuer, Names
from certgate.pki.keys import PrivateKey, generate_key, private_key_pem
from certgate.pki.profiles import (
    ACCESS_TLS,
    ADMIN_CLIENT,
    CONSOLE_TLS,
    DEVICE_CLIENT,
    INTERMEDIATE_CA,
    ROOT_CA,
    Profile,
)
from certgate.tlsconf import pem_of

AUTHORITY = Authority()
CLIENT_ID = "com.example.mail"
REDIRECT_URI = "com.example.mail:/oauth2redirect"
GROUP = "android"


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


@dataclass(frozen=True)
class Leaf:
    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """The certificate chain and the key as PEM files; returns (cert path, key path)."""
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_bytes(pem_of([self.cert, *self.chain]))
        key_path.write_bytes(private_key_pem(self.key))
        key_path.chmod(0o600)
        return cert_path, key_path


def new_root(name: str) -> Issuer:
    key = generate_key()
    return Issuer(AUTHORITY.create_root(key, Names(name), ROOT_CA), key)


def new_intermediate(parent: Issuer, name: str) -> Issuer:
    key = generate_key()
    return Issuer(AUTHORITY.issue(parent, INTERMEDIATE_CA, Names(name), key.public_key()), key)


def issue(issuer: Issuer, profile: Profile, names: Names) -> Leaf:
    key = generate_key()
    return Leaf(AUTHORITY.issue(issuer, profile, names, key.public_key()), key, (issuer.cert,))


@dataclass(frozen=True)
class PublicPKI:
    """A stand-in for a public CA and the publicly trusted certificate of the VIP."""

    root: Issuer
    leaf: Leaf

    @classmethod
    def create(cls, dns_names: tuple[str, ...] = ("access.example.com",)) -> PublicPKI:
        root = new_root("Stand-in Public Root CA")
        names = Names("access.example.com", dns_names=dns_names, ip_addresses=("127.0.0.1",))
        return cls(root, issue(root, CONSOLE_TLS, names))


def issue_public(public: PublicPKI) -> Leaf:
    """The VIP's certificate issued again by the same public CA (the operator's renewal)."""
    names = Names(
        "access.example.com", dns_names=("access.example.com",), ip_addresses=("127.0.0.1",)
    )
    return issue(public.root, CONSOLE_TLS, names)


@dataclass
class ConsolePKI:
    """A stand-in console hierarchy: Root, Device Root, Admin CA, and devices under it;
    ``rotated`` Device Roots by label, as a Device Root rotation adds them."""

    root: Issuer = field(default_factory=lambda: new_root("certgate Root CA"))
    device_root: Issuer = field(init=False)
    admin_ca: Issuer = field(init=False)
    rotated: dict[str, Issuer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device_root = new_intermediate(self.root, "certgate Device Root")
        self.admin_ca = new_intermediate(self.root, "certgate Admin CA")

    def chain_pem(self) -> bytes:
        return pem_of([self.root.cert, self.device_root.cert, self.admin_ca.cert])

    def rotate(self, label: str) -> Issuer:
        """A next Device Root under the Root (the console's ``ca.new_ca_version``)."""
        self.rotated[label] = new_intermediate(self.root, "certgate Device Root")
        return self.rotated[label]

    def issuer(self, label: str) -> Issuer:
        return self.device_root if label == "device-root" else self.rotated[label]

    def device(
        self, uid: str | None = None, group: str = GROUP, label: str = "device-root"
    ) -> Leaf:
        uid = uid or secrets.token_hex(16)
        names = Names(f"device {uid}", identity.device(uid, group))
        return issue(self.issuer(label), DEVICE_CLIENT, names)

    def admin(self) -> Leaf:
        names = Names("admin access", identity.admin(secrets.token_hex(16)))
        return issue(self.admin_ca, ADMIN_CLIENT, names)


def device_record(uid: str, **changes: Any) -> dict[str, Any]:
    record = {
        "uid": uid,
        "group_id": GROUP,
        "platform": "android",
        "owner": "alice",
        "name": "pixel",
        "enrollment_status": "enrolled",
        "compliance_status": "compliant",
        "blocked": False,
        "profile_version": 1,
        "enrolled_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
    }
    return {**record, **changes}


@dataclass
class ConsoleStandIn:
    """Answers ``GET /api/v1/devices/{uid}``, ``GET /api/v1/access/device-roots`` (the
    ``trusted`` labels and statuses), ``GET /pki/device-root.crl`` (the current one's)
    and ``GET /pki/crl/<label>.crl``."""

    pki: ConsolePKI
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    revoked: set[int] = field(default_factory=set)
    down: bool = False
    requests: list[str] = field(default_factory=list)
    trusted: list[tuple[str, str]] = field(default_factory=lambda: [("device-root", "current")])

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        if self.down:
            raise httpx.ConnectError("console down", request=request)
        if request.headers.get("authorization", "") != "Bearer cgk_test_key":
            return httpx.Response(401, json={"error": "unauthenticated"})
        path = request.url.path
        if path == "/api/v1/access/device-roots":
            return httpx.Response(200, json=self.device_roots())
        if path == "/pki/device-root.crl":
            return httpx.Response(200, content=self.crl(self.trusted[0][0]))
        if path.startswith("/pki/crl/") and path.endswith(".crl"):
            return httpx.Response(200, content=self.crl(path[len("/pki/crl/") : -4]))
        uid = path.rsplit("/", 1)[-1]
        if uid in self.devices:
            return httpx.Response(200, json=self.devices[uid])
        return httpx.Response(404, json={"error": "not_found"})

    def device_roots(self) -> dict[str, Any]:
        return {
            "device_roots": [
                {
                    "label": label,
                    "status": status,
                    "certificate": pem(self.pki.issuer(label).cert).decode(),
                }
                for label, status in self.trusted
            ]
        }

    def crl(self, label: str = "device-root") -> bytes:
        now = datetime.now(UTC)
        entries = [(s, now, x509.ReasonFlags.superseded) for s in sorted(self.revoked)]
        issuer = self.pki.issuer(label)
        crl = AUTHORITY.sign_crl(issuer, entries, 1, now + timedelta(hours=1))
        return crl.public_bytes(Encoding.DER)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url="https://console.invalid",
            transport=httpx.MockTransport(self.handle),
            headers={"authorization": "Bearer cgk_test_key"},
        )


def install_request(
    console: ConsolePKI,
    public: PublicPKI,
    *,
    mode: TLSMode = TLSMode.OFFLOAD,
    issuer: str = "https://127.0.0.1:8443",
    certproxy_url: str = "https://127.0.0.1:5262",
    port: int = 8443,
) -> InstallRequest:
    admin = console.admin()
    return InstallRequest(
        issuer=issuer,
        console_url="https://console.invalid",
        certproxy_url=certproxy_url,
        clients=(ClientRegistration(CLIENT_ID, (REDIRECT_URI,)),),
        console_chain_pem=console.chain_pem(),
        console_admin_cert_pem=pem(admin.cert),
        console_admin_key_pem=private_key_pem(admin.key),
        console_api_key="cgk_test_key",
        public_chain_pem=pem_of([public.leaf.cert, public.root.cert]),
        public_key_pem=private_key_pem(public.leaf.key),
        tls_mode=mode,
        port=port,
        dns_names=("localhost", "node1.example.dmz"),
        ip_addresses=("127.0.0.1",),
        signins=SignInStoreKind.MEMORY,  # the stand-in console keeps no sign-ins
    )


@dataclass
class Installed:
    config: AccessConfig
    material: Material


def installed(directory: Path, request: InstallRequest) -> Installed:
    config = install(directory, request)
    return Installed(config, load_material(config))


@contextmanager
def serve_asgi(
    app: Any, port: int, ctx: ssl.SSLContext, load_balancers: tuple[str, ...] | None = None
) -> Iterator[None]:
    """An ASGI app on uvicorn (our TLS-aware protocol) in a thread, on loopback ``port``;
    behind Access's own listener (the PROXY v2 rule) when ``load_balancers`` is given."""
    options: dict[str, Any] = {
        "proxy_headers": False,
        "access_log": False,
        "h11_max_incomplete_event_size": 32 * 1024,
    }
    if load_balancers is None:
        server = make_server(app, "127.0.0.1", port, ctx, **options)
    else:
        networks = parse_networks(load_balancers)
        server = make_access_server(app, "127.0.0.1", port, ctx, networks, **options)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@contextmanager
def access_server(setup: Installed, console: ConsoleStandIn, port: int) -> Iterator[AccessState]:
    """Access in a thread, on ``port``, asking the stand-in console."""
    state = AccessState.build(setup.config, setup.material, console.client())
    state.tls = access_tls_context(setup.config, setup.material)
    with serve_asgi(create_app(state), port, state.tls):
        yield state


@contextmanager
def proxy_server(
    setup: Installed,
    access_port: int,
    *,
    port: int = 0,
    offload_port: int | None = 0,
    limits: Limits | None = None,
    load_balancers: tuple[str, ...] | None = None,
) -> Iterator[tuple[CertProxy, list[tuple[str, int]]]]:
    """The cert proxy on its own event loop in a thread (ephemeral ports by default)."""
    proxy = build_proxy(
        setup.config,
        setup.material,
        host="127.0.0.1",
        port=port,
        offload_port=offload_port,
        access_host="127.0.0.1",
        access_port=access_port,
        limits=limits,
        load_balancers=load_balancers,
    )
    loop = asyncio.new_event_loop()
    bound = loop.run_until_complete(proxy.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield proxy, bound
    finally:
        asyncio.run_coroutine_threadsafe(proxy.aclose(), loop).result(timeout=20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=20)
        loop.close()


def device_context(trust: x509.Certificate, leaf: Leaf | None = None) -> ssl.SSLContext:
    """A client trusting ``trust``; presents ``leaf`` (with its chain) when given."""
    ctx = ssl.create_default_context(cadata=pem(trust).decode())
    if leaf is not None:
        with tempfile.TemporaryDirectory() as tmp:
            cert_path, key_path = leaf.write(Path(tmp), "device")
            ctx.load_cert_chain(cert_path, key_path)
    return ctx


def exchange_after(
    port: int, prefix: bytes, ctx: ssl.SSLContext, request: bytes, server_hostname: str
) -> bytes:
    """Connect, write ``prefix`` in clear (a PROXY header, or nothing), then TLS, ``request``
    and everything the server sends until it closes. TLS runs over memory BIOs: a server
    that resets the connection before the handshake makes ``ssl.wrap_socket`` leak its
    socket (CPython 3.11), this does not. Raises ``ssl.SSLError``/``OSError`` on refusal."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:

        def pump(step: Callable[[], Any]) -> Any:
            while True:
                try:
                    result = step()
                    raw.sendall(outgoing.read())
                    return result
                except ssl.SSLWantReadError:
                    raw.sendall(outgoing.read())
                    data = raw.recv(65536)
                    incoming.write(data) if data else incoming.write_eof()

        raw.sendall(prefix)
        pump(tls.do_handshake)
        pump(lambda: tls.write(request))
        received = b""
        while True:
            try:
                chunk: bytes = pump(lambda: tls.read(65536))
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return received
            if not chunk:  # close_notify
                return received
            received += chunk


def wait_for_log(records: Callable[[], list[logging.LogRecord]], text: str) -> None:
    """Wait (bounded) until a log record containing ``text`` was emitted: servers in other
    threads log a refusal just after the client has seen it."""
    deadline = time.monotonic() + 10
    while not any(text in r.getMessage() for r in records()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no log record containing {text!r}")
        time.sleep(0.02)


def due_for_renewal(setup: Installed, left: timedelta) -> Installed:
    """The installation with its Access TLS certificate replaced by one ``left`` from its
    end (in real time), signed by the install root like the first: as after a year."""
    material = setup.material
    assert material.install_root_key is not None
    key = generate_key()
    short = AUTHORITY.issue(
        Issuer(material.install_root, material.install_root_key),
        dataclasses.replace(ACCESS_TLS, validity=left),
        renewal.names_of(material.access_cert),
        key.public_key(),
    )
    seal_key(setup.config, ACCESS_TLS_KEY, key)
    write_public(setup.config.files.access_tls, pem_of([short]))
    return Installed(setup.config, load_material(setup.config))
