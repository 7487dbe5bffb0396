"""Scenario 3: many concurrent idle tunnels, then traffic on a few of them.

The load generator opens the tunnels (mTLS + CONNECT, held open, silent), reads the relay's
resident memory, then moves data on ``active_tunnels`` of them at once. HAProxy holds the
same number of idle TLS connections as the anchor.

Each tunnel costs the relay two file descriptors (client side and upstream side), so the
count is capped by the relay's RLIMIT_NOFILE: the harness raises the soft limit to the hard
one before starting anything (children inherit it) and records both.
"""

from __future__ import annotations

import time
from typing import Any

from bench import env, loadgen, relays
from bench.loadgen import Target
from bench.relays import Relay
from bench.world import World

FD_RESERVE = 128  # listeners, logs, the feed client, the admin endpoint (HAProxy: 100)
OPEN_THREADS = 16
OPEN_BUDGET_S = 120.0


def run(world: World) -> dict[str, Any]:
    tls = loadgen.client_context(
        world.certs.server_trust, world.relay_app.cert_path, world.relay_app.key_path
    )
    results: dict[str, Any] = {}
    with relays.origin(world.sup, cores=world.loadgen_cores) as origin:
        for name in ("certgate", "haproxy"):
            results[name] = _measure_relay(world, name, origin, tls)
    mine, anchor = results["certgate"], results["haproxy"]
    return {
        "what": "idle mTLS tunnels held open, then data on some of them at once",
        "relays": results,
        "anchor": {"name": "haproxy", "kib_per_idle_tunnel": anchor.get("kib_per_idle_tunnel")},
        "ratio_memory_per_tunnel_vs_haproxy": env.ratio(
            mine.get("kib_per_idle_tunnel"), anchor.get("kib_per_idle_tunnel")
        ),
        "ratio_active_mb_per_cpu_s_vs_haproxy": env.ratio(
            _active_per_cpu(mine), _active_per_cpu(anchor)
        ),
    }


def _measure_relay(world: World, name: str, origin: int, tls: Any) -> dict[str, Any]:
    relay = _start(world, name, origin)
    try:
        target = Target(name, relay.port, origin, tls, relay.connect, relay.proc.pid)
        return _measure(world, relay, target)
    except OSError as exc:  # recorded with the relay's log tail; the anchor still runs
        return {"error": f"{exc!r}; relay: {relay.proc.last_error()}"}
    finally:
        world.sup.stop(relay.proc)


def _start(world: World, name: str, origin: int) -> Relay:
    if name == "certgate":
        relay = relays.start_certgate(
            world.sup, world.relay_state, "certgate-idle", cores=world.relay_cores
        )
        relays.wait_fresh(relay, 1, 60)
        return relay
    return relays.start_haproxy(world.sup, world.work, world.certs, origin, cores=world.relay_cores)


def _active_per_cpu(result: dict[str, Any]) -> float | None:
    down = (result.get("active") or {}).get("download") or {}
    value = down.get("mb_per_relay_cpu_s")
    return float(value) if value is not None else None


def _measure(world: World, relay: Relay, target: Target) -> dict[str, Any]:
    limit = env.open_files_limit(relay.proc.pid)
    wanted = world.sizes.idle_tunnels
    count = min(wanted, (limit - FD_RESERVE) // 2)
    base_rss = relay.proc.rss_mb()
    started = time.monotonic()
    socks = loadgen.open_many(target, count, OPEN_THREADS, started + OPEN_BUDGET_S)
    try:
        opened_s = time.monotonic() - started
        time.sleep(1.0)  # let the relay settle (buffers freed, sweeper ran)
        relay.proc.check()
        rss = relay.proc.rss_mb()
        active = _active(world, target, socks)
        relay.proc.check()
        held = len(socks)
        return {
            "requested": wanted,
            "held": held,
            "limited_by": _limit_reason(limit, count, held, wanted),
            "relay_open_files_limit": limit,
            "open_seconds": round(opened_s, 1),
            "rss_before_mb": round(base_rss, 1),
            "rss_with_idle_mb": round(rss, 1),
            "kib_per_idle_tunnel": round((rss - base_rss) * 1024 / held, 1) if held else None,
            "active": active,
            "rss_after_active_mb": round(relay.proc.rss_mb(), 1),
        }
    finally:
        loadgen.close_all(socks)


def _limit_reason(limit: int, count: int, held: int, wanted: int) -> str | None:
    if held < count:
        return f"only {held} of {count} opened within {OPEN_BUDGET_S:g}s"
    if count < wanted:
        return (
            f"{count} of {wanted}: the relay's open-files limit is {limit} (the hard limit"
            " here; raising it needs CAP_SYS_RESOURCE) and each tunnel holds two descriptors"
        )
    return None


def _active(world: World, target: Target, socks: list[Any]) -> dict[str, Any]:
    chosen = socks[:: max(1, len(socks) // world.sizes.active_tunnels)][
        : world.sizes.active_tunnels
    ]
    size = world.sizes.active_bytes
    return {d: loadgen.parallel_transfer(target, chosen, size, d) for d in ("upload", "download")}
