"""certgate.console.notify: commits by other processes wake the console's long-polls in well
under the 1 s recheck (``api.tunnel.CROSS_NODE_RECHECK_S``), on SQLite (another process on
the same file, the real CLI included) and on PostgreSQL (another node; after a dropped
listener connection too).

Every wait below is shorter than the recheck: a ``FeedNotifier.wait`` returns what woke it
(None: nothing did), and nothing in these tests notifies but the watcher under test.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update

from certgate.console import local
from certgate.console.app import create_app
from certgate.console.notify import (
    LISTENER_NAME,
    PostgresListener,
    SQLiteWatcher,
    change_watcher,
)
from certgate.console.services import ca, feed
from certgate.console.state import ConsoleState
from certgate.console.store.db import Database, migrate
from certgate.console.store.models import Group
from certgate.pki.keys import KeyAlgorithm
from tests.console.conftest import add_device
from tests.postgres import PostgresServer
from tests.support import CERTGATE

WAKE_WITHIN_S = 0.5  # shorter than the 1 s recheck: a wake in time came from the watcher
QUIET_S = 0.2  # how long a group must stay unwoken to count as not woken
HANG_GUARD_S = 20.0  # a bound against hanging, not a timing
WATCHER_THREAD = "certgate-feed-watch"

# A process of its own that opens the database as the CLI does, and commits one feed event
# to group argv[2] when told to on stdin.
CHILD = """
import sys
from certgate.console.services import feed
from certgate.console.store.db import Database

db = Database(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
with db.transaction() as session:
    feed.emit(session, sys.argv[2], [{"op": "delete", "thumbprint": "00" * 32,
                                      "device_uid": "u", "group_id": sys.argv[2]}])
print("committed", flush=True)
db.dispose()
"""


def new_group(db: Database) -> str:
    group_id = f"notify-{secrets.token_hex(4)}"
    with db.transaction() as session:
        session.add(Group(id=group_id, name=group_id, parent_id=None, created_at=ca.now()))
    return group_id


def emit_one(db: Database, group_id: str) -> None:
    entry = {"op": "delete", "thumbprint": secrets.token_hex(32), "device_uid": "u"}
    with db.transaction() as session:
        feed.emit(session, group_id, [{**entry, "group_id": group_id}])


def rename(db: Database, group_id: str) -> None:
    """A commit that changes no feed."""
    with db.transaction() as session:
        session.execute(update(Group).where(Group.id == group_id).values(name="renamed"))


def run_bound(scenario: Callable[[feed.FeedNotifier], Awaitable[None]]) -> None:
    """Run ``scenario`` on a new event loop that a new notifier is bound to."""

    async def main() -> None:
        notifier = feed.FeedNotifier()
        notifier.bind(asyncio.get_running_loop())
        await asyncio.wait_for(scenario(notifier), HANG_GUARD_S * 2)

    asyncio.run(main())
    assert WATCHER_THREAD not in {t.name for t in threading.enumerate()}  # stopped


async def woken_by(
    notifier: feed.FeedNotifier, group: str, commit: Callable[[], Any], within: float
) -> tuple[str | None, float]:
    """Wait on ``group`` while ``commit`` runs on a worker thread; (what woke it, seconds)."""
    waiting = asyncio.create_task(notifier.wait(group, within))
    await asyncio.sleep(0)  # the waiter is registered
    started = time.monotonic()
    await asyncio.to_thread(commit)
    woken = await waiting
    return woken, time.monotonic() - started


def test_a_wake_between_reading_the_feed_and_waiting_is_not_lost() -> None:
    """A long-poll reads the feed, then waits: a commit in between must end the wait at
    once, not at the recheck (``mark`` taken before the read, passed to ``wait``)."""

    async def scenario(notifier: feed.FeedNotifier) -> None:
        mark = notifier.mark("g")
        notifier.notify(["g"], feed.WAKE_NOTIFY)  # as from the listener thread
        await asyncio.sleep(0)  # delivered, with no waiter registered yet
        assert notifier.mark("g") != mark
        assert await notifier.wait("g", HANG_GUARD_S, since=mark) == feed.WAKE_NOTIFY
        assert await notifier.wait("g", QUIET_S, since=notifier.mark("g")) is None
        assert await notifier.wait("other", QUIET_S, since=notifier.mark("other")) is None
        mark = notifier.mark("other")
        notifier.notify_all()
        await asyncio.sleep(0)
        assert await notifier.wait("other", HANG_GUARD_S, since=mark) == feed.WAKE_RECONNECT

    run_bound(scenario)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[tuple[Database, str]]:
    path = tmp_path / "console.db"
    db = Database(f"sqlite:///{path}")
    migrate(db.engine)
    try:
        yield db, str(path)
    finally:
        db.dispose()


def test_a_commit_by_another_process_wakes_its_group_within_the_bound(
    sqlite_db: tuple[Database, str],
) -> None:
    db, path = sqlite_db
    group = new_group(db)

    async def scenario(notifier: feed.FeedNotifier) -> None:
        watcher = SQLiteWatcher(path, notifier)
        watcher.start()
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, db.url, group],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdin is not None and child.stdout is not None
        try:
            assert await asyncio.to_thread(child.stdout.readline) == "ready\n"
            assert not await notifier.wait(group, QUIET_S)  # no wake without a commit

            def commit() -> None:
                assert child.stdin is not None and child.stdout is not None
                child.stdin.write("go\n")
                child.stdin.flush()
                assert child.stdout.readline() == "committed\n"

            woken, took = await woken_by(notifier, group, commit, WAKE_WITHIN_S)
        finally:
            child.communicate(timeout=HANG_GUARD_S)
            watcher.stop()
        print(f"woken by the other process's commit within {took * 1000:.0f} ms")
        assert woken == feed.WAKE_DATA_VERSION
        assert child.returncode == 0

    run_bound(scenario)


def test_only_the_groups_whose_feed_moved_are_woken(sqlite_db: tuple[Database, str]) -> None:
    """A commit that moves no feed wakes nobody: a long-poll's own commit (it records the
    node's call) must not wake the long-polls again."""
    db, path = sqlite_db
    moved, still = new_group(db), new_group(db)

    async def scenario(notifier: feed.FeedNotifier) -> None:
        watcher = SQLiteWatcher(path, notifier)
        watcher.start()
        try:
            assert not await notifier.wait(moved, QUIET_S)
            other = asyncio.create_task(notifier.wait(still, QUIET_S + WAKE_WITHIN_S))
            woken, _ = await woken_by(notifier, moved, lambda: emit_one(db, moved), WAKE_WITHIN_S)
            assert woken == feed.WAKE_DATA_VERSION
            assert not await other
            rename(db, moved)
            assert not await notifier.wait(moved, QUIET_S)
        finally:
            watcher.stop()

    run_bound(scenario)


def test_the_served_console_wakes_on_a_change_by_the_real_cli(tmp_path: Path) -> None:
    """End to end on SQLite: the app's lifespan starts the watcher; ``certgate console device
    set`` in its own process wakes the console's waiter of the device's group; the lifespan
    stops the watcher."""
    config, _ = local.init(
        tmp_path / "console", KeyAlgorithm.EC_P256, "https://127.0.0.1:1", "127.0.0.1", 1, None
    )
    db, _ = local.open_db(config)
    try:
        with db.transaction() as session:
            uid = add_device(session, local.TOP_GROUP)
    finally:
        db.dispose()
    state = ConsoleState.open(config)
    cli = [*CERTGATE, "console", "device", "set", uid, "--compliance", "noncompliant"]

    async def scenario() -> None:
        app = create_app(state)
        async with app.router.lifespan_context(app):
            assert WATCHER_THREAD in {t.name for t in threading.enumerate()}
            assert not await state.notifier.wait(local.TOP_GROUP, QUIET_S)
            waiting = asyncio.create_task(woken_at(state.notifier, local.TOP_GROUP))
            done = await asyncio.to_thread(
                subprocess.run,
                [*cli, "-d", str(config.data_dir)],
                capture_output=True,
                text=True,
                timeout=HANG_GUARD_S * 3,
            )
            exited = time.monotonic()
            assert done.returncode == 0, done.stderr
            woken = await waiting
        assert WATCHER_THREAD not in {t.name for t in threading.enumerate()}
        assert woken is not None
        print(f"woken {(exited - woken) * 1000:.0f} ms before the CLI process exited")

    try:
        asyncio.run(scenario())
        with state.db.read_only() as session:
            assert feed.current_seq(session, local.TOP_GROUP) > 0  # the CLI's change
    finally:
        state.db.dispose()


async def woken_at(notifier: feed.FeedNotifier, group: str) -> float | None:
    return time.monotonic() if await notifier.wait(group, HANG_GUARD_S) else None


# PostgreSQL


@pytest.fixture
def pg_db(postgres: PostgresServer) -> Iterator[Database]:
    db = Database(postgres.create_database(f"notify{secrets.token_hex(4)}"))
    migrate(db.engine)
    try:
        yield db
    finally:
        db.dispose()


def listener_pid(db: Database, other_than: int | None = None) -> int:
    """The pid of the listener's backend once it LISTENs (and is not ``other_than``)."""
    query = text(
        "SELECT pid FROM pg_stat_activity WHERE application_name = :name"
        " AND query LIKE 'LISTEN %' AND pid IS DISTINCT FROM :other"
    )
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        with db.read_only() as session:
            pid = session.execute(query, {"name": LISTENER_NAME, "other": other_than}).scalar()
        if pid is not None:
            return int(pid)
        time.sleep(0.02)
    raise AssertionError("the listener never listened")


def test_a_commit_by_another_node_wakes_its_group_and_a_rollback_does_not(
    pg_db: Database,
) -> None:
    group = new_group(pg_db)

    async def scenario(notifier: feed.FeedNotifier) -> None:
        listener = change_watcher(pg_db.url, notifier)
        assert isinstance(listener, PostgresListener)
        listener.start()
        try:
            await asyncio.to_thread(listener_pid, pg_db)
            assert not await notifier.wait(group, QUIET_S)  # the connect's wake is past
            woken, took = await woken_by(
                notifier, group, lambda: emit_one(pg_db, group), WAKE_WITHIN_S
            )
            print(f"woken by another node's commit within {took * 1000:.0f} ms")
            assert woken == feed.WAKE_NOTIFY
            woken, _ = await woken_by(notifier, group, lambda: rolled_back(pg_db, group), QUIET_S)
            assert not woken
        finally:
            listener.stop()

    run_bound(scenario)


def rolled_back(db: Database, group_id: str) -> None:
    entry = {"op": "delete", "thumbprint": secrets.token_hex(32), "device_uid": "u"}
    with pytest.raises(RuntimeError), db.transaction() as session:
        feed.emit(session, group_id, [{**entry, "group_id": group_id}])
        raise RuntimeError("the change failed")


def test_a_dropped_listener_reconnects_wakes_everyone_and_still_delivers(
    pg_db: Database,
) -> None:
    group = new_group(pg_db)

    async def scenario(notifier: feed.FeedNotifier) -> None:
        listener = change_watcher(pg_db.url, notifier)
        assert isinstance(listener, PostgresListener)
        listener.start()
        try:
            first = await asyncio.to_thread(listener_pid, pg_db)
            assert not await notifier.wait(group, QUIET_S)
            woken, _ = await woken_by(
                notifier, group, lambda: terminate(pg_db, first), HANG_GUARD_S
            )
            assert woken == feed.WAKE_RECONNECT  # notifications may have been lost
            second = await asyncio.to_thread(listener_pid, pg_db, first)
            assert second != first
            woken, _ = await woken_by(
                notifier, group, lambda: emit_one(pg_db, group), WAKE_WITHIN_S
            )
            assert woken == feed.WAKE_NOTIFY
        finally:
            listener.stop()

    run_bound(scenario)


def terminate(db: Database, pid: int) -> None:
    with db.read_only() as session:
        assert session.execute(select(text("pg_terminate_backend(:pid)")), {"pid": pid}).scalar()


# Run with psycopg unimportable, as in a wheel installed without the ``postgres`` extra.
WITHOUT_PSYCOPG = """
import asyncio, importlib, pkgutil, sys
from pathlib import Path
from importlib.abc import MetaPathFinder

class NoPsycopg(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "psycopg" or name.startswith("psycopg."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoPsycopg())
import certgate.console
from certgate.console import local
from certgate.console.app import create_app
from certgate.console.notify import SQLiteWatcher, change_watcher
from certgate.console.state import ConsoleState
from certgate.pki.keys import KeyAlgorithm

for module in pkgutil.walk_packages(certgate.console.__path__, "certgate.console."):
    importlib.import_module(module.name)
config, _ = local.init(
    Path(sys.argv[1]), KeyAlgorithm.EC_P256, "https://127.0.0.1:1", "127.0.0.1", 1, None
)
state = ConsoleState.open(config)
assert isinstance(state.change_watcher, SQLiteWatcher), state.change_watcher

async def serve():
    app = create_app(state)
    async with app.router.lifespan_context(app):
        await asyncio.sleep(0.1)

asyncio.run(serve())
state.db.dispose()
try:
    change_watcher("postgresql://u@127.0.0.1/db", state.notifier)
except ModuleNotFoundError as exc:
    print("postgres refused:", exc.name)
assert "psycopg" not in sys.modules
print("served without psycopg")
"""


def test_the_sqlite_console_runs_without_psycopg(tmp_path: Path) -> None:
    """psycopg is the ``postgres`` extra: every console module imports, and a SQLite
    console starts and stops its watcher, in a process where psycopg cannot be imported
    (a meta-path finder refuses it); only a PostgreSQL listener needs it."""
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PSYCOPG, str(tmp_path / "console")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "postgres refused: psycopg",
        "served without psycopg",
    ]
