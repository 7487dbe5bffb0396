"""The tunnel's data plane: the asyncio shell around the pure parts.

Two TLS listeners share one connection class: Proxy mode (default 2020, an HTTPS forward
proxy: ``CONNECT`` and absolute-form requests, app+device certificates) and Per-App
Tunnel (default 8443, ``CONNECT`` naming the app in ``Certgate-App``, device
certificates). Per connection:

    TCP accepted -> TLS handshake (client cert REQUIRED, verified against the Device Root)
    -> request head parsed (sans-IO ``HTTPProxyParser``) -> ``admit`` (pure) -> DNS ->
    server traffic ``rules.evaluate`` (pure) -> upstream connect -> relay.

TLS is started per connection with ``loop.start_tls`` rather than by the listener, so a
failed handshake (expired, wrong CA, self-signed, no certificate) is caught here and
logged with its reason, and connection limits apply before any cryptography is spent.
Every denial is logged with device, thumbprint, app, destination and reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, cast

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from certgate.errors import ChainError
from certgate.protocol.http_proxy import (
    HTTPProxyError,
    HTTPProxyParser,
    NeedData,
    ProxyRequest,
    app_of,
    error_response,
    origin_request_head,
    response_head,
)
from certgate.tunnel.admission import (
    AdmissionRequest,
    Decision,
    Mode,
    PeerIdentity,
    admit,
    peer_identity,
)
from certgate.tunnel.metrics import TunnelMetrics
from certgate.tunnel.relay import Pipe, UpstreamProtocol
from certgate.tunnel.rules import RuleSet, evaluate
from certgate.tunnel.table import DeviceTable

log = logging.getLogger("certgate.tunnel")


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on everything a client controls; defaults are documented in the README."""

    max_header_bytes: int = 16 * 1024
    handshake_timeout_s: float = 10.0
    header_timeout_s: float = 10.0
    resolve_timeout_s: float = 5.0
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    max_connections: int = 10_000


class TableSource(Protocol):
    """What the data plane needs from sync: the current table and its freshness."""

    @property
    def table(self) -> DeviceTable: ...

    def is_fresh(self, now: float | None = None) -> bool: ...


@dataclass
class Gate:
    """Policy inputs of one tunnel group: who is admitted, where traffic may go."""

    group_id: str
    source: TableSource
    ruleset: RuleSet
    clock: Callable[[], float] = time.time

    def admit(self, peer: PeerIdentity, mode: Mode, app: str | None) -> Decision:
        entry = self.source.table.lookup(peer.thumbprint)
        request = AdmissionRequest(table_fresh=self.source.is_fresh(), app_bundle_id=app)
        return admit(peer, entry, mode, request, self.clock(), self.group_id)


class Phase(Enum):
    HANDSHAKE = "handshake"
    HEAD = "head"
    CONNECTING = "connecting"
    RELAYING = "relaying"
    CLOSED = "closed"


class Registry:
    """Open client connections, by certificate thumbprint, so policy changes can close them."""

    def __init__(self) -> None:
        self.by_thumbprint: dict[str, set[ClientConnection]] = {}
        self.all: set[ClientConnection] = set()

    def add(self, conn: ClientConnection) -> None:
        self.all.add(conn)

    def bind(self, conn: ClientConnection, thumbprint: str) -> None:
        self.by_thumbprint.setdefault(thumbprint, set()).add(conn)

    def remove(self, conn: ClientConnection) -> None:
        self.all.discard(conn)
        if conn.peer is not None:
            bucket = self.by_thumbprint.get(conn.peer.thumbprint)
            if bucket is not None:
                bucket.discard(conn)
                if not bucket:
                    del self.by_thumbprint[conn.peer.thumbprint]

    def close_thumbprints(self, thumbprints: tuple[str, ...], reason: str) -> int:
        closed = 0
        for tp in thumbprints:
            for conn in list(self.by_thumbprint.get(tp, ())):
                conn.abort(reason)
                closed += 1
        return closed


@dataclass
class Listener:
    """One listening mode of the shared data plane."""

    mode: Mode
    tls: ssl.SSLContext
    name: str


class Shared:
    """What every connection of a server shares."""

    def __init__(self, gate: Gate, limits: Limits, metrics: TunnelMetrics) -> None:
        self.gate, self.limits, self.metrics = gate, limits, metrics
        self.registry = Registry()
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # Keep a reference: a bare task can be garbage-collected while still pending.
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class ClientConnection(asyncio.Protocol):
    """One client: TLS, one request head, then a relay to one destination."""

    def __init__(self, shared: Shared, listener: Listener) -> None:
        self.shared, self.listener = shared, listener
        self.phase = Phase.HANDSHAKE
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.peer: PeerIdentity | None = None
        self.peer_addr = "?"
        self.destination = "-"
        self.app: str | None = None
        self.parser = HTTPProxyParser(max_header_bytes=shared.limits.max_header_bytes)
        self.up: Pipe | None = None
        self.down: Pipe | None = None
        self.last_activity = time.monotonic()
        self._head_timer: asyncio.TimerHandle | None = None

    # -- TCP and TLS ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not isinstance: uvloop's transports are not asyncio.Transport subclasses.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer_addr = f"{peer[0]}:{peer[1]}" if peer else "?"
        registry = self.shared.registry
        if len(registry.all) >= self.shared.limits.max_connections:
            log.warning(
                "refuse %s: connection limit %d reached",
                self.peer_addr,
                self.shared.limits.max_connections,
            )
            transport.abort()
            return
        transport.pause_reading()  # start_tls takes over reading; no byte may reach us first
        registry.add(self)
        self.shared.metrics.active.labels(self.listener.name).inc()
        self.shared.spawn(self._handshake(transport))

    async def _handshake(self, plain: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                plain,
                self,
                self.listener.tls,
                server_side=True,
                ssl_handshake_timeout=self.shared.limits.handshake_timeout_s,
            )
        except (ConnectionResetError, BrokenPipeError) as exc:
            # A TCP probe (load balancer health check, port scan) closing before or during
            # the handshake: not a certificate decision, so not a denial.
            log.info("%s closed during the TLS handshake (%s)", self.peer_addr, type(exc).__name__)
            self._closed()
            plain.abort()
            return
        except (OSError, TimeoutError) as exc:
            log.warning(
                "deny %s listener=%s reason=tls_handshake detail=%s",
                self.peer_addr,
                self.listener.name,
                _tls_reason(exc),
            )
            self.shared.metrics.denials.labels(self.listener.name, "tls_handshake").inc()
            self._closed()
            plain.abort()
            return
        if tls is None or self.phase is Phase.CLOSED:
            self._closed()
            return
        self.transport = tls
        self._tls_established(tls)

    def _tls_established(self, tls: asyncio.Transport) -> None:
        self.shared.metrics.connections.labels(self.listener.name).inc()
        der = tls.get_extra_info("ssl_object").getpeercert(binary_form=True)
        try:
            self.peer = peer_identity(end_entity_client(x509.load_der_x509_certificate(der)))
        except (ChainError, ValueError) as exc:
            self._deny(403, "identity", f"unusable client certificate identity: {exc}")
            return
        self.shared.registry.bind(self, self.peer.thumbprint)
        self.phase = Phase.HEAD
        self._head_timer = asyncio.get_running_loop().call_later(
            self.shared.limits.header_timeout_s, self._head_timeout
        )
        self._next_head_event()  # bytes that arrived while the handshake was finishing

    def _head_timeout(self) -> None:
        if self.phase is Phase.HEAD:
            self._deny(408, "header_timeout", "request head not received in time")

    # -- request head -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.phase is Phase.RELAYING:
            assert self.up is not None
            self.up.forward(data)
        elif self.phase is Phase.HEAD:
            self.parser.receive_data(data)
            self._next_head_event()
        elif self.phase is Phase.HANDSHAKE:
            # start_tls has finished but our coroutine has not resumed yet: keep the bytes
            # for the head parser; _tls_established parses them.
            self.parser.receive_data(data)
        # CONNECTING: reading is paused; anything racing in stays in the parser buffer.

    def _next_head_event(self) -> None:
        try:
            event = self.parser.next_event()
        except HTTPProxyError as exc:
            self._refuse(exc)
            return
        if isinstance(event, ProxyRequest):
            self._on_request(event)
        elif event is not NeedData.NEED_DATA:
            self.abort("client closed before sending a request")

    def _refuse(self, exc: HTTPProxyError) -> None:
        self._log_denial(int(exc.status), "bad_request", str(exc))
        self._send_and_close(error_response(exc))

    def _on_request(self, request: ProxyRequest) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self.destination = f"{request.host}:{request.port}"
        try:
            self.app = app_of(request)
        except HTTPProxyError as exc:
            self._refuse(exc)
            return
        if request.scheme == "https":
            self._deny(400, "unsupported", "use CONNECT for https:// destinations")
            return
        assert self.peer is not None
        decision = self.shared.gate.admit(self.peer, self.listener.mode, self.app)
        if not decision.admitted:
            reason = decision.reason.value if decision.reason else "denied"
            self._deny(decision.http_status, reason, decision.detail)
            return
        self.app = decision.app_bundle_id
        self.phase = Phase.CONNECTING
        assert self.transport is not None
        self.transport.pause_reading()
        self.shared.spawn(self._connect(request))

    # -- destination ------------------------------------------------------------------

    async def _connect(self, request: ProxyRequest) -> None:
        addresses = await self._resolve(request)
        if addresses is None:
            return
        verdict = evaluate(self.shared.gate.ruleset, request.host, request.port, addresses)
        if not verdict.allowed:
            rule = "default" if verdict.rule_index is None else f"rule {verdict.rule_index}"
            self._deny(
                403,
                "destination_denied",
                f"server traffic rules refuse {self.destination} ({rule}, {verdict.reason.value})",
            )
            return
        upstream = await self._open_upstream(addresses, request.port)
        if upstream is not None and self.phase is Phase.CONNECTING:
            self._start_relay(upstream, request)
        elif upstream is not None:
            upstream.abort()

    async def _resolve(
        self, request: ProxyRequest
    ) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(request.host, request.port, type=socket.SOCK_STREAM),
                self.shared.limits.resolve_timeout_s,
            )
        except TimeoutError:
            self._deny(504, "resolve_timeout", f"resolving {request.host} timed out")
            return None
        except OSError as exc:
            self._deny(502, "resolve_failed", f"cannot resolve {request.host}: {exc}")
            return None
        found = dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos)
        return list(found)

    async def _open_upstream(self, addresses: list[Any], port: int) -> asyncio.Transport | None:
        loop = asyncio.get_running_loop()
        last: str = "no address"
        for address in addresses:
            try:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(self._upstream_protocol, str(address), port),
                    self.shared.limits.connect_timeout_s,
                )
                return transport
            except TimeoutError:
                last = "timeout"
            except OSError as exc:
                last = exc.strerror or type(exc).__name__
        status = 504 if last == "timeout" else 502
        self._deny(
            status,
            "upstream_" + ("timeout" if status == 504 else "unreachable"),
            f"cannot connect to {self.destination}: {last}",
        )
        return None

    def _upstream_protocol(self) -> UpstreamProtocol:
        return UpstreamProtocol(
            self._from_upstream,
            self._upstream_eof,
            self._upstream_lost,
            self._pause_client,
            self._resume_client,
        )

    def _start_relay(self, upstream: asyncio.Transport, request: ProxyRequest) -> None:
        assert self.transport is not None and self.peer is not None
        self.upstream = upstream
        self.up, self.down = Pipe(self.transport, upstream), Pipe(upstream, self.transport)
        trailing = self.parser.trailing_data
        if request.method == "CONNECT":
            self.transport.write(response_head(200, "Connection established"))
        else:
            upstream.write(origin_request_head(request))
        if trailing:
            self.up.forward(trailing)
        self.phase = Phase.RELAYING
        self.shared.metrics.admissions.labels(self.listener.mode.value).inc()
        log.info(
            "admit device=%s thumbprint=%s app=%s dest=%s listener=%s",
            self.peer.identity.device_uid,
            self.peer.thumbprint,
            self.app or "-",
            self.destination,
            self.listener.name,
        )
        self.transport.resume_reading()

    # -- relay callbacks --------------------------------------------------------------

    def _from_upstream(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.down is not None:
            self.down.forward(data)

    def _upstream_eof(self) -> None:
        if self.down is not None:
            self.down.finish()

    def _upstream_lost(self, exc: Exception | None) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _pause_client(self) -> None:
        if self.up is not None:
            self.up.pause()

    def _resume_client(self) -> None:
        if self.up is not None:
            self.up.resume()

    def pause_writing(self) -> None:
        if self.down is not None:
            self.down.pause()

    def resume_writing(self) -> None:
        if self.down is not None:
            self.down.resume()

    def eof_received(self) -> bool:
        # TLS has no half-close: the client's close_notify ends the connection (returning
        # True would be ignored by asyncio's SSL transport, with a warning).
        if self.phase is Phase.RELAYING and self.up is not None:
            self.up.finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.close()
        self._closed()

    # -- endings ----------------------------------------------------------------------

    def _deny(self, status: int, reason: str, detail: str) -> None:
        self._log_denial(status, reason, detail)
        body = f"certgate: {reason}\n".encode()
        head = response_head(
            status,
            headers=[
                ("Content-Type", "text/plain"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ],
        )
        self._send_and_close(head + body)

    def _log_denial(self, status: int, reason: str, detail: str) -> None:
        peer = self.peer
        self.shared.metrics.denials.labels(self.listener.mode.value, reason).inc()
        log.warning(
            "deny device=%s thumbprint=%s app=%s dest=%s listener=%s status=%d reason=%s detail=%s",
            peer.identity.device_uid if peer else "-",
            peer.thumbprint if peer else "-",
            self.app or "-",
            self.destination,
            self.listener.name,
            status,
            reason,
            detail,
        )

    def _send_and_close(self, data: bytes) -> None:
        self.phase = Phase.CLOSED
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self.transport.close()

    def abort(self, reason: str) -> None:
        """Drop the connection at once (policy change, shutdown, limits)."""
        if self.phase is not Phase.CLOSED:
            log.info(
                "close device=%s thumbprint=%s app=%s dest=%s reason=%s",
                self.peer.identity.device_uid if self.peer else "-",
                self.peer.thumbprint if self.peer else "-",
                self.app or "-",
                self.destination,
                reason,
            )
        self.phase = Phase.CLOSED
        for transport in (self.transport, self.upstream):
            if transport is not None:
                transport.abort()

    def _closed(self) -> None:
        if self in self.shared.registry.all:
            self.shared.registry.remove(self)
            self.shared.metrics.active.labels(self.listener.name).dec()
            self._fold_counters()
        self.phase = Phase.CLOSED
        if self._head_timer is not None:
            self._head_timer.cancel()

    def _fold_counters(self) -> None:
        if self.up is not None and self.down is not None:
            self.shared.metrics.bytes.labels("up").inc(self.up.bytes)
            self.shared.metrics.bytes.labels("down").inc(self.down.bytes)


def end_entity_client(cert: x509.Certificate) -> x509.Certificate:
    """OpenSSL accepts a CA:TRUE leaf or one without EKU; a device certificate is neither."""
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise ChainError("client certificate is a CA certificate (CA:TRUE)")
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise ChainError(f"client certificate lacks {exc.oid._name}") from exc
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise ChainError("client certificate is not for clientAuth")
    return cert


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"client certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or str(exc)
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    return f"{type(exc).__name__}: {exc}"
