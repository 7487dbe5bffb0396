"""A running tunnel: its listeners, the idle sweeper, enforcement of feed changes, the admin
endpoint (``/healthz``, ``/metrics``) and a graceful drain on shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import h11
from cryptography import x509
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from certgate.addresses import ListenAddress
from certgate.pki.keys import PrivateKey
from certgate.tlsconf import ClientAuth, server_context
from certgate.tunnel.admission import Mode
from certgate.tunnel.metrics import TunnelMetrics
from certgate.tunnel.server import Gate, Limits, Listener, Shared, accept_client
from certgate.tunnel.sockets import Acceptor

log = logging.getLogger("certgate.tunnel")
SWEEP_INTERVAL_S = 1.0
ADMIN_MAX_REQUEST = 8 * 1024
# TLS 1.3 session tickets sent after a full handshake. OpenSSL's default is 2; each ticket
# after the first makes OpenSSL 3.0 copy the session through i2d/d2i, which re-decodes the
# client certificate (about 0.1 ms a connection here, bench/FINDINGS.md). One is what a
# client resuming one connection at a time needs (every resumption brings a new ticket),
# and RFC 8446 appendix C.4 asks clients to use each ticket once.
TLS13_TICKETS = 1


Endpoint = ListenAddress  # the data plane's name for a listen address


@dataclass
class TunnelService:
    gate: Gate
    tls: ssl.SSLContext
    proxy: Endpoint | None
    per_app: Endpoint | None
    admin: Endpoint | None = None
    limits: Limits = field(default_factory=Limits)
    status: Any = None  # callable returning the sync status dict, for /healthz
    metrics: TunnelMetrics = field(default_factory=TunnelMetrics)
    servers: list[Acceptor | asyncio.Server] = field(default_factory=list)
    bound: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shared = Shared(self.gate, self.limits, self.metrics)
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for name, mode, endpoint in (
            ("proxy", Mode.PROXY, self.proxy),
            ("per_app", Mode.PER_APP, self.per_app),
        ):
            if endpoint is None:
                continue
            listener = Listener(mode, self.tls, name)
            acceptor = Acceptor.listen(
                loop,
                endpoint.host,
                endpoint.port,
                lambda sock, addr, listener=listener: accept_client(  # type: ignore[misc]
                    self.shared, listener, sock, addr
                ),
            )
            self._register(name, acceptor)
        if self.admin is not None:
            server = await asyncio.start_server(
                self._admin_client, self.admin.host, self.admin.port
            )
            self._register("admin", server)
        self._sweeper = loop.create_task(self._sweep())

    def _register(self, name: str, server: Acceptor | asyncio.Server) -> None:
        self.servers.append(server)
        self.bound[name] = server.sockets[0].getsockname()[1]
        log.info("%s listening on %s", name, server.sockets[0].getsockname()[:2])

    def on_revoked(self, thumbprints: tuple[str, ...], signed_at: float | None = None) -> None:
        """Feed callback: close live tunnels of certificates no longer admissible."""
        closed = self.shared.registry.close_thumbprints(thumbprints, "policy changed")
        if closed:
            self.metrics.closed_by_policy.inc(closed)
            if signed_at is not None:
                self.metrics.enforce_seconds.observe(max(0.0, time.time() - signed_at))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self._close_idle(time.monotonic())
            self.shared.pool.trim()
            self._refresh_gauges()

    def _close_idle(self, now: float) -> None:
        limit = self.limits.idle_timeout_s
        for conn in list(self.shared.registry.all):
            if now - conn.last_activity > limit:
                conn.abort(f"idle for more than {limit:g}s")

    def _refresh_gauges(self) -> None:
        table = self.gate.source.table
        self.metrics.table_entries.set(len(table))
        self.metrics.table_seq.set(table.seq)
        self.metrics.table_fresh.set(1 if self.gate.source.is_fresh() else 0)
        status = self.status() if self.status else {}
        if "age_s" in status and status["age_s"] is not None:
            self.metrics.table_age.set(status["age_s"])

    async def stop(self, drain_s: float = 30.0) -> None:
        """Stop accepting, let open tunnels finish for up to ``drain_s``, then cut them."""
        for server in self.servers:
            server.close()
        deadline = time.monotonic() + drain_s
        while self.shared.registry.all and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.shared.registry.all):
            conn.abort("shutdown")
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self.shared.tasks):
            task.cancel()

    def health(self) -> tuple[int, dict[str, Any]]:
        fresh = self.gate.source.is_fresh()
        body = {
            "status": "ok" if fresh else "stale",
            "group_id": self.gate.group_id,
            "table_entries": len(self.gate.source.table),
            "table_seq": self.gate.source.table.seq,
            "connections": len(self.shared.registry.all),
            "sync": self.status() if self.status else None,
        }
        return (200 if fresh else 503), body

    async def _admin_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            target = await asyncio.wait_for(_read_target(reader), 5)
            status, ctype, body = self._admin_response(target)
        except (TimeoutError, h11.RemoteProtocolError, ConnectionError):
            status, ctype, body = 400, "text/plain", b"bad request\n"
        headers = [
            ("content-type", ctype),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        writer.write(_h11_response(status, headers, body))
        try:
            await writer.drain()
        finally:
            writer.close()

    def _admin_response(self, target: str) -> tuple[int, str, bytes]:
        if target == "/healthz":
            status, body = self.health()
            return status, "application/json", json.dumps(body).encode()
        if target == "/metrics":
            self._refresh_gauges()
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
        return 404, "text/plain", b"not found\n"


async def _read_target(reader: asyncio.StreamReader) -> str:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=ADMIN_MAX_REQUEST)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(4096))
            continue
        if isinstance(event, h11.Request):
            return event.target.decode("ascii", "replace").split("?", 1)[0]
        raise h11.RemoteProtocolError("no request", 400)


def _h11_response(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: admin\r\n\r\n")
    conn.next_event()
    head = conn.send(h11.Response(status_code=status, headers=headers))
    return (
        (head or b"")
        + (conn.send(h11.Data(data=body)) or b"")
        + (conn.send(h11.EndOfMessage()) or b"")
    )


def data_plane_tls(
    chain: list[x509.Certificate],
    key: PrivateKey,
    device_root: x509.Certificate,
    curve: str | None = None,
) -> ssl.SSLContext:
    """The listeners' TLS: the tunnel identity; client certs REQUIRED from the Device Root."""
    ctx = server_context(
        chain,
        key,
        client_cas=[device_root],
        client_auth=ClientAuth.REQUIRED,
        alpn=["http/1.1"],
        anchor_is_issuer=True,
        curve=curve,
    )
    ctx.num_tickets = TLS13_TICKETS
    return ctx
