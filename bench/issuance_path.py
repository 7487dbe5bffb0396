"""Micro-benchmark: the console's CPU per profile delivery, in process, without HTTP.

    .venv/bin/python -m bench.issuance_path [--deliveries 400] [--batch 4] [--profile]

What ``POST /api/v1/device/profile`` runs on the console's writer thread (``api.device``'s
``deliver``: authenticate the device, revoke its previous certificate, sign the CSR,
record the certificate and the delivery, feed events, audit entry), ``--batch`` units to
one group commit (``console.writer``), on a fresh console data directory (SQLite). The
writer does about three quarters of the console's CPU per certificate in the API scenario
(bench/FINDINGS.md), and this runs it on one thread, so its CPU time
(``time.process_time``) is a figure other tenants of the machine move far less than a rate.
``--profile`` prints cProfile's top functions by cumulative and own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from itertools import cycle
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bench.fixture import group_settings
from certgate.console import local
from certgate.console.api.device import audited_profile
from certgate.console.services import devices, groups
from certgate.console.store.db import Database
from certgate.console.store.models import ProfileDelivery
from certgate.console.writer import Writer, _Job
from certgate.pki.csr import build_csr
from certgate.pki.keys import KeyAlgorithm, generate_key

GROUP, USER, PASSWORD = "bench", "bench-user", "bench-password-1234"


def _deliveries(data_dir: Path, count: int) -> list[tuple[str, bytes]]:
    """(device credential, CSR) of ``count`` enrolled devices."""
    db, pki = local.open_db(local.load_config(data_dir))
    try:
        with db.transaction() as session:
            groups.create_group(session, pki, GROUP, GROUP, local.TOP_GROUP, group_settings())
            devices.create_enrollment_user(session, GROUP, USER, PASSWORD)
        out = []
        for _ in range(count):
            with db.transaction() as session:
                enrolled = devices.enroll(
                    session,
                    token=None,
                    username=USER,
                    password=PASSWORD,
                    platform="linux",
                    name="pc",
                )
                out.append((enrolled.credential.token, build_csr(generate_key(), "bench")))
        return out
    finally:
        db.dispose()


def _unit(pki: Any, credential: str, csr: bytes) -> Any:
    """The API handler's unit of work (``api.device.profile`` through ``deps.as_device``)."""

    def work(session: Session) -> dict[str, Any]:
        device = devices.authenticate_device(session, credential)
        return audited_profile(session, pki, device, csr)

    return work


def _recorded(db: Database) -> int:
    with db.read_only() as session:
        return int(session.execute(select(func.count()).select_from(ProfileDelivery)).scalar_one())


def run(deliveries: int, batch: int, profile: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="certgate-issuance-") as tmp:
        data_dir = Path(tmp) / "console"
        local.init(data_dir, KeyAlgorithm.EC_P256, "https://127.0.0.1:1", "127.0.0.1", 1, None)
        pairs = _deliveries(data_dir, 8)
        db, pki = local.open_db(local.load_config(data_dir))
        writer = Writer(db)  # not started: its _commit runs here, on this thread
        units = cycle(_unit(pki, credential, csr) for credential, csr in pairs)
        for _ in range(4):  # statement caches warm, as in a running console
            writer._commit([_Job(next(units)) for _ in range(batch)])
        before = _recorded(db)
        profiler = cProfile.Profile(time.process_time) if profile else None  # CPU, not wall
        cpu, wall = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        for _ in range(deliveries // batch):
            jobs = [_Job(next(units)) for _ in range(batch)]
            writer._commit(jobs)
            for job in jobs:
                job.future.result()
        if profiler:
            profiler.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        recorded = _recorded(db) - before
        db.dispose()
    done = deliveries // batch * batch
    if profiler:
        stats = pstats.Stats(profiler).strip_dirs()
        stats.sort_stats("cumulative").print_stats(45)
        stats.sort_stats("tottime").print_stats(25)
    return {
        "deliveries": done,
        "recorded": recorded,  # profile deliveries committed by the measured batches
        "batch": batch,
        "cpu_ms_per_delivery": round(cpu * 1000 / done, 3),
        "wall_ms_per_delivery": round(wall * 1000 / done, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=400)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    print(run(args.deliveries, args.batch, args.profile))


if __name__ == "__main__":
    main()
