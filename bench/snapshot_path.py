"""Micro-benchmark: the console's CPU per signed snapshot page, in process.

    .venv/bin/python -m bench.snapshot_path [--devices 200000] [--profile]

What a node's bootstrap asks of the console for each page (``SnapshotPages._sign``: the
columnar page read in one read-only transaction, then signed for the group), on a fresh
console data directory holding ``--devices`` devices written as ``bench.fleet_db`` writes
the full run's fleet. The first node of the full run waits for these pages (the second gets
the kept ones), so their CPU is a large part of ``table_1m_bootstrap_s``. CPU from
``time.process_time``; ``--profile`` prints cProfile's top functions on the CPU clock.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import fleet_db
from bench.fixture import group_settings
from certgate import jws
from certgate.console import local
from certgate.console.services import ca, feed, groups, tunnels
from certgate.feed import FEED_VERSION
from certgate.pki.keys import KeyAlgorithm
from certgate.tunnel.snapshot import PAGE_LIMIT

GROUP = "fleet"


def run(devices: int, profile: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="certgate-snapshot-") as tmp:
        data_dir = Path(tmp) / "console"
        local.init(data_dir, KeyAlgorithm.EC_P256, "https://127.0.0.1:1", "127.0.0.1", 1, None)
        db, pki = local.open_db(local.load_config(data_dir))
        with db.transaction() as session:
            groups.create_group(session, pki, GROUP, GROUP, local.TOP_GROUP, group_settings())
        template = ca.pem(pki.certs[ca.DEVICE_ROOT])  # any certificate: pages carry no PEM
        db.dispose()  # the fleet is written with the database to itself, as in the bench
        fleet = fleet_db.Fleet(GROUP, devices, template, ca.now())
        inserted = fleet_db.insert_fleet(str(data_dir / "console.db"), fleet)
        db, pki = local.open_db(local.load_config(data_dir))
        profiler = cProfile.Profile(time.process_time) if profile else None
        pages, after, cpu = 0, "", time.process_time()
        if profiler:
            profiler.enable()
        while True:
            with db.read_only() as session:
                payload = feed.snapshot_columns(session, GROUP, after, PAGE_LIMIT, FEED_VERSION)
                tunnels.sign_for_group(
                    session, pki, GROUP, payload, jws.TYP_SNAPSHOT_V2, tunnels.FEED_TTL_S
                )
            pages += 1
            if not payload["next"]:
                break
            after = payload["next"]
        if profiler:
            profiler.disable()
        cpu = time.process_time() - cpu
        db.dispose()
    if profiler:
        stats = pstats.Stats(profiler).strip_dirs()
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(30)
    return {
        "devices": devices,
        "insert_s": inserted["insert_s"],
        "pages": pages,
        "cpu_ms_per_page": round(cpu * 1000 / pages, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    print(run(args.devices, args.profile))


if __name__ == "__main__":
    main()
