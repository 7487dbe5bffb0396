"""Shared fixtures: real consoles (SQLite and PostgreSQL), throwaway PostgreSQL servers."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import PostgresServer
from tests.support import RunningConsole, init_console, start_console

_db_names = itertools.count()

# The CLIs' rich consoles read the terminal width once, when their module is imported; under
# pytest (and pytest-xdist workers) there is no terminal, and identifiers the tests look
# for in tables would be cut at 80 columns, depending on which test imported a CLI first.
os.environ["COLUMNS"] = "250"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def console(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningConsole]:
    """A real console process, on each storage backend, with a `global` top group and a
    superadmin `root`."""
    work = tmp_path_factory.mktemp(f"console-{request.param}")
    db_url = None
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        db_url = server.create_database(f"console{next(_db_names)}")
    data_dir, port = init_console(work, db_url=db_url)
    running = start_console(work, data_dir, port)
    running.make_admin("root", "superadmin", "global")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path
