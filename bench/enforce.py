"""Scenario 5: time to enforce a change on two tunnel nodes with the full table.

Two kinds of change, each measured the same way (``COMPLIANCE`` and ``POLICY``):

* compliance: the admin's ``PUT /devices/{uid}/compliance`` (noncompliant), undone by
  making the device compliant again;
* policy: the admin's ``PATCH /groups/{g}/settings`` with server rules that deny every
  destination, undone by restoring the group's rules as they were.

For each change: a live tunnel (mTLS + CONNECT, relaying) is open on each node, and a
prober per node keeps opening new tunnels; the admin's API call starts the clock. Measured
per node: (a) when the first new connection is refused (403 on CONNECT) and (b) when the
live tunnel is closed. The change is then undone and the next one waits until both nodes
admit the device again. Nothing is assumed about how the change travels: console commit,
long-poll wake-up, signed batch, table or policy update, closing of live tunnels are all
inside the measured time.
"""

from __future__ import annotations

import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from bench import env, loadgen, relays
from bench.loadgen import Target
from bench.relays import Relay
from bench.world import FLEET_GROUP, World

STEP_TIMEOUT_S = 15.0
READMIT_TIMEOUT_S = 30.0
DENY_ALL = {"default": "deny", "rules": []}
KEYS = ("enforce", "enforce_policy")  # result names: compliance, policy

# An admin call on the console: (admin client, device uid, group id) -> None.
Call = Callable[[httpx.Client, str, str], None]


@dataclass(frozen=True)
class Kind:
    """One kind of change: what the admin does to refuse the device, and how it is undone."""

    what: str
    apply: Call
    undo: Call


def _set(admin: httpx.Client, uid: str, status: str) -> None:
    admin.put(f"/api/v1/devices/{uid}/compliance", json={"status": status}).raise_for_status()


def _rules(admin: httpx.Client, group: str, rules: dict[str, Any]) -> None:
    path = f"/api/v1/groups/{group}/settings"
    admin.patch(path, json={"server_rules": rules}).raise_for_status()


COMPLIANCE = Kind(
    "admin compliance change (API) -> refused and closed on both nodes",
    lambda admin, uid, _group: _set(admin, uid, "noncompliant"),
    lambda admin, uid, _group: _set(admin, uid, "compliant"),
)


def policy(allowed: dict[str, Any]) -> Kind:
    """Server rules that deny every destination, undone by restoring ``allowed``."""
    return Kind(
        "admin server-rule change (API) -> refused and closed on both nodes",
        lambda admin, _uid, group: _rules(admin, group, DENY_ALL),
        lambda admin, _uid, group: _rules(admin, group, allowed),
    )


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


def run(world: World, nodes: list[Relay]) -> dict[str, dict[str, Any]]:
    """Both kinds on the same nodes, compliance first: ``{"enforce": ..., "enforce_policy": ...}``.
    A kind that fails is recorded as ``{"error": ...}`` and the other still runs.

    One admin connection serves every call, opened by reading the group's rules: each
    measured call is then a request on an open connection, the first one included (a new
    connection's mTLS handshake with the console is no part of enforcing a change)."""
    out: dict[str, dict[str, Any]] = {}
    with (
        world.console.client(world.root) as admin,
        relays.origin(world.sup, cores=world.loadgen_cores) as origin,
    ):
        group = admin.get(f"/api/v1/groups/{FLEET_GROUP}")
        allowed = group.raise_for_status().json()["settings"]["server_rules"]
        for key, kind in zip(KEYS, (COMPLIANCE, policy(allowed)), strict=True):
            try:
                changes = _changes(world, nodes, origin, admin, kind)
                out[key] = summary(kind.what, changes, [n.name for n in nodes])
            except Exception:
                out[key] = {"error": traceback.format_exc()}
    return out


def _changes(
    world: World, nodes: list[Relay], origin: int, admin: httpx.Client, kind: Kind
) -> list[dict[str, Any]]:
    tls = loadgen.client_context(
        world.certs.server_trust, world.fleet_app.cert_path, world.fleet_app.key_path
    )
    targets = [Target(n.name, n.port, origin, tls, True, n.proc.pid) for n in nodes]
    uid = world.fleet_app.device_uid
    changes: list[dict[str, Any]] = []
    try:
        for _ in range(world.sizes.enforce_changes):
            _readmitted(targets)
            changes.append(_one_change(lambda: kind.apply(admin, uid, FLEET_GROUP), targets))
            kind.undo(admin, uid, FLEET_GROUP)
    finally:
        kind.undo(admin, uid, FLEET_GROUP)
    return changes


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


def _one_change(apply: Callable[[], None], targets: list[Target]) -> dict[str, Any]:
    live = [_live_tunnel(t) for t in targets]
    try:
        watchers = [_Watcher(sock) for sock in live]
        stop_at = time.perf_counter() + STEP_TIMEOUT_S
        probers = [_Prober(t, stop_at) for t in targets]
        for thread in (*watchers, *probers):
            thread.start()
        started = time.perf_counter()
        apply()
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


def summary(what: str, changes: list[dict[str, Any]], nodes: list[str]) -> dict[str, Any]:
    """Percentiles over ``changes`` (as ``_one_change`` records them) of the worst node."""

    def everywhere(key: str) -> list[float]:
        # Worst node per change; a node that never enforced counts as the whole timeout.
        timeout_ms = STEP_TIMEOUT_S * 1000
        return [max(timeout_ms if v is None else v for v in c[key]) for c in changes]

    refused, closed = everywhere("refused_ms"), everywhere("closed_ms")
    enforced = [max(r, c) for r, c in zip(refused, closed, strict=True)]
    missed = sum(1 for c in changes if None in c["refused_ms"] or None in c["closed_ms"])
    return {
        "what": what,
        "nodes": nodes,
        "changes": len(changes),
        "not_enforced_within_timeout": missed,
        "refused_p50_ms": env.percentile(refused, 0.5),
        "refused_p99_ms": env.percentile(refused, 0.99),
        "closed_p50_ms": env.percentile(closed, 0.5),
        "closed_p99_ms": env.percentile(closed, 0.99),
        "enforced_p50_ms": env.percentile(enforced, 0.5),
        "enforced_p99_ms": env.percentile(enforced, 0.99),
        "api_p50_ms": env.percentile([c["api_ms"] for c in changes], 0.5),
        "api_max_ms": max((c["api_ms"] for c in changes), default=0.0),
        "first_enforced_ms": enforced[0] if enforced else None,
        "per_change": changes,
    }
