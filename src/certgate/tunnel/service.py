"""A running tunnel: its listeners, the sweeper, enforcement of feed and policy changes, the
admin endpoint (``/healthz``, ``/livez``, ``/metrics``) and a graceful drain on shutdown.

Enforcement: every ``FeedChange`` makes the registry judge the affected live tunnels again
through the gate (``Registry.enforce``); the sweeper does the same for every live tunnel
when the table turns stale and for a tunnel whose certificate has expired. Listener ports
are policy too, but a socket cannot move: when the policy names other ports than the ones
this node took from it, ``/healthz`` and ``certgate_tunnel_restart_required`` say so. What
the node bound is also recorded in its state directory (``LISTENERS_FILE``), so that
``certgate tunnel status`` says it too (``moved_ports``, the one home of that decision)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h11
from cryptography import x509
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from certgate.addresses import ListenAddress
from certgate.feed import PolicyUpdate
from certgate.httperrors import classify
from certgate.pki import expiry
from certgate.pki.keys import PrivateKey
from certgate.tlsconf import ClientAuth, pyopenssl_server_context, server_context
from certgate.tunnel.admission import Mode
from certgate.tunnel.metrics import TunnelMetrics
from certgate.tunnel.persist import atomic_write
from certgate.tunnel.rules import Transport
from certgate.tunnel.server import Gate, Limits, Listener, Phase, Shared, accept_client
from certgate.tunnel.sockets import Acceptor, PyOpenSSLServerTLS, ServerTLS, StdlibServerTLS
from certgate.tunnel.sync import FeedChange

log = logging.getLogger("certgate.tunnel")
SWEEP_INTERVAL_S = 1.0
ADMIN_MAX_REQUEST = 8 * 1024
# TLS 1.3 session tickets sent after a full handshake. OpenSSL's default is 2; each ticket
# after the first makes OpenSSL 3.0 copy the session through i2d/d2i, which re-decodes the
# client certificate (about 0.1 ms a connection here, bench/FINDINGS.md). One is what a
# client resuming one connection at a time needs (every resumption brings a new ticket),
# and RFC 8446 appendix C.4 asks clients to use each ticket once. The ``ssl`` backend only:
# pyOpenSSL cannot set the number (bench/FINDINGS.md).
TLS13_TICKETS = 1
TLS_BACKENDS = ("pyopenssl", "ssl")
DEFAULT_TLS_BACKEND = "pyopenssl"  # faster handshakes (OpenSSL 4 against 3.0): bench/FINDINGS.md
SESSION_ID_CONTEXT = b"certgate-tunnel-data-plane"


Endpoint = ListenAddress  # the data plane's name for a listen address
LISTENERS_FILE = "listeners.json"


@dataclass(frozen=True, slots=True)
class BoundListeners:
    """The ports a node bound (name -> port), and which of them it took from the group
    policy (name -> the policy's key) rather than from a flag."""

    bound: dict[str, int]
    from_policy: dict[str, str]

    def save(self, state_dir: Path) -> None:
        atomic_write(state_dir / LISTENERS_FILE, json.dumps(asdict(self)).encode())

    @classmethod
    def load(cls, state_dir: Path) -> BoundListeners | None:
        """What the node recorded when it last started; None if it never did (or the
        record is unreadable: then nothing is claimed about restarts)."""
        try:
            raw = json.loads((state_dir / LISTENERS_FILE).read_bytes())
            return cls(
                {str(k): int(v) for k, v in raw["bound"].items()},
                {str(k): str(v) for k, v in raw["from_policy"].items()},
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


def moved_ports(
    bound: Mapping[str, int], from_policy: Mapping[str, str], policy: PolicyUpdate
) -> list[str]:
    """Listeners whose port the policy moved since the node bound them: a socket cannot
    move, so following the policy takes a restart."""
    return [
        f"{name} listens on {bound[name]}, policy says {getattr(policy, key)}"
        for name, key in sorted(from_policy.items())
        if name in bound and bound[name] != getattr(policy, key)
    ]


@dataclass
class TunnelService:
    gate: Gate
    tls: ServerTLS
    proxy: Endpoint | None
    per_app: Endpoint | None
    admin: Endpoint | None = None
    limits: Limits = field(default_factory=Limits)
    status: Any = None  # callable returning the sync status dict, for /healthz
    metrics: TunnelMetrics = field(default_factory=TunnelMetrics)
    servers: list[Acceptor | asyncio.Server] = field(default_factory=list)
    bound: dict[str, int] = field(default_factory=dict)
    # Listeners whose port came from the policy (not pinned by a flag): name -> policy key.
    ports_from_policy: dict[str, str] = field(default_factory=dict)
    reuse_port: bool = False  # a worker process: the port is shared (tunnel.workers)

    def __post_init__(self) -> None:
        self.shared = Shared(self.gate, self.limits, self.metrics)
        self._sweeper: asyncio.Task[None] | None = None
        self._listeners: list[Listener] = []
        self._was_fresh = self.gate.source.is_fresh()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for name, mode, endpoint in (
            ("proxy", Mode.PROXY, self.proxy),
            ("per_app", Mode.PER_APP, self.per_app),
        ):
            if endpoint is None:
                continue
            listener = Listener(mode, self.tls, name)
            self._listeners.append(listener)
            acceptor = Acceptor.listen(
                loop,
                endpoint.host,
                endpoint.port,
                lambda sock, addr, listener=listener: accept_client(  # type: ignore[misc]
                    self.shared, listener, sock, addr
                ),
                reuse_port=self.reuse_port,
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

    def swap_tls(self, tls: ServerTLS) -> None:
        """Serve new connections with ``tls`` (built aside by the caller); connections
        open now keep the context they were accepted with, so none is closed."""
        self.tls = tls
        for listener in self._listeners:
            listener.tls = tls
        self.metrics.identity_swaps.inc()

    def on_change(self, change: FeedChange) -> None:
        """Feed callback: judge the live tunnels the change concerns; close the refused."""
        closed = self.shared.registry.enforce(self.gate, change.thumbprints, change.cause)
        if closed and change.signed_at is not None:
            self.metrics.enforce_seconds.observe(max(0.0, time.time() - change.signed_at))
        if change.cause == "policy":
            self._note_restart_required()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.sweep(time.monotonic(), time.time())

    def sweep(self, now: float, wall: float) -> None:
        """Once a second: idle tunnels, staleness, expired certificates, buffers, gauges."""
        self._close_idle(now)
        fresh = self.gate.source.is_fresh()
        if self._was_fresh and not fresh:
            self.shared.registry.enforce(self.gate, None, "stale")
        self._was_fresh = fresh
        expired = tuple(
            {
                conn.peer.thumbprint
                for conn in self.shared.registry.all
                if conn.peer is not None and conn.peer.not_after <= wall
            }
        )
        if expired:
            self.shared.registry.enforce(self.gate, expired, "expiry")
        self.shared.pool.trim()
        self._refresh_gauges()

    def _close_idle(self, now: float) -> None:
        limit = self.limits.idle_timeout_s
        for conn in list(self.shared.registry.all):
            if now - conn.last_activity > limit:
                conn.abort(f"idle for more than {limit:g}s")

    def restart_required(self) -> list[str]:
        """Listeners whose port the policy moved since this node bound them."""
        return moved_ports(self.bound, self.ports_from_policy, self.gate.source.policy)

    def record_listeners(self, state_dir: Path) -> None:
        """Record what ``start`` bound, for ``certgate tunnel status``."""
        BoundListeners(dict(self.bound), dict(self.ports_from_policy)).save(state_dir)

    def _note_restart_required(self) -> None:
        for problem in self.restart_required():
            log.warning("restart required to follow the group policy: %s", problem)

    def live_tunnels(self) -> list[dict[str, Any]]:
        """The admitted tunnels now, as the node reports them to the console (dry-run)."""
        tunnels = []
        for conn in self.shared.registry.all:
            if conn.phase not in (Phase.CONNECTING, Phase.RELAYING) or conn.peer is None:
                continue
            route = conn.route
            # "transport" only for UDP: a report of TCP tunnels stays what it was.
            udp = {"transport": "udp"} if route and route.transport is Transport.UDP else {}
            tunnels.append(
                {
                    **udp,
                    "thumbprint": conn.peer.thumbprint,
                    "device_uid": conn.peer.identity.device_uid,
                    "mode": conn.listener.mode.value,
                    "app": conn.requested_app,
                    "host": route.host if route else None,
                    "port": route.port if route else None,
                    "addresses": [str(a) for a in route.addresses] if route else [],
                    "since": conn.admitted_at,
                }
            )
        return tunnels

    def _refresh_gauges(self) -> None:
        table = self.gate.source.table
        self.metrics.table_entries.set(len(table))
        self.metrics.table_seq.set(table.seq)
        self.metrics.table_fresh.set(1 if self.gate.source.is_fresh() else 0)
        self.metrics.policy_version.set(self.gate.source.policy.version)
        self.metrics.restart_required.set(1 if self.restart_required() else 0)
        status = self.status() if self.status else {}
        if "age_s" in status and status["age_s"] is not None:
            self.metrics.table_age.set(status["age_s"])
        for cert in status.get("certificates", []):
            self.metrics.certificate_expiry.labels(cert["name"]).set(cert["expires_in_s"])
            self.metrics.renewal_due.labels(cert["name"]).set(1 if cert["renewal_due"] else 0)

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
        sync: dict[str, Any] | None = self.status() if self.status else None
        action = (sync or {}).get("action_required")  # the node cannot recover by itself
        warnings = renewal_warnings(sync or {}) + ([action] if action else [])
        body = {
            "status": "ok" if fresh else "stale",
            "group_id": self.gate.group_id,
            "table_entries": len(self.gate.source.table),
            "table_seq": self.gate.source.table.seq,
            "connections": len(self.shared.registry.all),
            "policy_version": self.gate.source.policy.version,
            "restart_required": self.restart_required(),
            "sync": sync,
            "warnings": warnings,
        }
        if not fresh:  # the project's error fields beside the report, naming the check
            why = f": {action}" if action else ""
            body |= {"error": "unhealthy", "detail": f"feed: the table is stale{why}"}
        return (200 if fresh else 503), body

    async def _admin_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        extra: list[tuple[str, str]] = []
        try:
            target = await asyncio.wait_for(_read_target(reader), 5)
        except (TimeoutError, h11.RemoteProtocolError, ConnectionError):
            status, ctype, body = 400, "application/json", _error_body("bad_request", "bad HTTP")
        else:
            try:
                status, ctype, body = self._admin_response(target)
            except Exception as exc:  # the last resort: a JSON answer, the trace in the log
                failure = classify(exc, f"admin {target}")
                status, ctype, body = failure.status, "application/json", failure.body()
                extra = list(failure.headers)
        headers = [
            ("content-type", ctype),
            ("content-length", str(len(body))),
            ("connection", "close"),
            *extra,
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
        if target == "/livez":
            return 200, "application/json", b'{"status": "alive"}'
        if target == "/metrics":
            self._refresh_gauges()
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
        return 404, "application/json", _error_body("not_found", f"no admin endpoint {target}")


def _error_body(code: str, detail: str) -> bytes:
    return json.dumps({"error": code, "detail": detail[:200]}).encode()


def renewal_warnings(sync: dict[str, Any]) -> list[str]:
    """A line for each certificate in use that is within its renewal window."""
    return expiry.warnings(
        sync.get("certificates", []), "rotate it (certgate console rotate {name} ...)"
    )


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
    device_roots: Sequence[x509.Certificate],
    curve: str | None = None,
    backend: str = DEFAULT_TLS_BACKEND,
) -> ServerTLS:
    """The listeners' TLS: the tunnel identity; client certs REQUIRED from a Device Root
    (two during a Device Root rotation).
    ``backend``: Python's ``ssl`` or pyOpenSSL, with the same versions, suites, groups and
    verification."""
    if backend == "pyopenssl":
        return PyOpenSSLServerTLS(
            pyopenssl_server_context(
                chain,
                key,
                client_cas=list(device_roots),
                session_id=SESSION_ID_CONTEXT,
                alpn=b"http/1.1",
                curve=curve,
            )
        )
    if backend != "ssl":
        raise ValueError(f"TLS backend must be one of {TLS_BACKENDS}, got {backend!r}")
    ctx = server_context(
        chain,
        key,
        client_cas=list(device_roots),
        client_auth=ClientAuth.REQUIRED,
        alpn=["http/1.1"],
        anchor_is_issuer=True,
        curve=curve,
    )
    ctx.num_tickets = TLS13_TICKETS
    return StdlibServerTLS(ctx)
