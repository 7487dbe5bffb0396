"""Lookup latency of a tunnel node's device table, measured in a process of its own.

Loads the table a node persisted (``TableStore``, the node's own files and format), then
times ``DeviceTable.lookup`` on random known thumbprints, one call at a time with
``time.perf_counter_ns`` (the timer's own cost is reported beside). Run by ``bench.fleet``
as ``python -m bench.lookups --state-dir D --devices N --count C``; prints JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path
from typing import Any

from bench import env, fleet_db
from certgate.tunnel.persist import TableStore


def measure(state_dir: Path, devices: int, count: int) -> dict[str, Any]:
    gc.collect()
    before = env.rss_mb()
    started = time.perf_counter()
    loaded = TableStore(state_dir).load()
    load_s = time.perf_counter() - started
    if loaded is None:
        raise RuntimeError(f"{state_dir}: the node persisted no table")
    table = loaded.table
    gc.collect()
    delta = env.rss_mb() - before
    rng = random.Random(6)
    probes = [fleet_db.thumbprint(rng.randrange(devices)) for _ in range(count)]
    timings = _time(table.lookup, probes)
    misses = sum(1 for p in probes[:1000] if table.lookup(p) is None)
    return {
        "entries": len(table),
        "load_persisted_s": round(load_s, 2),
        "table_rss_delta_mb": round(delta, 1),
        "lookups": len(probes),
        "unknown_among_first_1000": misses,
        "lookup_p50_us": round(env.percentile(timings, 0.50), 2),
        "lookup_p99_us": round(env.percentile(timings, 0.99), 2),
        "lookup_p999_us": round(env.percentile(timings, 0.999), 2),
        "timer_overhead_us": round(env.percentile(_time(lambda _: None, probes[:10_000]), 0.5), 3),
    }


def _time(call: Any, probes: list[str]) -> list[float]:
    """Microseconds per call, each call timed alone."""
    clock = time.perf_counter_ns
    timings = []
    for thumbprint in probes:
        started = clock()
        call(thumbprint)
        timings.append((clock() - started) / 1000)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    print(json.dumps(measure(args.state_dir, args.devices, args.count)))


if __name__ == "__main__":
    main()
