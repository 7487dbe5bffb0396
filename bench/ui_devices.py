"""Web console device list and search at fleet size: ``ui_devices_p99_ms``.

A real console process over a SQLite database holding ``--devices`` synthetic devices
(``bench.fleet_db``, as the fleet scenario fills it), an admin signed in with password +
TOTP, and timed GETs of ``/ui/devices`` over real TLS on loopback: keyset pages in uid
and owner order (following the pages' own cursors), owner-prefix searches, compliance
filters, uid and thumbprint look-ups, and the dashboard. The figure is the p99 of the
device list and search requests, measured at the client (it includes TLS and loopback).

    python -m bench.ui_devices [--devices 1000000] [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pyotp
from sqlalchemy import func, select

from bench import fleet_db
from certgate.console import local
from certgate.console.services import admins, ca, groups, signin
from certgate.console.store.models import Device
from certgate.pki.keys import KeyAlgorithm

GROUP = "fleet"
PASSWORD = "bench web console password"
NEXT_RE = re.compile(r'href="([^"]+)" rel="next"')


TARGET_MS = 300
REQUESTS = 200


def web_admin(session: Any, pki: Any, username: str) -> pyotp.TOTP:
    """A read-only admin of every group who signs in with password + TOTP."""
    admin = admins.create_admin(session, username, "read-only", "global")
    signin.set_password(session, admin, PASSWORD)
    uri = signin.new_totp(session, pki.master, admin)
    return pyotp.TOTP(parse_qs(urlsplit(uri).query)["secret"][0])


def signed_in_measure(
    url: str, username: str, totp: pyotp.TOTP, fleet: fleet_db.Fleet, requests: int
) -> dict[str, Any]:
    with httpx.Client(base_url=url, verify=False, timeout=60) as client:
        signed = client.post(
            "/ui/login", data={"username": username, "password": PASSWORD, "code": totp.now()}
        )
        if signed.status_code != 303:
            raise RuntimeError(f"sign-in failed: HTTP {signed.status_code}")
        result = measure(client, fleet, requests)
    result.update(devices=fleet.count, target_ms=TARGET_MS)
    return result


def run(world: Any) -> dict[str, Any]:
    """The suite's ``ui`` scenario on its console (``bench.world.World``): the fleet group
    holds ``sizes.devices`` devices after the fleet scenario; alone, they are put in here."""
    from bench.world import FLEET_GROUP

    console = world.console
    with console.local() as (session, _):
        count = session.execute(
            select(func.count()).select_from(Device).where(Device.group_id == FLEET_GROUP)
        ).scalar_one()
    template = world.fleet_app.cert_path.read_text()
    fleet = fleet_db.Fleet(FLEET_GROUP, world.sizes.devices, template, ca.now())
    if count < fleet.count:
        console.stop(world.sup)
        fleet_db.insert_fleet(str(console.db_path), fleet)
        console.start(world.sup, cores=world.loadgen_cores)
    with console.local() as (session, pki):
        totp = web_admin(session, pki, "bench-web")
    return signed_in_measure(console.url, "bench-web", totp, fleet, REQUESTS)


def prepare(work: Path, devices: int) -> tuple[Path, int, pyotp.TOTP, dict[str, Any]]:
    port = _free_port()
    data_dir = work / "console"
    url = f"https://127.0.0.1:{port}"
    _, pki = local.init(data_dir, KeyAlgorithm.EC_P256, url, "127.0.0.1", port, None)
    db, pki = local.open_db(local.load_config(data_dir))
    try:
        with db.transaction() as session:
            groups.create_group(session, pki, GROUP, "Fleet", "global")
            totp = web_admin(session, pki, "bench")
    finally:
        db.dispose()
    fleet = fleet_db.Fleet(GROUP, devices, ca.pem(pki.certs[ca.DEVICE_ROOT]), ca.now())
    inserted = fleet_db.insert_fleet(str(data_dir / "console.db"), fleet)
    return data_dir, port, totp, {"insert": inserted, "fleet": fleet}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "certgate", "console", "serve", "-d", str(data_dir)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            httpx.get(f"https://127.0.0.1:{port}/healthz", verify=False, timeout=2)
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"console did not start; see {log}")


def timed(client: httpx.Client, url: str, times: list[float]) -> httpx.Response:
    started = time.perf_counter()
    answer = client.get(url)
    times.append((time.perf_counter() - started) * 1000)
    if answer.status_code not in (200, 303):
        raise RuntimeError(f"{url}: HTTP {answer.status_code}")
    return answer


def walk(client: httpx.Client, first: str, pages: int, times: list[float]) -> None:
    url = first
    for _ in range(pages):
        page = timed(client, url, times)
        found = NEXT_RE.search(page.text)
        if not found:
            return
        url = found.group(1).replace("&amp;", "&")


def measure(client: httpx.Client, fleet: fleet_db.Fleet, requests: int) -> dict[str, Any]:
    lists: list[float] = []
    searches: list[float] = []
    dashboard: list[float] = []
    rounds = max(1, requests // 40)
    for r in range(rounds):
        walk(client, f"/ui/devices?group={GROUP}&sort=uid", 10, lists)
        walk(client, f"/ui/devices?group={GROUP}&sort=owner", 5, lists)
        walk(client, "/ui/devices?compliance=noncompliant", 2, lists)
        walk(client, "/ui/devices?compliance=compliant&sort=owner", 3, lists)
        for k in range(10):
            i = (r * 7919 + k * 104_729) % fleet.count
            timed(client, f"/ui/devices?q=fleet-user-{i % 10_000}", searches)
            timed(client, f"/ui/devices?q={fleet.device_uid(i)}", searches)
            timed(client, f"/ui/devices?q={fleet.thumbprint(i)}", searches)
        timed(client, "/ui/", dashboard)
    both = lists + searches
    return {
        "requests": len(both),
        "list_p50_ms": round(statistics.median(lists), 1),
        "list_p99_ms": round(_p99(lists), 1),
        "search_p50_ms": round(statistics.median(searches), 1),
        "search_p99_ms": round(_p99(searches), 1),
        "dashboard_median_ms": round(statistics.median(dashboard), 1),
        "ui_devices_p99_ms": round(_p99(both), 1),
    }


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="certgate-ui-bench-") as tmp:
        work = Path(tmp)
        data_dir, port, totp, facts = prepare(work, args.devices)
        proc = serve(data_dir, port, work / "console.log")
        try:
            url = f"https://127.0.0.1:{port}"
            result = signed_in_measure(url, "bench", totp, facts["fleet"], args.requests)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result.update(
        insert_s=facts["insert"]["insert_s"],
        at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
