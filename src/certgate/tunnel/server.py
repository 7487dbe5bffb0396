"""The tunnel's data plane: the asyncio shell around the pure parts.

Two TLS listeners share one connection class: Proxy mode (default 2020, an HTTPS forward
proxy: ``CONNECT`` and absolute-form requests, app+device certificates) and Per-App
Tunnel (default 8443, ``CONNECT`` naming the app in ``Certgate-App``, device
certificates). Per connection:

    TCP accepted -> TLS handshake (client cert REQUIRED, verified against the Device Root)
    -> request head parsed (sans-IO ``HTTPProxyParser``) -> ``admit`` (pure) -> DNS (names
    only; an IP literal is used as it is) -> server traffic ``rules.evaluate`` (pure) ->
    upstream connect -> relay.

Live tunnels are judged again whenever what decided them changes (a feed batch touching
their certificate, a snapshot swap, a policy change, the table going stale, the
certificate expiring): ``Gate.judge`` makes the same two decisions as for a new
connection (``admit``, then ``rules.evaluate`` on the same addresses), so a rule can never
refuse new connections while leaving live ones open. A tunnel closed by policy ends with
a TCP reset (no close_notify), so its client sees an error (curl: exit 56, "Connection
reset by peer"), never a close_notify it could take for a complete response (what each
client observes, also behind HAProxy: docs/CONVENTIONS.md).

The shell is callbacks on socket readiness (``sockets.Watched``), not asyncio transports: the
accepted socket gets TLS from the listener's backend (``sockets.ServerTLS``: Python's
``ssl`` or pyOpenSSL) and its handshake is driven here, so a failed handshake (expired,
wrong CA, self-signed, no certificate) is caught and logged with its reason, the same on
both backends, and connection limits apply before any cryptography is spent. It runs
unchanged on the stdlib loop and on uvloop. Every denial is logged with device,
thumbprint, app, destination and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from certgate import logs
from certgate.errors import BadRequest, ChainError
from certgate.feed import PolicyUpdate
from certgate.protocol.datagram import TRANSPORT_HEADER
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
from certgate.tunnel import kdcproxy
from certgate.tunnel.admission import (
    AdmissionRequest,
    Decision,
    Mode,
    PeerIdentity,
    admit,
    peer_identity,
)
from certgate.tunnel.cascade import BackEndHop, Cascade, HopRefused, Role
from certgate.tunnel.metrics import ListenerMetrics, TunnelMetrics
from certgate.tunnel.relay import BufferPool, Pump
from certgate.tunnel.rules import RuleDecision, RuleSet, Transport, evaluate
from certgate.tunnel.sockets import (
    TLS_MAX_PLAINTEXT,
    Dialer,
    End,
    HandshakeClosed,
    HandshakeRefused,
    IPAddress,
    ServerTLS,
    TLSBlocked,
    TLSEnd,
    Want,
    ip_literal,
)
from certgate.tunnel.table import TableView
from certgate.tunnel.udp import UDPLimits, UDPRelay

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
    udp: UDPLimits = field(default_factory=UDPLimits)


class TableSource(Protocol):
    """What the data plane needs from sync: the table, the policy and their freshness."""

    @property
    def table(self) -> TableView: ...

    @property
    def policy(self) -> PolicyUpdate: ...

    def is_fresh(self, now: float | None = None) -> bool: ...


@dataclass(frozen=True, slots=True)
class Route:
    """Where an admitted tunnel goes: the request's host and port, and the addresses the
    rules were evaluated on (and connected to)."""

    host: str
    port: int
    addresses: tuple[IPAddress, ...]
    transport: Transport = Transport.TCP


@dataclass(frozen=True, slots=True)
class Denial:
    status: int
    reason: str
    detail: str


@dataclass
class Gate:
    """Policy of one tunnel group: who is admitted, where traffic may go. Every decision
    about a connection, new or live, is made here."""

    group_id: str
    source: TableSource
    clock: Callable[[], float] = time.time
    cascade: Cascade | None = None  # None: a standalone node (tunnel.cascade)

    @property
    def role(self) -> Role:
        return Role.STANDALONE if self.cascade is None else self.cascade.role

    @property
    def ruleset(self) -> RuleSet:
        return self.source.policy.server_rules

    def admit(self, peer: PeerIdentity, mode: Mode, app: str | None) -> Decision:
        entry = self.source.table.lookup(peer.thumbprint)
        request = AdmissionRequest(table_fresh=self.source.is_fresh(), app_bundle_id=app)
        return admit(peer, entry, mode, request, self.clock(), self.group_id)

    def route(self, route: Route) -> Denial | None:
        verdict = evaluate(self.ruleset, route.host, route.port, route.addresses, route.transport)
        return None if verdict.allowed else destination_denial(verdict, route)

    def judge(
        self, peer: PeerIdentity, mode: Mode, app: str | None, route: Route | None
    ) -> Denial | None:
        """Would this tunnel be let through now? The decisions of a new connection."""
        decision = self.admit(peer, mode, app)
        if not decision.admitted:
            reason = decision.reason.value if decision.reason else "denied"
            return Denial(decision.http_status, reason, decision.detail)
        return None if route is None else self.route(route)


def destination_denial(verdict: RuleDecision, route: Route) -> Denial:
    rule = "default" if verdict.rule_index is None else f"rule {verdict.rule_index}"
    return Denial(
        403,
        "destination_denied",
        f"server traffic rules refuse {route.transport.value} to {route.host}:{route.port} "
        f"({rule}, {verdict.reason.value})",
    )


class Phase(Enum):
    HANDSHAKE = "handshake"
    HEAD = "head"
    CONNECTING = "connecting"
    RELAYING = "relaying"
    CLOSING = "closing"  # a final answer is being written, then the socket lingers
    CLOSED = "closed"


_ADMITTED_PHASES = frozenset({Phase.CONNECTING, Phase.RELAYING})


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

    def judged(self, thumbprints: tuple[str, ...] | None) -> list[ClientConnection]:
        """The admitted connections of ``thumbprints`` (None: all) that policy must judge."""
        if thumbprints is None:
            conns: list[ClientConnection] = list(self.all)
        else:
            conns = [c for tp in thumbprints for c in self.by_thumbprint.get(tp, ())]
        return [c for c in conns if c.phase in _ADMITTED_PHASES]

    def enforce(self, gate: Gate, thumbprints: tuple[str, ...] | None, cause: str) -> int:
        """Judge the admitted connections again; close those now denied. Returns how many."""
        closed = 0
        for conn in self.judged(thumbprints):
            denial = conn.judge(gate)
            if denial is not None:
                conn.close_by_policy(denial, cause)
                closed += 1
        return closed


@dataclass
class Listener:
    """One listening mode of the shared data plane."""

    mode: Mode
    tls: ServerTLS
    name: str


class PeerCache:
    """Verified leaf (DER) -> ``PeerIdentity``: a returning device is not parsed again.

    The identity is a pure function of the certificate bytes, so caching it changes no
    decision; admission still looks the thumbprint up in the live table every time.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._known: dict[bytes, PeerIdentity] = {}

    def identity(self, der: bytes) -> PeerIdentity:
        peer = self._known.get(der)
        if peer is None:
            peer = peer_identity(end_entity_client(x509.load_der_x509_certificate(der)))
            if len(self._known) >= self.size:
                del self._known[next(iter(self._known))]
            self._known[der] = peer
        return peer


class Shared:
    """What every connection of a server shares."""

    def __init__(self, gate: Gate, limits: Limits, metrics: TunnelMetrics) -> None:
        self.gate, self.limits, self.metrics = gate, limits, metrics
        self.registry = Registry()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.pool = BufferPool()
        self.peers = PeerCache()
        self.head_buffer = bytearray(TLS_MAX_PLAINTEXT)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # Keep a reference: a bare task can be garbage-collected while still pending.
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def accept_client(shared: Shared, listener: Listener, sock: socket.socket, address: Any) -> None:
    """A new TCP connection: refused past the limit, else its TLS handshake starts."""
    peer_addr = f"{address[0]}:{address[1]}" if address else "?"
    if len(shared.registry.all) >= shared.limits.max_connections:
        log.warning(
            "refuse %s: connection limit %d reached",
            peer_addr,
            shared.limits.max_connections,
            extra=logs.event("refuse", reason="connection_limit", peer=peer_addr),
        )
        shared.metrics.denials.labels(listener.mode.value, "connection_limit").inc()
        sock.close()
        return
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = listener.tls.accept(asyncio.get_running_loop(), sock)
    except OSError as exc:  # reset before we got to it
        log.info("%s closed before the TLS handshake (%s)", peer_addr, exc)
        sock.close()
        return
    ClientConnection(shared, listener, tls, peer_addr).start()


LINGER_S = 2.0  # after a final answer: read and drop what the client still sends
LINGER_MAX_BYTES = 1024 * 1024


class ClientConnection:
    """One client: TLS, one request head, then a relay to one destination."""

    def __init__(self, shared: Shared, listener: Listener, tls: TLSEnd, peer_addr: str) -> None:
        self.shared, self.listener = shared, listener
        self.stats: ListenerMetrics = shared.metrics.listener(listener.name, listener.mode.value)
        self.loop = asyncio.get_running_loop()
        self.phase = Phase.HANDSHAKE
        self.client = tls
        self.upstream: End | None = None
        self.peer: PeerIdentity | None = None
        self.mode = listener.mode  # a back end takes it from its front end's request
        self.peer_addr = peer_addr
        self.destination = "-"
        self.app: str | None = None
        self.requested_app: str | None = None  # the app the request named (admission input)
        self.route: Route | None = None
        self.transport = Transport.TCP
        self.udp: UDPRelay | None = None
        self.admitted_at: float | None = None  # wall clock, for live tunnel reports
        self.parser = HTTPProxyParser(max_header_bytes=shared.limits.max_header_bytes)
        self.up: Pump | None = None
        self.down: Pump | None = None
        self.opened = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._dialer: Dialer | None = None
        self._hop: BackEndHop | None = None  # a front end's hop to its back end
        self._final = memoryview(b"")
        self._lingered = 0

    @property
    def last_activity(self) -> float:
        if self.udp is not None:
            return self.udp.touched
        if self.up is None or self.down is None:
            return self.opened
        return max(self.up.touched, self.down.touched)

    def start(self) -> None:
        self.shared.registry.add(self)
        self.stats.active += 1
        self._arm(self.shared.limits.handshake_timeout_s, self._handshake_timed_out)
        self._handshake()

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` after ``seconds`` unless re-armed or disarmed first."""
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _retry_when_ready(self, blocked: TLSBlocked, step: Callable[[], None]) -> None:
        """Run ``step`` again once the client socket is ready for what OpenSSL wants."""
        self.client.watched.wait(blocked.want, step)

    # -- TLS --------------------------------------------------------------------------

    def _handshake(self) -> None:
        if self.phase is not Phase.HANDSHAKE:
            return
        try:
            self.client.handshake()
        except TLSBlocked as blocked:
            self._retry_when_ready(blocked, self._handshake)
        except HandshakeClosed as exc:
            # A TCP probe (load balancer health check, port scan) closing before or during
            # the handshake: not a certificate decision, so not a denial.
            log.info("%s closed during the TLS handshake (%s)", self.peer_addr, exc)
            self._drop()
        except HandshakeRefused as exc:
            self._refuse_handshake(exc.reason)
        else:
            self._tls_established()

    def _handshake_timed_out(self) -> None:
        if self.phase is Phase.HANDSHAKE:
            self._refuse_handshake("handshake timed out")

    def _refuse_handshake(self, detail: str) -> None:
        log.warning(
            "deny %s listener=%s reason=tls_handshake detail=%s",
            self.peer_addr,
            self.listener.name,
            detail,
            extra=logs.event(
                "deny",
                reason="tls_handshake",
                peer=self.peer_addr,
                listener=self.listener.name,
                detail=detail,
            ),
        )
        self.stats.handshake_denials.inc()
        self._drop()

    def _tls_established(self) -> None:
        self.stats.connections += 1
        der = self.client.peer_der()
        try:
            if der is None:
                raise ChainError("no client certificate")
            if self.shared.gate.cascade is not None and self.shared.gate.role is Role.BACK_END:
                self.shared.gate.cascade.check_peer(der)  # the device comes with the request
            else:
                self.peer = self.shared.peers.identity(der)
                self.shared.registry.bind(self, self.peer.thumbprint)
        except (ChainError, ValueError) as exc:
            self._deny(403, "identity", f"unusable client certificate identity: {exc}")
            return
        self.phase = Phase.HEAD
        self._arm(self.shared.limits.header_timeout_s, self._head_timed_out)
        self._read_head()  # the head often arrives with the client's Finished

    def _head_timed_out(self) -> None:
        if self.phase is Phase.HEAD:
            self._deny(408, "header_timeout", "request head not received in time")

    # -- request head -----------------------------------------------------------------

    def _read_head(self) -> None:
        if self.phase is not Phase.HEAD:
            return
        buffer = self.shared.head_buffer  # one record at most: nothing stays inside OpenSSL
        try:
            n = self.client.recv_once(memoryview(buffer))
        except TLSBlocked as blocked:
            self._retry_when_ready(blocked, self._read_head)
            return
        except OSError as exc:
            self.abort(f"client connection failed before its request: {exc}")
            return
        self.parser.receive_data(bytes(buffer[:n]))
        self._next_head_event()

    def _next_head_event(self) -> None:
        try:
            event = self.parser.next_event()
        except HTTPProxyError as exc:
            self._refuse(exc)
            return
        if isinstance(event, ProxyRequest):
            self._on_request(event)
        elif event is NeedData.NEED_DATA:
            self.client.watched.wait(Want.READ, self._read_head)
        else:
            self.abort("client closed before sending a request")

    def _refuse(self, exc: HTTPProxyError) -> None:
        self._log_denial(int(exc.status), "bad_request", str(exc))
        self._send_and_close(error_response(exc))

    def _on_request(self, request: ProxyRequest) -> None:
        self._disarm()
        self.destination = f"{request.host}:{request.port}"
        try:
            self.app = self.requested_app = app_of(request)
        except HTTPProxyError as exc:
            self._refuse(exc)
            return
        if request.scheme == "https":
            self._deny(400, "unsupported", "use CONNECT for https:// destinations")
            return
        transport = transport_of(request)
        if transport is None:
            self._deny(400, "unsupported", f"{TRANSPORT_HEADER} must be tcp, or udp on a CONNECT")
            return
        self.transport = transport
        if not self._take_device(request):
            return
        assert self.peer is not None
        decision = self.shared.gate.admit(self.peer, self.mode, self.app)
        if not decision.admitted:
            reason = decision.reason.value if decision.reason else "denied"
            self._deny(decision.http_status, reason, decision.detail)
            return
        self.app = decision.app_bundle_id
        self.phase = Phase.CONNECTING
        self.admitted_at = time.time()
        if self.shared.gate.role is Role.FRONT_END:  # the back end serves or dials, KDCs too
            if request.host == kdcproxy.KDC_PROXY_HOST:
                self.shared.spawn(self._hop_kdc_request(request))
            else:
                self._hop_to_back_end(request)
            return
        if request.host == kdcproxy.KDC_PROXY_HOST:  # served here, never dialed
            self.shared.spawn(self._serve_kdc())
            return
        literal = ip_literal(request.host)
        if literal is None:
            self.shared.spawn(self._resolve_then_route(request))
        else:
            self._route(request, [literal])

    def _take_device(self, request: ProxyRequest) -> bool:
        """A back end's client is a front end: the device, whose tunnel this is, comes in
        the request (tunnel.cascade). Elsewhere the device is the TLS client itself."""
        cascade = self.shared.gate.cascade
        if cascade is None or cascade.role is not Role.BACK_END:
            return True
        try:
            der, self.mode = cascade.device_of(request.headers)
            self.peer = self.shared.peers.identity(der)
        except BadRequest as exc:  # Client-Cert malformed, mode missing
            self._deny(400, "bad_request", f"front end request: {exc}")
            return False
        except (ChainError, ValueError) as exc:
            self._deny(403, "identity", f"device certificate from the front end: {exc}")
            return False
        self.shared.registry.bind(self, self.peer.thumbprint)
        return True

    def _hop_to_back_end(self, request: ProxyRequest, early: bytes | None = None) -> None:
        """A front end reaches no destination itself: the back end resolves, applies the
        server traffic rules and dials (tunnel.cascade). ``early``: the device's bytes
        past its head, already read, sent with the hop's head rather than after the back
        end's answer (a KDC request, which the back end answers only once it has it)."""
        cascade = self.shared.gate.cascade
        der = self.client.peer_der()
        assert cascade is not None and der is not None
        head = cascade.connect_head(
            request.host, request.port, self.requested_app, self.transport, self.mode, der
        )
        upward = None if early is None else b""  # the early bytes are not sent twice
        self._hop = BackEndHop(
            self.loop,
            cascade,
            head + (early or b""),
            self.shared.limits.connect_timeout_s,
            lambda upstream, leftover: self._hopped(upstream, request, leftover, upward),
            self._hop_refused,
        )
        self._hop.start()

    async def _hop_kdc_request(self, request: ProxyRequest) -> None:
        """The device's KDC request frame, read whole here (bounded like the exchange),
        then carried with the hop's head: the back end asks the KDCs, never this node."""
        try:
            early = await kdcproxy.read_request(self.client, self.parser.trailing_data)
        except kdcproxy.KDCProxyError as exc:
            if self.phase is Phase.CONNECTING:  # not closed meanwhile (policy, shutdown)
                self._deny(exc.status, exc.reason, exc.detail)
            return
        if self.phase is Phase.CONNECTING:
            self._hop_to_back_end(request, early)

    def _hopped(
        self, upstream: End, request: ProxyRequest, leftover: bytes, upward: bytes | None
    ) -> None:
        self._hop = None
        self.upstream = upstream
        self._start_relay(upstream, request, leftover, upward)

    def _hop_refused(self, refused: HopRefused) -> None:
        self._hop = None
        self._deny(refused.status, refused.reason, refused.detail)

    # -- destination ------------------------------------------------------------------

    async def _resolve_then_route(self, request: ProxyRequest) -> None:
        try:
            infos = await asyncio.wait_for(
                self.loop.getaddrinfo(request.host, request.port, type=socket.SOCK_STREAM),
                self.shared.limits.resolve_timeout_s,
            )
        except (TimeoutError, OSError) as exc:
            if self.phase is Phase.CONNECTING:  # not closed meanwhile (policy, shutdown)
                self._resolve_failed(request.host, exc)
            return
        if self.phase is Phase.CONNECTING:
            found = dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos)
            self._route(request, list(found))

    def _resolve_failed(self, host: str, exc: Exception) -> None:
        if isinstance(exc, TimeoutError):
            self._deny(504, "resolve_timeout", f"resolving {host} timed out")
        else:
            self._deny(502, "resolve_failed", f"cannot resolve {host}: {exc}")

    def _route(self, request: ProxyRequest, addresses: list[IPAddress]) -> None:
        route = Route(request.host, request.port, tuple(addresses), self.transport)
        denial = self.shared.gate.route(route)
        if denial is not None:
            self._deny(denial.status, denial.reason, denial.detail)
            return
        self.route = route
        if route.transport is Transport.UDP:
            self._start_udp(route)
            return
        self._dialer = Dialer(
            self.loop,
            addresses,
            request.port,
            self.shared.limits.connect_timeout_s,
            lambda upstream: self._dialed(upstream, request),
            self._dial_failed,
        )
        self._dialer.start()

    def _dialed(self, upstream: End, request: ProxyRequest) -> None:
        self._dialer = None
        self.upstream = upstream
        self._start_relay(upstream, request)

    def _dial_failed(self, error: str) -> None:
        self._dialer = None
        timeout = error == "timeout"
        self._deny(
            504 if timeout else 502,
            "upstream_timeout" if timeout else "upstream_unreachable",
            f"cannot connect to {self.destination}: {error}",
        )

    def _start_relay(
        self,
        upstream: End,
        request: ProxyRequest,
        downstream: bytes = b"",
        upward: bytes | None = None,
    ) -> None:
        """``downstream``: what the upstream already sent (a back end's first tunnel bytes);
        ``upward``: what to send it first, if not the client's bytes past its head."""
        assert self.peer is not None
        pool = self.shared.pool
        self.up = Pump(self.client, upstream, pool, self._pump_ended)
        self.down = Pump(upstream, self.client, pool, self._pump_ended)
        trailing = self.parser.trailing_data if upward is None else upward
        if request.method == "CONNECT":
            self.down.preload(response_head(200, "Connection established") + downstream)
            self.up.preload(trailing)
        else:
            self.down.preload(downstream)
            self.up.preload(origin_request_head(request) + trailing)
        self.phase = Phase.RELAYING
        self.stats.admissions += 1
        self._log_admission()
        self.down.begin()
        self.up.begin()

    def _start_udp(self, route: Route) -> None:
        self.udp = UDPRelay(
            self.client, route.addresses[0], route.port, self.shared.limits.udp, self._udp_ended
        )
        self.phase = Phase.RELAYING
        self.stats.admissions += 1
        self._log_admission()
        self.udp.start(response_head(200, "Connection established"), self.parser.trailing_data)

    async def _serve_kdc(self) -> None:
        """One MS-KKDCP exchange for this admitted device (tunnel/kdcproxy.py)."""
        policy = self.shared.gate.source.policy
        try:
            realm, answer = await kdcproxy.serve(
                self.client, self.parser.trailing_data, policy.kerberos, self._kdc_refusal
            )
        except kdcproxy.KDCProxyError as exc:
            if self.phase is Phase.CONNECTING:  # not closed meanwhile (policy, shutdown)
                self._deny(exc.status, exc.reason, exc.detail)
            return
        if self.phase is Phase.CONNECTING:
            self.destination = f"kdc:{realm}"
            self.stats.admissions += 1
            self._log_admission()
            self._send_and_close(response_head(200, "Connection established") + answer)

    def _kdc_refusal(
        self, kdc: kdcproxy.KDCAddress, addresses: tuple[IPAddress, ...]
    ) -> str | None:
        denial = self.shared.gate.route(Route(kdc.host, kdc.port, addresses, kdc.transport))
        return None if denial is None else denial.detail

    def _udp_ended(self, error: str | None) -> None:
        if self.phase is not Phase.RELAYING:
            return
        if error is not None:
            self.abort(f"udp tunnel: {error}")
            return
        if not self.client.ragged:
            self._close_notify()
        self._drop()

    def _log_admission(self) -> None:
        assert self.peer is not None
        log.info(
            "admit device=%s thumbprint=%s app=%s dest=%s transport=%s listener=%s",
            self.peer.identity.device_uid,
            self.peer.thumbprint,
            self.app or "-",
            self.destination,
            self.transport.value,
            self.listener.name,
            extra=self._event("admit", None, transport=self.transport.value),
        )

    def _pump_ended(self, pump: Pump, error: OSError | None) -> None:
        if self.phase is not Phase.RELAYING:
            return
        if error is not None:
            side = "client" if pump is self.up else "upstream"
            log.debug("relay %s: %s connection failed: %s", self.destination, side, error)
            self._drop()
            return
        # Either side's end of stream ends the tunnel (TLS has no half-close here); what
        # the other side still had in flight is dropped with it.
        if not self.client.ragged:
            self._close_notify()
        self._drop()

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
            extra=self._event("deny", reason, status=status, detail=detail),
        )

    def _event(self, name: str, reason: str | None, **more: object) -> dict[str, object]:
        """The structured fields of this connection's log lines (certgate.logs)."""
        peer = self.peer
        return logs.event(
            name,
            reason=reason,
            device_uid=peer.identity.device_uid if peer else None,
            thumbprint=peer.thumbprint if peer else None,
            app=self.app,
            destination=None if self.destination == "-" else self.destination,
            listener=self.listener.name,
            peer=self.peer_addr,
            **more,
        )

    def _send_and_close(self, data: bytes) -> None:
        """Write a final answer, send close_notify, then linger so the answer is read.

        Closing a socket with unread input makes the kernel send a reset, which can
        destroy the answer before the client reads it; so the write side is shut and
        what still arrives is read and dropped, for at most ``LINGER_S``.
        """
        if self.phase in (Phase.CLOSING, Phase.CLOSED):
            return
        self.phase = Phase.CLOSING
        self._final = memoryview(data)
        self._arm(LINGER_S, self._drop)
        self._write_final()

    def _write_final(self) -> None:
        if self.phase is not Phase.CLOSING:
            return
        try:
            while self._final:  # until all of it is taken, or want-write
                self._final = self._final[self.client.send_once(self._final) :]
        except TLSBlocked as blocked:
            self._retry_when_ready(blocked, self._write_final)
            return
        except OSError:
            self._drop()
            return
        self._close_notify()
        try:
            self.client.shutdown_write()  # from here on the socket is plain TCP
        except OSError:
            self._drop()
            return
        self._linger()

    def _linger(self) -> None:
        if self.phase is not Phase.CLOSING:
            return
        try:
            while data := self.client.drain(65536):
                self._lingered += len(data)
                if self._lingered > LINGER_MAX_BYTES:
                    break
            else:
                self._drop()  # the client closed: done
                return
        except (BlockingIOError, InterruptedError):
            self.client.watched.wait(Want.READ, self._linger)
            return
        except OSError:
            pass
        self._drop()

    def _close_notify(self) -> None:
        """Send TLS close_notify, best effort: never wait for the client's."""
        self.client.close_notify()

    def judge(self, gate: Gate) -> Denial | None:
        """The gate's verdict on this admitted connection now."""
        assert self.peer is not None  # admitted connections have a peer
        return gate.judge(self.peer, self.mode, self.requested_app, self.route)

    def close_by_policy(self, denial: Denial, cause: str) -> None:
        """Close an admitted tunnel that policy now refuses: logged like a denial, with the
        rule or reason, and ended by a TCP reset so the client sees an error."""
        peer = self.peer
        self.shared.metrics.closed_by_policy.labels(self.listener.mode.value, denial.reason).inc()
        log.warning(
            "close device=%s thumbprint=%s app=%s dest=%s listener=%s reason=%s cause=%s detail=%s",
            peer.identity.device_uid if peer else "-",
            peer.thumbprint if peer else "-",
            self.app or "-",
            self.destination,
            self.listener.name,
            denial.reason,
            cause,
            denial.detail,
            extra=self._event("close", denial.reason, cause=cause, detail=denial.detail),
        )
        with contextlib.suppress(OSError):
            self.client.reset_on_close()
        self._drop()

    def abort(self, reason: str) -> None:
        """Drop the connection at once (shutdown, limits, a failed client)."""
        if self.phase is not Phase.CLOSED:
            log.info(
                "close device=%s thumbprint=%s app=%s dest=%s reason=%s",
                self.peer.identity.device_uid if self.peer else "-",
                self.peer.thumbprint if self.peer else "-",
                self.app or "-",
                self.destination,
                reason,
                extra=self._event("close", reason),
            )
        self._drop()

    def _drop(self) -> None:
        """Close both sockets now and forget the connection (idempotent)."""
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self._disarm()
        if self._dialer is not None:
            self._dialer.cancel()
        if self._hop is not None:
            self._hop.cancel()
        if self.udp is not None:
            self.udp.close()
        for end in (self.client, self.upstream):
            if end is not None:
                end.watched.close()
                end.sock.close()
        if self in self.shared.registry.all:
            self.shared.registry.remove(self)
            self.stats.active -= 1
        self._fold_counters()

    def _fold_counters(self) -> None:
        if self.udp is not None:
            self.stats.bytes_up += self.udp.bytes_up
            self.stats.bytes_down += self.udp.bytes_down
        if self.up is not None and self.down is not None:
            self.up.release()
            self.down.release()
            self.stats.bytes_up += self.up.bytes
            self.stats.bytes_down += self.down.bytes


def transport_of(request: ProxyRequest) -> Transport | None:
    """TCP unless the request names ``udp`` (CONNECT only); None for anything else."""
    named = request.headers.get(TRANSPORT_HEADER.lower())
    if named is None or named.strip().lower() == "tcp":
        return Transport.TCP
    if named.strip().lower() == "udp" and request.method == "CONNECT":
        return Transport.UDP
    return None


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
