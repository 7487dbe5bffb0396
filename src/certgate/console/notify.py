"""Wake-ups for commits this process did not make: other console nodes, the local CLI.

A commit in this process wakes its long-polls at once (``Database.on_commit``). A commit by
another process (a second console node on the same PostgreSQL, or ``certgate console ...``
opening the SQLite file directly) would otherwise be seen only by the long-poll's recheck
(``api.tunnel.CROSS_NODE_RECHECK_S``, 1 s), which stays as the safety net for anything
missed here.

PostgreSQL: ``feed.emit`` sends ``pg_notify(FEED_CHANNEL, group)`` inside the transaction
that made the change. NOTIFY is transactional: delivered only when that transaction
commits, after its changes are visible, and never for one rolled back; so a woken long-poll
finds the events. ``PostgresListener`` holds one dedicated autocommit connection that
LISTENs; a notification sent while it is disconnected is lost, so each (re)connection wakes
every group. PostgreSQL serialises the commits of notifying transactions on one global
queue lock: cheap at console write rates, not free.

SQLite has no notifications between processes. Watching the file (inotify) would report
writes, not commits: the WAL is written before a transaction commits or rolls back, a
checkpoint copies old commits into the main file, and the watch is platform specific.
``PRAGMA data_version`` answers exactly "did another connection, in any process, commit
since I last asked" from the shared-memory WAL index, for a few microseconds a call.
``SQLiteWatcher`` asks every ``SQLITE_POLL_S``; on a change it reads each group's
``feed_seq`` (one small query) and wakes the groups whose seq moved. Waking every group on
every data_version change would loop: each woken long-poll commits (``touch_node`` records
the node's call), which changes data_version again.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import TYPE_CHECKING, Any, Protocol
from urllib.request import pathname2url

from sqlalchemy.engine import URL, make_url

from certgate.console.services.feed import (
    FEED_CHANNEL,
    WAKE_DATA_VERSION,
    WAKE_NOTIFY,
    FeedNotifier,
)

if TYPE_CHECKING:  # psycopg is the ``postgres`` extra: imported where a listener runs
    import psycopg

log = logging.getLogger("certgate.console.notify")

SQLITE_POLL_S = 0.02
STOP_POLL_S = 0.2  # how often the PostgreSQL listener looks up to see whether to stop
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.1, 5.0
LISTENER_NAME = "certgate-feed-listener"  # application_name, seen in pg_stat_activity
JOIN_TIMEOUT_S = 5.0
# libpq settings: give up connecting after 5 s; notice a silently dead peer in about 11 s.
_PG_OPTIONS: dict[str, Any] = {
    "application_name": LISTENER_NAME,
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}


class ChangeWatcher(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


def change_watcher(db_url: str, notifier: FeedNotifier) -> ChangeWatcher | None:
    """The watcher for the database at ``db_url`` (None: no other process can write it)."""
    url = make_url(db_url)
    if url.get_backend_name() == "postgresql":
        return PostgresListener(url.set(drivername="postgresql"), notifier)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return SQLiteWatcher(url.database, notifier)
    return None


class _Worker:
    """A daemon thread running ``_run`` until ``stop``."""

    name = "certgate-feed-watch"

    def __init__(self, notifier: FeedNotifier) -> None:
        self._notifier = notifier
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        assert self._thread is None, "started twice"
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("%s did not stop within %s s", self.name, JOIN_TIMEOUT_S)

    def _run(self) -> None:
        raise NotImplementedError


class SQLiteWatcher(_Worker):
    """Wakes the groups whose feed another connection (any process) committed to."""

    def __init__(self, path: str, notifier: FeedNotifier, interval: float = SQLITE_POLL_S):
        super().__init__(notifier)
        self._path, self._interval = path, interval
        self._version = 0
        self._seqs: dict[str, int] = {}

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        pause = 0.0  # the first look at once: it takes the baseline
        try:
            while not self._stopping.wait(pause):
                pause = self._interval
                try:
                    if conn is None:
                        conn = self._connect()
                    self._check(conn)
                except sqlite3.Error:
                    log.exception("watching %s failed; retrying", self._path)
                    if conn is not None:
                        conn.close()
                    conn, pause = None, RECONNECT_MAX_S
                    self._notifier.notify_all()  # a change may be missed while away
        finally:
            if conn is not None:
                conn.close()

    def _connect(self) -> sqlite3.Connection:
        """A connection of our own, and the feed seqs as it first sees them.

        Autocommit, so no read transaction stays open between polls to hold back
        checkpoints; mode=rw, so a missing file is an error, not a new empty database."""
        uri = f"file:{pathname2url(self._path)}?mode=rw"
        conn = sqlite3.connect(uri, uri=True, timeout=1.0, isolation_level=None)
        try:
            self._version = _data_version(conn)
            self._seqs = _feed_seqs(conn)
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _check(self, conn: sqlite3.Connection) -> None:
        version = _data_version(conn)
        if version == self._version:
            return
        self._version = version
        seqs = _feed_seqs(conn)
        moved = [group for group, seq in seqs.items() if self._seqs.get(group) != seq]
        self._seqs = seqs
        if moved:
            self._notifier.notify(moved, WAKE_DATA_VERSION)


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def _feed_seqs(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT id, feed_seq FROM groups").fetchall())


class PostgresListener(_Worker):
    """LISTENs on ``FEED_CHANNEL`` and wakes the group each notification names."""

    def __init__(self, url: URL, notifier: FeedNotifier) -> None:
        from psycopg.conninfo import make_conninfo  # only a PostgreSQL console has psycopg

        super().__init__(notifier)
        self._conninfo = make_conninfo(url.render_as_string(hide_password=False), **_PG_OPTIONS)

    def _run(self) -> None:
        import psycopg

        delay = RECONNECT_MIN_S
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {FEED_CHANNEL}")
                    delay = RECONNECT_MIN_S
                    self._notifier.notify_all()  # what was sent while we were away is lost
                    self._listen(conn)
            except psycopg.Error as exc:
                log.warning("feed listener: %s; reconnecting in %.1f s", exc, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        while not self._stopping.is_set():
            for note in conn.notifies(timeout=STOP_POLL_S):
                self._notifier.notify([note.payload], WAKE_NOTIFY)
