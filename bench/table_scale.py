"""Micro-benchmark: the tunnel's DeviceTable at fleet scale.

Run from the repository root:

    .venv/bin/python bench/table_scale.py --n 1000000

Builds a table of N synthetic entries the way a node bootstraps: snapshot pages of
``PAGE_LIMIT`` entries in format-2 columns (``DeviceTable.extend_columns``, then ``fit``),
its slots in a file under /dev/shm as the follower of ``tunnel run --workers N`` keeps them
(``shared_table.MappedFiles``; a single-process node keeps the same slots in anonymous
memory). The page columns are generated outside the timed region, one page at a time.
Reports build time, the RSS the table adds (VmRSS from /proc/self/status, Linux only: the
file's pages count, as shared memory), lookup latency percentiles over random known
thumbprints, the persisted snapshot's write and reload times (a restart), and feed batch
throughput. Results go to bench/results/table_scale.json (``--out`` to change).

Then the workers' view: 1 and then 2 reader processes map the follower's file (what a
worker does: map the file, touch every page, time lookups), their memory read from each
one's ``/proc/PID/smaps_rollup`` while all are alive. Shared pages count in every reader's
RSS; PSS splits them, so the readers' PSS summed is what the table costs the machine.

Latencies are single calls timed with ``time.perf_counter_ns``, so they include the
timer's own overhead (tens of nanoseconds).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import mmap
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from certgate.feed import ATTRIBUTE_FIELDS
from certgate.tunnel.persist import TableStore
from certgate.tunnel.shared_table import MappedFiles, SharedTable
from certgate.tunnel.snapshot import PAGE_LIMIT
from certgate.tunnel.table import Columns, DeviceTable

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "table_scale.json"
_GROUPS = ("g", "g-eu", "g-us")
_APPS = tuple(f"com.example.app{i}" for i in range(50))
_NOT_AFTER = 1_900_000_000


def _thumbprint(i: int) -> str:
    return hashlib.sha256(b"cert:%d" % i).hexdigest()


def _entry(i: int, *, blocked: bool = False) -> dict[str, object]:
    # Half the certificates are per-app device certs (bundle null), half proxy app certs.
    return {
        "op": "upsert",
        "thumbprint": _thumbprint(i),
        "device_uid": hashlib.md5(b"device:%d" % (i // 2)).hexdigest(),
        "group_id": _GROUPS[i % len(_GROUPS)],
        "app_bundle_id": None if i % 2 == 0 else _APPS[i % len(_APPS)],
        "enrollment_status": "enrolled",
        "compliance_status": "compliant",
        "blocked": blocked,
        "not_after": _NOT_AFTER + i,
    }


def _delete(i: int) -> dict[str, object]:
    upsert = _entry(i)
    return {
        "op": "delete",
        **{key: upsert[key] for key in ("thumbprint", "device_uid", "group_id")},
    }


def _stream(n: int) -> Iterator[dict[str, object]]:
    return (_entry(i) for i in range(n))


def _rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _percentile(sorted_values: list[int], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))] / 1000


def _attributes() -> list[object]:
    """The distinct ATTRIBUTE_FIELDS combinations of ``_entry``, in code order."""
    combos = {tuple(_entry(i)[f] for f in ATTRIBUTE_FIELDS) for i in range(2 * len(_APPS) * 3)}
    return [list(combo) for combo in sorted(combos, key=repr)]


def _page(start: int, stop: int, codes: dict[tuple[object, ...], int]) -> Columns:
    """Entries ``start..stop`` as a decoded format-2 page (``tunnel.snapshot``'s output)."""
    entries = [_entry(i) for i in range(start, stop)]
    return Columns(
        [bytes.fromhex(str(e["thumbprint"])) for e in entries],
        [bytes.fromhex(str(e["device_uid"])) for e in entries],
        [int(str(e["not_after"])) for e in entries],
        _attributes(),
        [codes[tuple(e[f] for f in ATTRIBUTE_FIELDS)] for e in entries],
    )


def _measure_build(n: int, home: MappedFiles) -> tuple[DeviceTable, dict[str, float]]:
    attributes = _attributes()
    codes = {tuple(values): code for code, values in enumerate(attributes)}  # type: ignore[arg-type]
    gc.collect()
    rss_before = _rss_bytes()
    table = DeviceTable(0, home=home)
    seconds = input_seconds = cpu_seconds = 0.0
    for start in range(0, n, PAGE_LIMIT):
        started = time.perf_counter()
        page = _page(start, min(n, start + PAGE_LIMIT), codes)
        input_seconds += time.perf_counter() - started
        started, cpu = time.perf_counter(), time.process_time()
        table.extend_columns(page)
        seconds += time.perf_counter() - started
        cpu_seconds += time.process_time() - cpu
        del page
    started, cpu = time.perf_counter(), time.process_time()
    table.fit()
    seconds += time.perf_counter() - started
    cpu_seconds += time.process_time() - cpu
    gc.collect()
    delta = _rss_bytes() - rss_before
    return table, {
        "input_generation_seconds": round(input_seconds, 3),
        "build_seconds": round(seconds, 3),
        # CPU beside wall time: on a machine shared with other work the two part ways.
        "build_cpu_seconds": round(cpu_seconds, 3),
        "build_entries_per_second": round(n / max(seconds, 1e-9)),
        "slots": table._slots.slots,
        "rss_before_bytes": rss_before,
        "rss_after_build_bytes": rss_before + delta,
        "rss_delta_bytes": delta,
        "rss_delta_mib": round(delta / 2**20, 1),
        "rss_bytes_per_entry": round(delta / n, 1),
        "peak_rss_after_build_bytes": _rss_bytes("VmHWM"),
    }


def _measure_lookups(
    table: DeviceTable, n: int, count: int, rng: random.Random
) -> dict[str, float]:
    probes = [_thumbprint(rng.randrange(n)) for _ in range(count)]
    timings: list[int] = []
    clock = time.perf_counter_ns
    for thumbprint in probes:
        started = clock()
        table.lookup(thumbprint)
        timings.append(clock() - started)
    timings.sort()
    return {
        "lookup_count": count,
        "lookup_p50_us": _percentile(timings, 0.50),
        "lookup_p99_us": _percentile(timings, 0.99),
    }


def _batch(n: int, size: int, rng: random.Random, next_new: int) -> list[dict[str, object]]:
    """80 % status changes to known certs, 10 % deletes, 10 % new certs."""
    entries: list[dict[str, object]] = []
    for k in range(size):
        i = rng.randrange(n)
        if k % 10 == 0:
            entries.append(_delete(i))
        elif k % 10 == 1:
            entries.append(_entry(next_new + k))
        else:
            entries.append(_entry(i, blocked=rng.random() < 0.5))
    return entries


def _measure_batches(table: DeviceTable, n: int, count: int, size: int) -> dict[str, float]:
    rng = random.Random(2)
    seconds = 0.0
    touched = 0
    for b in range(count):
        batch = _batch(n, size, rng, n + b * size)  # built outside the timed region
        seq = table.seq + 1
        started = time.perf_counter()
        changes = table.apply_batch(seq, seq, batch)
        seconds += time.perf_counter() - started
        touched += len(changes.touched)
    return {
        "batch_count": count,
        "batch_size": size,
        "batch_entries_per_second": round(count * size / max(seconds, 1e-9)),
        "batch_mean_ms": round(seconds / count * 1000, 3),
        "batch_touched_total": touched,
    }


def _smaps_rollup_kb(pid: int) -> dict[str, int]:
    counters: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
        for line in rollup:
            name, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                counters[name] = int(value.split()[0])
    return counters


def _mapping_kb(pid: int, path: Path) -> dict[str, int]:
    """The smaps counters of ``path``'s mapping in process ``pid``."""
    counters: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps", encoding="ascii") as smaps:
        inside = False
        for line in smaps:
            name, _, value = line.partition(":")
            if not value.strip().endswith("kB"):
                inside = line.rstrip().endswith(str(path))
            elif inside:
                counters[name] = int(value.split()[0])
    return counters


def _read_shared(path: str, n: int, count: int) -> None:
    """A reader process: map, touch every page, time lookups, say so, wait for stdin EOF."""
    table = SharedTable(Path(path))
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        sum(view[i] for i in range(0, len(view), mmap.PAGESIZE))
    timings = []
    for i in random.Random(3).sample(range(n), min(n, count)):
        thumbprint = _thumbprint(i)
        started = time.perf_counter_ns()
        found = table.lookup(thumbprint)
        timings.append(time.perf_counter_ns() - started)
        assert found is not None
    timings.sort()
    print(json.dumps({"p50_us": _percentile(timings, 0.5), "p99_us": _percentile(timings, 0.99)}))
    sys.stdout.flush()
    sys.stdin.read()


def _measure_readers(path: Path, n: int, readers: int, count: int) -> dict[str, object]:
    argv = [sys.executable, __file__, "--read-shared", str(path), "--n", str(n)]
    argv += ["--lookups", str(count)]
    procs = [
        subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(readers)
    ]
    try:
        latencies = [json.loads(proc.stdout.readline()) for proc in procs if proc.stdout]
        rollups = [_smaps_rollup_kb(proc.pid) for proc in procs]
        tables = [_mapping_kb(proc.pid, path) for proc in procs]
    finally:
        for proc in procs:
            proc.communicate("")
    return {
        "readers": readers,
        "rss_mb_each": [round(r["Rss"] / 1024, 1) for r in rollups],
        "private_mb_each": [
            round((r["Private_Clean"] + r["Private_Dirty"]) / 1024, 1) for r in rollups
        ],
        "shared_mb_each": [
            round((r["Shared_Clean"] + r["Shared_Dirty"]) / 1024, 1) for r in rollups
        ],
        "pss_mb_total": round(sum(r["Pss"] for r in rollups) / 1024, 1),
        "table_rss_mb_each": [round(t["Rss"] / 1024, 1) for t in tables],
        "table_private_mb_each": [
            round((t["Private_Clean"] + t["Private_Dirty"]) / 1024, 1) for t in tables
        ],
        "table_pss_mb_total": round(sum(t["Pss"] for t in tables) / 1024, 1),
        "lookup_us": latencies,
    }


def _measure_shared(table: DeviceTable, n: int, lookups: int) -> dict[str, object]:
    """Readers of the follower's own file (no copy: the workers map what it writes)."""
    path = table.path
    assert path is not None
    table.set_last_exchange(time.time())
    by_readers = {str(k): _measure_readers(path, n, k, min(lookups, 20_000)) for k in (1, 2)}
    return {
        "shared_file_mb": round(path.stat().st_size / 2**20, 1),
        "follower_table_mapping": _mapping_kb_mb(_mapping_kb(os.getpid(), path)),
        "shared_readers": by_readers,
    }


def _mapping_kb_mb(counters: dict[str, int]) -> dict[str, float]:
    return {name: round(counters.get(name, 0) / 1024, 1) for name in ("Rss", "Pss")}


def _measure_reload(table: DeviceTable, home: MappedFiles) -> dict[str, float]:
    """A restart: the table written as the node persists it, then loaded into slots."""
    with tempfile.TemporaryDirectory() as directory:
        store = TableStore(Path(directory))
        started = time.perf_counter()
        store.write_snapshot(table)
        written = time.perf_counter() - started
        started, cpu = time.perf_counter(), time.process_time()
        loaded = store.load(home)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert loaded is not None and len(loaded.table) == len(table)
    loaded.table.close()
    return {
        "persist_write_seconds": round(written, 3),
        "persist_load_seconds": round(seconds, 3),
        "persist_load_cpu_seconds": round(cpu, 3),
    }


def run(n: int, lookups: int, batches: int, batch_size: int) -> dict[str, object]:
    """Run every measurement; return the results as a JSON-ready dict."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:
        home = MappedFiles(Path(directory))
        table, build = _measure_build(n, home)
        results: dict[str, object] = {"n": n, "entries": len(table), **build}
        results.update(_measure_lookups(table, n, lookups, random.Random(1)))
        results.update(_measure_shared(table, n, lookups))
        results.update(_measure_reload(table, home))
        results.update(_measure_batches(table, n, batches, batch_size))
        table.close()
    results["peak_rss_bytes"] = _rss_bytes("VmHWM")  # includes the benchmark's own inputs
    results["python"] = sys.version.split()[0]
    results["machine"] = platform.machine()
    return results


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="entries in the table")
    parser.add_argument("--lookups", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--read-shared", help=argparse.SUPPRESS)  # a reader process
    args = parser.parse_args(argv)
    if args.read_shared:
        _read_shared(args.read_shared, args.n, args.lookups)
        return {}
    if min(args.n, args.lookups, args.batches, args.batch_size) < 1:
        parser.error("--n, --lookups, --batches and --batch-size must be positive")
    results = run(args.n, args.lookups, args.batches, args.batch_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
