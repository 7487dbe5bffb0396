"""certgate.console.store.db: units of work on SQLite and PostgreSQL, and read-only units
that no writer waits for (snapshot pages are read in them)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from certgate.console.services import ca
from certgate.console.store.db import Database, migrate
from certgate.console.store.models import Group

HANG_GUARD_S = 20.0  # a bound against hanging, not a timing


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    migrate(database.engine)
    try:
        yield database
    finally:
        database.dispose()


def group(group_id: str) -> Group:
    return Group(id=group_id, name=group_id, parent_id=None, created_at=ca.now(), settings={})


def test_a_read_only_unit_reads_while_a_writer_holds_its_transaction(db: Database) -> None:
    with db.transaction() as session:
        session.add(group("before"))
    writing, release = threading.Event(), threading.Event()

    def writer() -> None:
        with db.transaction() as session:
            session.add(group("during"))
            session.flush()
            writing.set()
            release.wait(HANG_GUARD_S)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert writing.wait(HANG_GUARD_S)
        with db.read_only() as session:  # would wait for the writer if it took the lock
            names = session.execute(select(Group.id)).scalars().all()
    finally:
        release.set()
        thread.join(HANG_GUARD_S)
    assert names == ["before"]  # one consistent snapshot: the writer had not committed


def test_what_a_read_only_unit_writes_is_rolled_back(db: Database) -> None:
    with db.read_only() as session:
        session.add(group("discarded"))
        session.flush()
    with db.transaction() as session:
        assert session.get(Group, "discarded") is None
