"""kill -9 of the console during a burst of issuance loses no acknowledged certificate
and never reuses a serial.

Many clients request Per-App Tunnel profiles concurrently; the console is SIGKILLed while
they run. Every response that arrived (an acknowledged issuance) must be in the database
after restart, and all serials must be distinct.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from sqlalchemy import select

from certgate.console.store.models import Certificate
from tests.support import RunningConsole, init_console, make_csr, start_console

pytestmark = pytest.mark.integration

CLIENTS = 4
MAX_REQUESTS_PER_CLIENT = 400
KILL_AFTER_ACKS = 40


def _enrolled_devices(console: RunningConsole, n: int) -> list[str]:
    root = console.admins["root"]
    with console.client(root) as admin:
        admin.post(
            "/api/v1/groups/global/enrollment-users",
            json={"username": "bob", "password": "bob-password"},
        )
    credentials = []
    with console.client() as client:
        for _ in range(n):
            response = client.post(
                "/api/v1/enroll",
                json={"username": "bob", "password": "bob-password", "platform": "linux"},
            )
            credentials.append(response.json()["credential"])
    return credentials


def _issue_until_dead(
    console: RunningConsole,
    credential: str,
    csr: str,
    acked: list[dict[str, Any]],
    lock: threading.Lock,
) -> None:
    with console.client(api_key=credential) as client:
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            try:
                response = client.post("/api/v1/device/profile", json={"csr": csr})
            except httpx.TransportError:
                return  # the console died mid-request: not acknowledged
            if response.status_code == 201:
                with lock:
                    acked.append(response.json())


def test_kill_9_during_issuance_loses_nothing_acknowledged(tmp_path: Path) -> None:
    data_dir, port = init_console(tmp_path)
    console = start_console(tmp_path, data_dir, port)
    console.make_admin("root", "superadmin", "global")
    credentials = _enrolled_devices(console, CLIENTS)
    csr = make_csr()[0].decode()
    acked: list[dict[str, Any]] = []
    lock = threading.Lock()
    workers = [
        threading.Thread(target=_issue_until_dead, args=(console, c, csr, acked, lock))
        for c in credentials
    ]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 120
    while len(acked) < KILL_AFTER_ACKS and time.monotonic() < deadline:
        time.sleep(0.01)
    console.stop(signal.SIGKILL)
    for worker in workers:
        worker.join(timeout=60)
    assert len(acked) >= KILL_AFTER_ACKS, console.log()

    restarted = start_console(tmp_path, data_dir, port)
    try:
        with restarted.local() as (session, _):
            rows = {r.serial: r for r in session.execute(select(Certificate)).scalars()}
        for body in acked:
            cert = x509.load_pem_x509_certificate(body["certificate"].encode())
            serial = format(cert.serial_number, "x")
            assert serial in rows, f"acknowledged certificate {serial} lost"
            assert rows[serial].thumbprint == body["thumbprint"]
        assert len(rows) == len(set(rows)) and len({r.thumbprint for r in rows.values()}) == len(
            rows
        )
        with restarted.client() as client:
            assert client.get("/healthz").status_code == 200
    finally:
        restarted.stop()
