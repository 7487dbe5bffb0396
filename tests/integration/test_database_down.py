"""The console's PostgreSQL stopped under it, then started again: while it is down every
answer that needs the database is 503 JSON with Retry-After, ``/healthz`` is 503 naming the
database, ``/livez`` stays 200; once it is back the console recovers by itself (no restart)
and what was acknowledged before is there."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import PostgresServer
from tests.support import RunningConsole, init_console, start_console

pytestmark = pytest.mark.integration

RECOVERY_TIMEOUT_S = 120.0


@pytest.fixture
def server() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own: it is stopped and started again."""
    pg = PostgresServer.start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture
def console(tmp_path: Path, server: PostgresServer) -> Iterator[RunningConsole]:
    data_dir, port = init_console(tmp_path, db_url=server.create_database("down"))
    running = start_console(tmp_path, data_dir, port)
    running.make_admin("root", "superadmin", "global")
    try:
        yield running
    finally:
        running.stop()


def test_database_stopped_then_started(console: RunningConsole, server: PostgresServer) -> None:
    group = {"id": "before", "parent_id": "global"}
    with console.client(console.admins["root"]) as admin, console.client() as anonymous:
        assert admin.post("/api/v1/groups", json=group).status_code == 201
        server.pause()
        for response in (
            admin.get("/api/v1/groups/before"),
            admin.post("/api/v1/groups", json={"id": "during", "parent_id": "global"}),
        ):
            assert response.status_code == 503, response.text
            assert response.headers["content-type"] == "application/json"
            assert response.headers["retry-after"].isdigit()
            assert response.json()["error"] == "storage_unavailable"
            assert response.json()["detail"].startswith("database: ")
        health = anonymous.get("/healthz")
        assert health.status_code == 503 and health.json()["detail"].startswith("database: ")
        assert str(server.port) not in health.text  # no internals to anonymous clients
        assert anonymous.get("/livez").status_code == 200

        server.resume()
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while anonymous.get("/healthz").status_code != 200:
            assert time.monotonic() < deadline, "the console did not recover by itself"
            time.sleep(0.5)
        assert admin.get("/api/v1/groups/before").status_code == 200
        after = admin.post("/api/v1/groups", json={"id": "after", "parent_id": "global"})
        assert after.status_code == 201, after.text
    assert console.proc.poll() is None  # it never restarted
