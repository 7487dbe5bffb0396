"""In-process harness for the tunnel data plane: a small PKI built with the real Authority,
a real DeviceTable, the real TunnelService on loopback in its own event-loop thread, and a
real HTTP origin. Clients are real: curl, and Python's ssl sockets."""

from __future__ import annotations

import asyncio
import http.server
import secrets
import socket
import ssl
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvloop
from cryptography import x509

from certgate.feed import FEED_VERSION, PolicyUpdate, decode_op
from certgate.pki import identity
from certgate.pki.authority import Authority, Issuer, Names
from certgate.pki.keys import PrivateKey, generate_key, private_key_pem
from certgate.pki.profiles import (
    APP_CLIENT,
    DEVICE_CLIENT,
    INTERMEDIATE_CA,
    TUNNEL_IDENTITY,
    Profile,
)
from certgate.pki.thumbprint import thumbprint
from certgate.tlsconf import pem_of
from certgate.tunnel.server import Gate, Limits
from certgate.tunnel.service import (
    DEFAULT_TLS_BACKEND,
    TLS_BACKENDS,
    Endpoint,
    TunnelService,
    data_plane_tls,
)
from certgate.tunnel.table import DeviceTable

GROUP = "g1"
APP = "com.example.browser"
PAGE = b"<h1>intranet</h1>\n"


@dataclass
class PKI:
    """Root -> Device Root / Secure Channel Root -> leaves, as the console would build."""

    work: Path
    authority: Authority = field(default_factory=Authority)

    def __post_init__(self) -> None:
        self.root_key = generate_key()
        self.root = self.authority.create_root(self.root_key, Names("test root"))
        self.device_root, self.device_root_key = self._intermediate("Device Root")
        self.scr, self.scr_key = self._intermediate("Secure Channel Root")
        self.tunnel_key = generate_key()
        self.tunnel = self.authority.issue(
            Issuer(self.scr, self.scr_key),
            TUNNEL_IDENTITY,
            Names(
                "tunnel",
                identity.tunnel(GROUP),
                dns_names=("localhost",),
                ip_addresses=("127.0.0.1",),
            ),
            self.tunnel_key.public_key(),
        )
        self.write("chain.pem", pem_of([self.scr, self.root]))

    def _intermediate(self, name: str) -> tuple[x509.Certificate, PrivateKey]:
        key = generate_key()
        cert = self.authority.issue(
            Issuer(self.root, self.root_key), INTERMEDIATE_CA, Names(name), key.public_key()
        )
        return cert, key

    def write(self, name: str, data: bytes) -> Path:
        path = self.work / name
        path.write_bytes(data)
        return path

    def client_cert(
        self,
        name: str,
        *,
        app: str | None = None,
        profile: Profile | None = None,
        authority: Authority | None = None,
        issuer: Issuer | None = None,
        group: str = GROUP,
    ) -> Client:
        uid = secrets.token_hex(16)
        ident = identity.app(uid, group, app) if app else identity.device(uid, group)
        profile = profile or (APP_CLIENT if app else DEVICE_CLIENT)
        key = generate_key()
        cert = (authority or self.authority).issue(
            issuer or Issuer(self.device_root, self.device_root_key),
            profile,
            Names(name, ident),
            key.public_key(),
        )
        return self.save(name, cert, key, uid, app)

    def save(
        self, name: str, cert: x509.Certificate, key: PrivateKey, uid: str, app: str | None
    ) -> Client:
        cert_path = self.write(f"{name}.pem", pem_of([cert]))
        key_path = self.write(f"{name}.key", private_key_pem(key))
        return Client(name, cert, uid, app, cert_path, key_path)


@dataclass
class Client:
    name: str
    cert: x509.Certificate
    device_uid: str
    app: str | None
    cert_path: Path
    key_path: Path

    @property
    def thumbprint(self) -> str:
        return thumbprint(self.cert)

    def entry(self, **overrides: Any) -> dict[str, Any]:
        entry = {
            "op": "upsert",
            "thumbprint": self.thumbprint,
            "device_uid": self.device_uid,
            "group_id": GROUP,
            "app_bundle_id": self.app,
            "enrollment_status": "enrolled",
            "compliance_status": "compliant",
            "blocked": False,
            "not_after": int(self.cert.not_valid_after_utc.timestamp()),
        }
        entry.update(overrides)
        return entry


DEFAULT_RULES: dict[str, Any] = {
    "default": "deny",
    "rules": [{"action": "allow", "cidrs": ["127.0.0.0/8"]}],
}


def policy(rules: dict[str, Any] | None = None, version: int = 1, **changes: Any) -> PolicyUpdate:
    """A group policy as the feed carries it: ``rules`` as server rules."""
    op = {
        "op": "policy",
        "version": version,
        "server_rules": rules or DEFAULT_RULES,
        "device_rules": {"default": "block", "rules": []},
        "feed": {"long_poll_s": 25, "max_staleness_s": 300},
        "tunnel": {"proxy_port": 2020, "per_app_port": 8443},
    }
    op.update(changes)
    decoded = decode_op(op, "test policy", FEED_VERSION)
    assert isinstance(decoded, PolicyUpdate)
    return decoded


@dataclass
class StaticSource:
    """A table that changes only when the test changes it (the feed is tested elsewhere)."""

    table: DeviceTable
    fresh: bool = True
    policy: PolicyUpdate = field(default_factory=policy)

    def is_fresh(self, now: float | None = None) -> bool:
        return self.fresh


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
BACKENDS = TLS_BACKENDS  # every data-plane test runs on each TLS backend (conftest ``backend``)


def run_on(loop_name: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``scenario`` on a fresh event loop of that name, bounded in time."""
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(asyncio.wait_for(scenario(), 30))


class ServiceThread:
    """Runs a TunnelService on its own event loop (stdlib or uvloop) in a daemon thread."""

    def __init__(self, service: TunnelService, loop: str = "asyncio") -> None:
        self.service = service
        self.loop = LOOPS[loop]()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ServiceThread:
        self.thread.start()
        self.call(self.service.start())
        return self

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def run(self, fn: Any, *args: Any) -> Any:
        async def wrapper() -> Any:
            return fn(*args)

        return self.call(wrapper())

    def __exit__(self, *exc: object) -> None:
        self.call(self.service.stop(drain_s=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def make_service(
    pki: PKI,
    source: StaticSource,
    rules: dict[str, Any] | None = None,
    limits: Limits | None = None,
    backend: str = DEFAULT_TLS_BACKEND,
) -> TunnelService:
    if rules is not None:
        source.policy = policy(rules)
    gate = Gate(GROUP, source)
    tls = data_plane_tls([pki.tunnel, pki.scr], pki.tunnel_key, [pki.device_root], backend=backend)
    return TunnelService(
        gate,
        tls,
        Endpoint("127.0.0.1", 0),
        Endpoint("127.0.0.1", 0),
        Endpoint("127.0.0.1", 0),
        limits or Limits(),
    )


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: Any) -> None:
        pass


class Origin:
    """The intranet: a real HTTP server on loopback."""

    def __enter__(self) -> Origin:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


STREAM_CHUNK_S = 0.1
STREAM_CHUNKS = 600  # a minute of chunks: longer than any scenario waits for a close


class _Streaming(http.server.BaseHTTPRequestHandler):
    """``GET /stream``: a chunked body of one line every STREAM_CHUNK_S, for a minute; any
    other path: PAGE."""

    protocol_version = "HTTP/1.1"
    server: _StreamingServer

    def do_GET(self) -> None:
        if self.path != "/stream":
            self._page()
            return
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        try:
            for index in range(STREAM_CHUNKS):
                line = f"chunk {index}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
                if self.server.stopping.wait(STREAM_CHUNK_S):
                    return
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            return  # the client (or the tunnel carrying it) went away

    def _page(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: Any) -> None:
        pass


class _StreamingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str) -> None:
        super().__init__((host, 0), _Streaming)
        self.stopping = threading.Event()


class StreamingOrigin:
    """A slow streaming origin on ``host`` (any loopback address): a live tunnel to it
    carries data the whole time, so a close is seen when it happens."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host

    def __enter__(self) -> StreamingOrigin:
        self.server = _StreamingServer(self.host)
        self.port: int = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def destination(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.destination}/stream"

    def __exit__(self, *exc: object) -> None:
        self.server.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def tls_client(pki: PKI, client: Client | None, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.work / "chain.pem"))
    ctx.minimum_version = ctx.maximum_version = version
    if client is not None:
        ctx.load_cert_chain(client.cert_path, client.key_path)
    return ctx


def connect_request(port: int, ctx: ssl.SSLContext, request: bytes, timeout: float = 10) -> bytes:
    """Send ``request`` over TLS; return whatever came back before close ('' on refusal)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(request)
                while chunk := tls.recv(65536):
                    received += chunk
        except (ssl.SSLError, ConnectionError):
            pass
    return received


def expired_pair(pki: PKI, name: str, days_ago: int) -> Client:
    past = datetime.now(UTC) - timedelta(days=days_ago)
    return pki.client_cert(name, app=APP, authority=Authority(clock=lambda: past))
