"""Engine, sessions and migrations.

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is on disk before we answer,
so a kill -9 loses nothing acknowledged) and every transaction begins IMMEDIATE, so
writers serialise instead of failing on lock upgrades. PostgreSQL needs none of this.
A unit of work that only reads (``Database.read_only``) begins a deferred transaction
instead and takes no write lock: under WAL it reads one consistent snapshot and blocks
no writer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).with_name("migrations")
log = logging.getLogger("certgate.console.store")
# pg_advisory_xact_lock key of schema migrations: int64 of the bytes "certgate".
MIGRATION_LOCK = int.from_bytes(b"certgate", "big") & (2**63 - 1)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite's own BEGIN handling is turned off so that ours (IMMEDIATE) is used.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    for pragma in (
        "journal_mode=WAL",
        "synchronous=FULL",
        "foreign_keys=ON",
        "busy_timeout=30000",
    ):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


READ_ONLY = "certgate_read_only"  # execution option of a read-only unit's connection


def _sqlite_begin(conn: Any) -> None:
    deferred = conn.get_execution_options().get(READ_ONLY, False)
    conn.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Consoles started together: one migrates (DDL is transactional), the others
            # wait here, then find the schema at head. Released at commit.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Database:
    """The console's handle on storage: an engine and a session factory.

    ``session_info`` is copied into every session's ``info`` (the audit chain's MAC key
    travels this way, so no caller of ``audit.append`` handles it)."""

    def __init__(self, url: str, session_info: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(
            self.engine, expire_on_commit=False, info=dict(session_info or {})
        )
        self._commit_hooks: list[Callable[[dict[Any, Any]], None]] = []
        # SQLite has one writer and every transaction here begins IMMEDIATE: this process's
        # threads queue on a lock instead of sleeping in SQLite's busy handler, whose back-off
        # (up to 100 ms a retry) left the lock idle while requests waited. Re-entrant, so a
        # nested transaction still fails on busy_timeout as before instead of deadlocking.
        self._write_lock: AbstractContextManager[Any] = (
            threading.RLock() if self.engine.dialect.name == "sqlite" else nullcontext()
        )

    def on_commit(self, hook: Callable[[dict[Any, Any]], None]) -> None:
        """Call ``hook(session.info)`` after each successful commit."""
        self._commit_hooks.append(hook)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: committed when the block exits cleanly, else rolled back."""
        with self._sessions() as session:
            with self._write_lock, session.begin():
                yield session
            for hook in self._commit_hooks:
                try:
                    hook(session.info)
                except Exception:  # committed: a lost notification must not fail the caller
                    log.exception("commit hook failed")

    @contextmanager
    def read_only(self) -> Iterator[Session]:
        """A unit of work that only reads, rolled back at the end (nothing it wrote stays).

        On SQLite it neither queues on this process's write lock nor takes SQLite's: a
        snapshot page (a tenth of a second of reading) no longer holds up every writer."""
        with self._sessions() as session:
            session.connection(execution_options={READ_ONLY: True})
            try:
                yield session
            finally:
                session.rollback()

    def dispose(self) -> None:
        self.engine.dispose()
