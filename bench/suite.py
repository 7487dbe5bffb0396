"""The benchmark run: build the world, run every scenario, write the results.

Started by ``bench/run.py`` (which sets OPENSSL_CONF before ``ssl`` is loaded and bounds
the whole run in time). Scenarios run in this order, each one's failure recorded without
stopping the others: relay throughput and new connections (with the event-loop
comparison), concurrency, the 1,000,000-device table, time to enforce (a compliance
change, then a policy change), issuance (on the console that now holds the full fleet).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    concurrency,
    enforce,
    env,
    fleet,
    issuance,
    relay_suite,
    report,
    ui_devices,
    world,
)
from bench.procs import Supervisor

RESULTS = env.ROOT / "bench" / "results"


def _relays(w: world.World) -> dict[str, Any]:
    return relay_suite.run(w)


def _concurrency(w: world.World) -> dict[str, Any]:
    return {"concurrency": concurrency.run(w)}


def _fleet_and_enforce(w: world.World) -> dict[str, Any]:
    result, nodes = fleet.run(w)
    out: dict[str, Any] = {"table_1m": result}
    try:
        out.update(enforce.run(w, nodes))
    except Exception:
        out.update({key: {"error": traceback.format_exc()} for key in enforce.KEYS})
    finally:
        for node in nodes:
            w.sup.stop(node.proc)
    return out


def _issuance(w: world.World) -> dict[str, Any]:
    return {"issuance": issuance.run(w)}


def _ui(w: world.World) -> dict[str, Any]:
    return {"ui_devices": ui_devices.run(w)}


# name, what it produces (for recording a failure), runner
SCENARIOS: tuple[tuple[str, tuple[str, ...], Callable[[world.World], dict[str, Any]]], ...] = (
    ("relay", ("relay_throughput", "connection_rate", "event_loop", "workers"), _relays),
    ("concurrency", ("concurrency",), _concurrency),
    ("fleet", ("table_1m", *enforce.KEYS), _fleet_and_enforce),
    ("issuance", ("issuance",), _issuance),
    ("ui", ("ui_devices",), _ui),  # after fleet: the console holds the fleet by then
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="certgate benchmarks (see bench/run.py)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: proves the harness")
    parser.add_argument("--out", type=Path, help="results directory")
    parser.add_argument(
        "--only", help="comma-separated scenarios: " + ",".join(s[0] for s in SCENARIOS)
    )
    parser.add_argument("--keep-work", action="store_true", help="keep logs and state dirs")
    parser.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one size for development, e.g. --size devices=100000 (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.gettempdir(), "certgate-bench-smoke") if args.smoke else RESULTS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if os.environ.get("OPENSSL_CONF") != str(env.PIN_FILE):
        print("run the benchmark with bench/run.py (it pins TLS via OPENSSL_CONF)", file=sys.stderr)
        return 2
    sizes = world.resized(world.SMOKE if args.smoke else world.FULL, args.size)
    soft, hard = env.raise_open_files_limit()
    loadgen_cores, relay_cores = env.core_plan()
    env.pin(os.getpid(), loadgen_cores)
    work = Path(tempfile.mkdtemp(prefix="certgate-bench-"))
    wanted = set(args.only.split(",")) if args.only else {s[0] for s in SCENARIOS}
    results: dict[str, Any] = {}
    started = time.monotonic()
    failed = True
    try:
        with Supervisor(work / "logs").running() as sup:
            w = world.build(sizes, work, sup, (loadgen_cores, relay_cores))
            for name, produces, runner in SCENARIOS:
                if name in wanted:
                    _run_one(name, produces, runner, w, results, args, sizes)
        failed = any("error" in r for r in results.values())
    finally:
        results["run"] = _run_facts(started, soft, hard, loadgen_cores, relay_cores, work)
        report.write_result(args.out, "run", results["run"], sizes, args.smoke)
        report.write_summary(args.out, results, sizes, args.smoke)
        print(f"results in {args.out}; logs in {work / 'logs'}", file=sys.stderr)
        if not failed and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def _run_one(
    name: str,
    produces: tuple[str, ...],
    runner: Callable[[world.World], dict[str, Any]],
    w: world.World,
    results: dict[str, Any],
    args: argparse.Namespace,
    sizes: world.Sizes,
) -> None:
    began = time.monotonic()
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    try:
        produced = runner(w)
    except Exception:
        produced = {key: {"error": traceback.format_exc()} for key in produces}
    for key, result in produced.items():
        results[key] = result
        report.write_result(args.out, key, result, sizes, args.smoke)
    print(f"[bench] {name} done in {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)


def _run_facts(
    started: float, soft: int, hard: int, loadgen: set[int], relay: set[int], work: Path
) -> dict[str, Any]:
    return {
        "seconds": round(time.monotonic() - started, 1),
        "open_files_limit": {"soft": soft, "hard": hard},
        "cores": {"load_generator_and_origin": sorted(loadgen), "relay": sorted(relay)},
        "work_dir": str(work),
    }


if __name__ == "__main__":
    sys.exit(main())
