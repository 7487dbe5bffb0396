"""Scenario 5: time to enforce a compliance change on two tunnel nodes with the full table.

For each change: a live tunnel (mTLS + CONNECT, relaying) is open on each node, and a
prober per node keeps opening new tunnels; the admin's ``PUT /devices/{uid}/compliance``
(noncompliant) starts the clock. Measured per node: (a) when the first new connection is
refused (403 on CONNECT) and (b) when the live tunnel is closed. The device is then made
compliant again and the next change waits until both nodes admit it. Nothing is assumed
about how the change travels: console commit, long-poll wake-up, signed batch, table
update, closing of live tunnels are all inside the measured time.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx

from bench import env, loadgen, relays
from bench.loadgen import Target
from bench.relays import Relay
from bench.world import World

STEP_TIMEOUT_S = 15.0
READMIT_TIMEOUT_S = 30.0


class _Prober(threading.Thread):
    """Opens tunnels through one node until one is refused; notes when."""

    def __init__(self, target: Target, stop_at: float) -> None:
        super().__init__(daemon=True)
        self.target, self.stop_at = target, stop_at
        self.refused_at: float | None = None
        self.errors = 0

    def run(self) -> None:
        while time.perf_counter() < self.stop_at:
            try:
                with loadgen.open_stream(self.target, timeout=STEP_TIMEOUT_S):
                    pass
            except ConnectionError as exc:
                if "403" in str(exc):
                    self.refused_at = time.perf_counter()
                    return
                self.errors += 1
            except OSError:
                self.errors += 1


class _Watcher(threading.Thread):
    """Blocks on a live tunnel until the node closes it; notes when."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.closed_at: float | None = None

    def run(self) -> None:
        self.sock.settimeout(STEP_TIMEOUT_S)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return
        except OSError:
            data = b""
        if data == b"":
            self.closed_at = time.perf_counter()


def run(world: World, nodes: list[Relay]) -> dict[str, Any]:
    with relays.origin(world.sup, cores=world.loadgen_cores) as origin:
        changes = _changes(world, nodes, origin)
    return _summary(changes, nodes)


def _changes(world: World, nodes: list[Relay], origin: int) -> list[dict[str, Any]]:
    tls = loadgen.client_context(
        world.certs.server_trust, world.fleet_app.cert_path, world.fleet_app.key_path
    )
    targets = [Target(n.name, n.port, origin, tls, True, n.proc.pid) for n in nodes]
    uid = world.fleet_app.device_uid
    changes: list[dict[str, Any]] = []
    with world.console.client(world.root) as admin:
        try:
            for _ in range(world.sizes.enforce_changes):
                _readmitted(targets)
                changes.append(_one_change(admin, uid, targets))
                _set(admin, uid, "compliant")
        finally:
            _set(admin, uid, "compliant")
    return changes


def _set(admin: httpx.Client, uid: str, status: str) -> None:
    admin.put(f"/api/v1/devices/{uid}/compliance", json={"status": status}).raise_for_status()


def _readmitted(targets: list[Target]) -> float:
    """Wait (bounded) until every node admits the device again; return seconds."""
    started = time.monotonic()
    for target in targets:
        while True:
            try:
                with loadgen.open_stream(target, timeout=STEP_TIMEOUT_S):
                    break
            except (ConnectionError, OSError):
                if time.monotonic() - started > READMIT_TIMEOUT_S:
                    raise TimeoutError(f"{target.name} did not admit the device again") from None
                time.sleep(0.02)
    return time.monotonic() - started


def _one_change(admin: httpx.Client, uid: str, targets: list[Target]) -> dict[str, Any]:
    live = [_live_tunnel(t) for t in targets]
    try:
        watchers = [_Watcher(sock) for sock in live]
        stop_at = time.perf_counter() + STEP_TIMEOUT_S
        probers = [_Prober(t, stop_at) for t in targets]
        for thread in (*watchers, *probers):
            thread.start()
        started = time.perf_counter()
        _set(admin, uid, "noncompliant")
        answered = time.perf_counter()
        for thread in (*watchers, *probers):
            thread.join(STEP_TIMEOUT_S + 5)
    finally:
        loadgen.close_all(live)
    return {
        "api_ms": _ms(answered, started),
        "refused_ms": [_ms(p.refused_at, started) for p in probers],
        "closed_ms": [_ms(w.closed_at, started) for w in watchers],
        "probe_errors": sum(p.errors for p in probers),
    }


def _live_tunnel(target: Target) -> socket.socket:
    sock = loadgen.open_stream(target, timeout=STEP_TIMEOUT_S)
    sock.sendall(b"P")
    if sock.recv(1) != b"!":
        sock.close()
        raise ConnectionError(f"{target.name}: live tunnel does not relay")
    return sock


def _ms(at: float | None, started: float) -> float | None:
    return None if at is None else round((at - started) * 1000, 1)


def _summary(changes: list[dict[str, Any]], nodes: list[Relay]) -> dict[str, Any]:
    def everywhere(key: str) -> list[float]:
        # Worst node per change; a node that never enforced counts as the whole timeout.
        timeout_ms = STEP_TIMEOUT_S * 1000
        return [max(timeout_ms if v is None else v for v in c[key]) for c in changes]

    refused, closed = everywhere("refused_ms"), everywhere("closed_ms")
    enforced = [max(r, c) for r, c in zip(refused, closed, strict=True)]
    missed = sum(1 for c in changes if None in c["refused_ms"] or None in c["closed_ms"])
    return {
        "what": "admin compliance change (API) -> refused and closed on both nodes",
        "nodes": [n.name for n in nodes],
        "changes": len(changes),
        "not_enforced_within_timeout": missed,
        "refused_p50_ms": env.percentile(refused, 0.5),
        "refused_p99_ms": env.percentile(refused, 0.99),
        "closed_p50_ms": env.percentile(closed, 0.5),
        "closed_p99_ms": env.percentile(closed, 0.99),
        "enforced_p50_ms": env.percentile(enforced, 0.5),
        "enforced_p99_ms": env.percentile(enforced, 0.99),
        "api_p50_ms": env.percentile([c["api_ms"] for c in changes], 0.5),
        "per_change": changes,
    }
