"""Shared fixtures: a running console per test module, and per-test work dirs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import RunningConsole, init_console, start_console


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningConsole]:
    """A real console process with a `global` top group and a superadmin `root`."""
    work = tmp_path_factory.mktemp("console")
    data_dir, port = init_console(work)
    running = start_console(work, data_dir, port)
    running.make_admin("root", "superadmin", "global")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path
