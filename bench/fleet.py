"""Scenario 4: the device table at fleet scale, through the real console and tunnel nodes.

1. The console is stopped, its database gets ``devices`` synthetic devices and
   certificates (``fleet_db``), and it is started again.
2. Two fresh tunnel nodes of the fleet group bootstrap from it, one after the other:
   ``certgate tunnel run`` fetches, verifies and loads the paged signed snapshot. Bootstrap
   time runs from spawning the process until ``/healthz`` reports the table fresh with
   every device (so it includes interpreter start-up); the console's CPU time over that
   window is recorded too, and per snapshot page. The second node gets the pages the
   console signed for the first (kept while the feed stays at their seq), as the second
   node of an HA group does; the headline is the first. The table's resident memory is
   what the node's RSS grew by, from serving with an empty table to 2 s after bootstrap:
   the table itself plus what the allocators kept from parsing the pages. The node's
   whole RSS is recorded beside it.
3. Lookup latency: the table a node persisted is loaded in a fresh process
   (``bench.lookups``) and ``DeviceTable.lookup`` is timed on random known thumbprints,
   one call at a time.
4. Feed throughput: ``feed_changes`` changes are appended to the group's feed in one
   commit, as another console node would, and both tunnel nodes are watched until they
   have applied them.

The nodes are left running for the time-to-enforce scenario.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench import env, fleet_db, relays
from bench.fleet_db import Fleet
from bench.relays import Relay
from bench.world import FLEET_GROUP, World
from certgate.console.services.ca import now
from certgate.tunnel.snapshot import PAGE_LIMIT

BOOTSTRAP_TIMEOUT_S = 240.0
FEED_TIMEOUT_S = 120.0
LOOKUP_TIMEOUT_S = 120.0
POLL_S = 0.05


def run(world: World) -> tuple[dict[str, Any], list[Relay]]:
    fleet = Fleet(FLEET_GROUP, world.sizes.devices, world.fleet_app.cert_path.read_text(), now())
    world.console.stop(world.sup)
    inserted = fleet_db.insert_fleet(str(world.console.db_path), fleet)
    world.console.start(world.sup, cores=world.loadgen_cores)
    nodes: list[Relay] = []
    result: dict[str, Any] = {"devices": fleet.count, "insert": inserted, "nodes": []}
    for index, state_dir in enumerate(world.fleet_states, start=1):
        node, booted = _bootstrap(world, state_dir, f"fleet-{index}", fleet.count)
        nodes.append(node)
        result["nodes"].append(booted)
    result["table_in_process"] = _lookups(world, world.fleet_states[0], fleet)
    result["feed"] = _feed(world, fleet, nodes)
    first = result["nodes"][0]
    result["headline"] = {
        "table_1m_bootstrap_s": first["bootstrap_s"],
        "table_1m_rss_mb": first["table_rss_mb"],
        "lookup_p99_us": result["table_in_process"]["lookup_p99_us"],
    }
    return result, nodes


def _bootstrap(
    world: World, state_dir: Path, name: str, count: int
) -> tuple[Relay, dict[str, Any]]:
    console_cpu, load = world.console.proc_cpu(), os.getloadavg()[0]
    started = time.monotonic()
    node = relays.start_certgate(world.sup, state_dir, name, cores=world.relay_cores)
    listening = time.monotonic() - started
    rss_empty = node.proc.rss_mb()  # serving, the first page not in yet
    relays.wait_fresh(node, count, BOOTSTRAP_TIMEOUT_S)
    booted = time.monotonic() - started
    console_cpu = world.console.proc_cpu() - console_cpu
    rss_fresh = node.proc.rss_mb()
    time.sleep(2.0)
    rss = node.proc.rss_mb()
    entries = node.health().get("table_entries")
    pages = -(-entries // PAGE_LIMIT) if isinstance(entries, int) else None  # as the node asks
    return node, {
        "node": name,
        "bootstrap_s": round(booted, 2),
        "listening_after_s": round(listening, 2),
        "entries": entries,
        "snapshot_pages": pages,
        "table_rss_mb": round(rss - rss_empty, 1),
        "rss_mb": round(rss, 1),
        "rss_before_table_mb": round(rss_empty, 1),
        "rss_at_fresh_mb": round(rss_fresh, 1),
        "peak_rss_mb": round(env.peak_rss_mb(node.proc.pid), 1),
        "cpu_s": round(node.proc.cpu_seconds(), 2),
        "console_cpu_s": round(console_cpu, 2),
        "console_cpu_ms_per_page": round(1000 * console_cpu / pages) if pages else None,
        "load_average_before": round(load, 2),
    }


def _lookups(world: World, state_dir: Path, fleet: Fleet) -> dict[str, Any]:
    """``bench.lookups`` in a fresh process on the load-generator core (nodes idle)."""
    argv = [sys.executable, "-m", "bench.lookups", "--state-dir", str(state_dir)]
    argv += ["--devices", str(fleet.count), "--count", str(world.sizes.lookups)]
    cores = ",".join(str(c) for c in sorted(world.loadgen_cores))
    done = subprocess.run(
        ["taskset", "-c", cores, *argv],
        capture_output=True,
        text=True,
        timeout=LOOKUP_TIMEOUT_S,
        check=True,
        env={**os.environ, "PYTHONPATH": str(env.ROOT)},
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _feed(world: World, fleet: Fleet, nodes: list[Relay]) -> dict[str, Any]:
    start_seqs = [_seq(node) for node in nodes]
    target = fleet_db.feed_flips(str(world.console.db_path), fleet, world.sizes.feed_changes)
    committed = time.monotonic()
    progress: list[dict[str, Any]] = [{"first_move_s": None} for _ in nodes]
    deadline = committed + FEED_TIMEOUT_S
    while time.monotonic() < deadline and any("done_s" not in p for p in progress):
        for node, seq0, mark in zip(nodes, start_seqs, progress, strict=True):
            if "done_s" in mark:
                continue
            seq, at = _seq(node), time.monotonic() - committed
            if seq > seq0 and mark["first_move_s"] is None:
                mark["first_move_s"] = round(at, 3)
            if seq >= target:
                mark["done_s"] = round(at, 3)
        time.sleep(POLL_S)
    changes = world.sizes.feed_changes
    for node, mark in zip(nodes, progress, strict=True):
        mark["node"] = node.name
        mark["changes_per_s"] = _rate(changes, mark.get("done_s"))
        applying = (mark.get("done_s") or 0) - (mark["first_move_s"] or 0)
        mark["changes_per_s_while_applying"] = _rate(changes, applying if applying > 0 else None)
    return {"changes": changes, "target_seq": target, "nodes": progress}


def _rate(changes: int, seconds: float | None) -> float | None:
    return round(changes / seconds) if seconds else None


def _seq(node: Relay) -> int:
    try:
        seq = node.health().get("table_seq")
    except httpx.HTTPError:
        return -1
    return seq if isinstance(seq, int) else -1
