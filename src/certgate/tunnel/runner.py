"""``certgate tunnel run``: load the state directory, follow the feed, serve the data plane.

The event loop is selectable (``--loop asyncio|uvloop``): the data plane drives
non-blocking sockets from readiness callbacks (``tunnel.sockets``), which both loops
provide, so both serve the same code. The stdlib loop is the default: under ``make bench``
uvloop was at most a few percent faster with this shell (the loop is a small part of a
connection's cost next to OpenSSL), and uvloop's own transports and TLS, which a node also
runs, have crashed under bursts of short connections elsewhere (bench/FINDINGS.md, "Event
loop").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from certgate import logs
from certgate.errors import ConfigError
from certgate.heap import freeze_startup_heap
from certgate.tunnel.cascade import Cascade, Role, check_settings, front_end_tls
from certgate.tunnel.config import TunnelState, load_state
from certgate.tunnel.metrics import denial_totals
from certgate.tunnel.report import Reporter
from certgate.tunnel.server import Gate, Limits
from certgate.tunnel.service import (
    DEFAULT_TLS_BACKEND,
    TLS_BACKENDS,
    Endpoint,
    TunnelService,
    data_plane_tls,
)
from certgate.tunnel.sockets import ServerTLS
from certgate.tunnel.sync import FeedFollower

log = logging.getLogger("certgate.tunnel")
LOOPS = ("asyncio", "uvloop")
MAX_WORKERS = 256


@dataclass(frozen=True, slots=True)
class RunOptions:
    state_dir: Path
    listen_host: str = "127.0.0.1"
    proxy: Endpoint | None = None  # None: listen_host and the trust config's proxy port
    per_app: Endpoint | None = None
    admin: Endpoint | None = field(default_factory=lambda: Endpoint("127.0.0.1", 9102))
    loop: str = "asyncio"
    drain_s: float = 30.0
    tls_curve: str | None = None  # None: tlsconf.GROUPS
    tls_backend: str = DEFAULT_TLS_BACKEND
    limits: Limits = field(default_factory=Limits)
    workers: int = 1  # 1: this process serves; more: tunnel.workers (one follower, N servers)
    role: Role = Role.STANDALONE  # cascade mode (tunnel.cascade)
    back_ends: tuple[Endpoint, ...] = ()  # a front end's back ends

    def __post_init__(self) -> None:
        if self.loop not in LOOPS:
            raise ConfigError(f"event loop must be one of {LOOPS}, got {self.loop!r}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers must be 1 to {MAX_WORKERS}, got {self.workers}")
        check_settings(self.role, self.back_ends)
        if self.tls_backend not in TLS_BACKENDS:
            raise ConfigError(
                f"TLS backend must be one of {TLS_BACKENDS}, got {self.tls_backend!r}"
            )


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(options: RunOptions) -> None:
    state = load_state(options.state_dir)
    logs.set_context(node=state.node_name, group=state.group_id)
    if options.workers > 1:
        from certgate.tunnel.workers import supervise

        with asyncio.Runner() as runner:  # the supervisor serves no data: the stdlib loop
            runner.run(supervise(state, options))
        return
    with asyncio.Runner(loop_factory=loop_factory(options.loop)) as runner:
        runner.run(serve(state, options))


def build(state: TunnelState, options: RunOptions) -> tuple[TunnelService, FeedFollower]:
    """The service and its feed follower; the follower reports changes to the service."""
    follower = FeedFollower(state, state_dir=options.state_dir)
    policy = follower.policy
    tls = listener_tls(state, options)
    service = TunnelService(
        Gate(state.group_id, follower, cascade=cascade_of(state, options)),
        tls,
        options.proxy or Endpoint(options.listen_host, policy.proxy_port),
        options.per_app or Endpoint(options.listen_host, policy.per_app_port),
        options.admin,
        options.limits,
        status=follower.status,
        ports_from_policy={
            name: f"{name}_port"
            for name, pinned in (("proxy", options.proxy), ("per_app", options.per_app))
            if pinned is None
        },
    )

    def use_identity(rotated: TunnelState) -> None:
        """A rotated tunnel identity: its TLS context built aside, then swapped in (a
        failure raises here and the follower keeps the identity in use). A front end's
        hops to its back ends present it too."""
        tls, cascade = listener_tls(rotated, options), cascade_of(rotated, options)
        service.swap_tls(tls)
        service.gate.cascade = cascade

    follower.subscribe(service.on_change, use_identity)
    return service, follower


def listener_tls(state: TunnelState, options: RunOptions) -> ServerTLS:
    """The tunnel identity, taking client certificates from the Device Roots; a back end's
    clients are front ends, whose tunnel identity the Secure Channel Root issues."""
    back_end = options.role is Role.BACK_END
    return data_plane_tls(
        [state.tunnel_cert, *state.tunnel_chain],
        state.tunnel_key,
        state.secure_channel_roots if back_end else state.device_roots,
        options.tls_curve,
        options.tls_backend,
    )


def cascade_of(state: TunnelState, options: RunOptions) -> Cascade | None:
    if options.role is Role.STANDALONE:
        return None
    client_tls = None
    if options.role is Role.FRONT_END:
        chain = [state.tunnel_cert, *state.tunnel_chain]
        client_tls = front_end_tls(chain, state.tunnel_key, state.secure_channel_roots)
    return Cascade(
        options.role,
        state.group_id,
        state.root,
        state.device_roots,
        options.back_ends,
        client_tls,
    )


async def serve(state: TunnelState, options: RunOptions) -> None:
    service, follower = build(state, options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sync_task = loop.create_task(follower.run())
    await service.start()
    service.record_listeners(options.state_dir)
    # Kept, and cancelled before the follower closes the mTLS client the reports use.
    reporter = Reporter(
        state.node_name,
        service,
        follower,
        denials=lambda: denial_totals(service.metrics.registry),
    )
    report_task = loop.create_task(reporter.run())
    frozen = freeze_startup_heap()  # full collections stop traversing start-up (certgate.heap)
    log.info(
        "tunnel node %s of group %s serving (loop=%s, tls=%s; %d start-up objects left out"
        " of garbage collection)",
        state.node_name,
        state.group_id,
        options.loop,
        options.tls_backend,
        frozen,
    )
    await stop.wait()
    log.info("draining connections (up to %.0f s)", options.drain_s)
    await service.stop(options.drain_s)
    for task in (report_task, sync_task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
