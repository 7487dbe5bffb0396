"""The console's data directory on a real, small tmpfs, filled to the last byte, then freed.

While the disk is full every answer is JSON (503 with Retry-After when storage fails, never a
text/plain 500; on the web console the same 503 as its error page), ``/healthz`` is 503 and
names the database, ``/livez`` stays 200. After the filler is deleted the console recovers
by itself (no restart), the SQLite file passes ``PRAGMA integrity_check``, and every group
whose creation was acknowledged (201) is there.
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.console.ui.support import csrf_of, sign_in, web_admin
from tests.support import RunningConsole, init_console, make_csr, start_console

pytestmark = pytest.mark.integration

TMPFS_SIZE = "24m"
RECOVERY_TIMEOUT_S = 120.0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of TMPFS_SIZE mounted for this test only, always unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount)])
    if not os.path.ismount(mount):
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(disk: Path) -> Path:
    """Write a file until the filesystem refuses even one more byte; returns the file."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out:
        for chunk in (1 << 20, 4096, 1):
            while True:
                try:
                    out.write(b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    assert os.statvfs(disk).f_bavail == 0
    return filler


def _create_group(admin: httpx.Client, name: str, acked: list[str]) -> httpx.Response:
    response = admin.post("/api/v1/groups", json={"id": name, "parent_id": "global"})
    assert response.headers["content-type"] == "application/json", response.text
    assert set(response.json()) >= {"error", "detail"} or response.status_code == 201
    if response.status_code == 201:
        acked.append(name)
    return response


def _issue(device: httpx.Client, csr: str, serials: list[str]) -> httpx.Response:
    """A device profile (the writer thread's group commit); records acknowledged serials."""
    response = device.post("/api/v1/device/profile", json={"csr": csr})
    assert response.headers["content-type"] == "application/json", response.text
    if response.status_code == 201:
        cert = x509.load_pem_x509_certificate(response.json()["certificate"].encode())
        serials.append(format(cert.serial_number, "x"))
    return response


def _enrolled_device(console: RunningConsole) -> str:
    with console.client(console.admins["root"]) as admin:
        admin.post(
            "/api/v1/groups/global/enrollment-users",
            json={"username": "bob", "password": "bob-password"},
        ).raise_for_status()
    with console.client() as client:
        response = client.post(
            "/api/v1/enroll",
            json={"username": "bob", "password": "bob-password", "platform": "linux"},
        )
    response.raise_for_status()
    credential: str = response.json()["credential"]
    return credential


def _assert_storage_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"].isdigit()
    body = response.json()
    assert body["error"] == "storage_unavailable"
    assert "full" in body["detail"] or "disk" in body["detail"]


@pytest.fixture
def console(tmp_path: Path, small_disk: Path) -> Iterator[RunningConsole]:
    data_dir, port = init_console(small_disk)
    running = start_console(tmp_path, data_dir, port)
    running.make_admin("root", "superadmin", "global")
    try:
        yield running
    finally:
        running.stop()


def test_disk_full_then_freed(console: RunningConsole, small_disk: Path) -> None:
    acked: list[str] = []
    serials: list[str] = []
    csr = make_csr()[0].decode()
    credential = _enrolled_device(console)
    with (
        console.client(console.admins["root"]) as admin,
        console.client() as anonymous,
        console.client(api_key=credential) as device,
        sign_in(console, web_admin(console, "superadmin", "global")) as browser,
    ):
        for i in range(5):
            assert _create_group(admin, f"before-{i}", acked).status_code == 201
            assert _issue(device, csr, serials).status_code == 201
        filler = _fill(small_disk)

        # Writes: the WAL may still have room for a few; once it has none, 503s only.
        statuses = [_create_group(admin, f"full-{i}", acked).status_code for i in range(40)]
        assert set(statuses) <= {201, 503}, statuses
        assert statuses[-1] == 503, statuses
        _assert_storage_503(_create_group(admin, "one-more", acked))
        _assert_storage_503(admin.get("/api/v1/groups"))
        _assert_storage_503(_issue(device, csr, serials))
        # A web console form that writes (sign out) gets the same 503 as the error page.
        token = csrf_of(browser.get("/ui/"))  # reads still work
        page = browser.post("/ui/logout", data={"csrf": token})
        assert page.status_code == 503, page.text
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["retry-after"].isdigit() and "Back to the dashboard" in page.text
        health = anonymous.get("/healthz")
        assert health.status_code == 503, health.text
        assert health.json()["error"] == "unhealthy"
        assert health.json()["detail"].startswith("database: ")
        assert health.json()["checks"]["signer"] == "ok"
        assert anonymous.get("/livez").json() == {"status": "alive"}

        filler.unlink()
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while anonymous.get("/healthz").status_code != 200:
            assert time.monotonic() < deadline, "the console did not recover by itself"
            time.sleep(0.5)
        for i in range(5):
            assert _create_group(admin, f"after-{i}", acked).status_code == 201
            assert _issue(device, csr, serials).status_code == 201
        with console.client() as local:  # /metrics answers loopback clients
            metrics = local.get("/metrics").text
        failures = re.search(r'certgate_server_failures_total\{kind="database"\} (\S+)', metrics)
        assert failures is not None and float(failures.group(1)) >= 40
        for name in acked:
            assert admin.get(f"/api/v1/groups/{name}").status_code == 200, name
    console.stop()

    db = sqlite3.connect(console.data_dir / "console.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = {row[0] for row in db.execute("SELECT id FROM groups")}
        issued = {row[0] for row in db.execute("SELECT serial FROM certificates")}
    finally:
        db.close()
    assert set(acked) <= stored
    assert len(serials) == 10 and set(serials) <= issued
    assert {f"before-{i}" for i in range(5)} | {f"after-{i}" for i in range(5)} <= stored
