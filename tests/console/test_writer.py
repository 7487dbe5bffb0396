"""Group commit: work queued together commits together, every answer follows its commit, a
failing unit of work fails alone, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from certgate.console import local
from certgate.console.services import audit
from certgate.console.store.db import Database
from certgate.console.store.models import AuditEntry
from certgate.console.writer import Writer, WriterStopped
from certgate.errors import BadRequest
from tests.postgres import PostgresServer
from tests.support import init_console

_names = itertools.count()
WAIT_S = 60  # a bound for a hung writer, never a timing assertion


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = None
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        url = server.create_database(f"writer{next(_names)}")
    data_dir, _ = init_console(tmp_path, db_url=url)
    database, _ = local.open_db(local.load_config(data_dir))
    yield database
    database.dispose()


@pytest.fixture
def writer(db: Database) -> Iterator[Writer]:
    running = Writer(db)
    running.start()
    yield running
    running.stop()


class Held:
    """A first unit of work that blocks the writer until released, so that what is submitted
    meanwhile is queued and forms the next batch."""

    def __init__(self, writer: Writer) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.future = writer.submit(self._work)
        assert self.started.wait(WAIT_S)

    def _work(self, session: Session) -> None:
        self.started.set()
        assert self.release.wait(WAIT_S)


def record(n: int) -> Callable[[Session], str]:
    def work(session: Session) -> str:
        return audit.append(session, "test:writer", "test.batch", n=n)

    return work


def count_commits(db: Database) -> list[int]:
    commits: list[int] = []
    db.on_commit(lambda info: commits.append(1))
    return commits


def entries(db: Database) -> list[dict[str, Any]]:
    with db.transaction() as session:
        rows = session.execute(
            select(AuditEntry.detail).where(AuditEntry.action == "test.batch")
        ).scalars()
        return [dict(detail) for detail in rows]


def test_work_queued_together_commits_together(db: Database, writer: Writer) -> None:
    """On SQLite; on PostgreSQL each unit has its own transaction (row-lock order)."""
    commits = count_commits(db)
    held = Held(writer)
    futures = [writer.submit(record(n)) for n in range(5)]
    held.release.set()
    heads = [f.result(WAIT_S) for f in futures]
    assert held.future.result(WAIT_S) is None
    # The held unit alone, then the five queued meanwhile: together on SQLite only.
    assert len(commits) == (2 if db.engine.dialect.name == "sqlite" else 6)
    assert [e["n"] for e in entries(db)] == [0, 1, 2, 3, 4]
    with db.transaction() as session:
        report = audit.verify_chain(session)
    assert report.ok and len(set(heads)) == 5


def test_no_answer_before_its_commit(db: Database, writer: Writer) -> None:
    futures: list[Future[str]] = []
    done_at_own_commit: list[bool] = []
    db.on_commit(
        lambda info: done_at_own_commit.extend(futures[n].done() for n in info.get("units", ()))
    )

    def unit(n: int) -> Callable[[Session], str]:
        def work(session: Session) -> str:
            session.info.setdefault("units", []).append(n)
            return record(n)(session)

        return work

    held = Held(writer)
    futures.extend(writer.submit(unit(n)) for n in range(3))
    held.release.set()
    for future in futures:
        future.result(WAIT_S)
    assert done_at_own_commit == [False, False, False]


def failing(session: Session) -> None:
    audit.append(session, "test:writer", "test.batch", n="failed")
    raise BadRequest("this unit of work fails after writing")


def test_failing_work_fails_alone(db: Database, writer: Writer) -> None:
    commits = count_commits(db)
    held = Held(writer)
    first, bad, last = (writer.submit(w) for w in (record(1), failing, record(2)))
    held.release.set()
    with pytest.raises(BadRequest, match="fails after writing"):
        bad.result(WAIT_S)
    assert first.result(WAIT_S) != last.result(WAIT_S)  # two heads of the chain
    # SQLite: the held unit, then the two others again as one batch without the failed one.
    assert len(commits) == (2 if db.engine.dialect.name == "sqlite" else 3)
    assert [e["n"] for e in entries(db)] == [1, 2]  # the failed one's write rolled back
    with db.transaction() as session:
        assert audit.verify_chain(session).ok


def failing_at_commit(session: Session) -> None:
    """Leaves an invalid row pending: units run without autoflush, so the commit fails."""
    session.add(AuditEntry(action="test.batch"))


def test_a_failed_commit_runs_each_unit_alone(db: Database, writer: Writer) -> None:
    held = Held(writer)
    first, bad, last = (writer.submit(w) for w in (record(1), failing_at_commit, record(2)))
    held.release.set()
    with pytest.raises(IntegrityError):
        bad.result(WAIT_S)
    first.result(WAIT_S)
    last.result(WAIT_S)
    assert [e["n"] for e in entries(db)] == [1, 2]
    with db.transaction() as session:
        assert audit.verify_chain(session).ok


def test_abandoned_work_never_runs(db: Database, writer: Writer) -> None:
    held = Held(writer)
    abandoned, kept = writer.submit(record(1)), writer.submit(record(2))
    assert abandoned.cancel()
    held.release.set()
    kept.result(WAIT_S)
    with pytest.raises(CancelledError):
        abandoned.result(WAIT_S)
    assert [e["n"] for e in entries(db)] == [2]


def test_stop_commits_what_was_queued_then_refuses(db: Database) -> None:
    writer = Writer(db)
    with pytest.raises(WriterStopped):
        writer.submit(record(0))
    writer.start()
    held = Held(writer)
    queued = [writer.submit(record(n)) for n in range(3)]
    stopping = threading.Thread(target=writer.stop)
    stopping.start()
    held.release.set()
    stopping.join(WAIT_S)
    assert all(f.done() and f.exception() is None for f in queued)
    with pytest.raises(WriterStopped, match="not running"):
        writer.submit(record(4))
    assert [e["n"] for e in entries(db)] == [0, 1, 2]


def test_run_awaits_the_committed_result(db: Database, writer: Writer) -> None:
    head = asyncio.run(writer.run(record(7)))
    with db.transaction() as session:
        assert audit.verify_chain(session).ok
        stored = session.execute(select(AuditEntry.hash).order_by(AuditEntry.id.desc()))
        assert stored.scalars().first() == head
