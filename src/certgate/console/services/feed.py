"""The device feed: per-group, gapless sequence of changes a tunnel applies in order.

What travels is the contract's (``certgate.feed``): entries, deletions and the group
policy, encoded by its types. A node asks for a contract version; ``for_version`` drops
what an older version cannot carry (policy operations), keeping the seqs.

Writers lock the group row by bumping ``feed_seq`` and insert events in the transaction that
made the change, so an event exists exactly when its change committed. Snapshot readers
take the same row lock in shared mode, so a snapshot and its ``seq`` always agree. On
PostgreSQL that transaction also sends ``NOTIFY`` on ``FEED_CHANNEL``, delivered when it
commits, so that other console nodes wake their long-polls (``console.notify``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    Select,
    bindparam,
    func,
    insert,
    select,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import Join

from certgate.console.services.ca import now
from certgate.console.store.models import Certificate, Device, FeedEvent, Group
from certgate.errors import NotFound
from certgate.feed import (
    ATTRIBUTE_FIELDS,
    MIN_FEED_VERSION,
    POLICY_VERSION,
    ComplianceStatus,
    Delete,
    EnrollmentStatus,
    Entry,
    PolicyUpdate,
    trust_kinds_of,
)

CLIENT_KINDS = ("device", "app")
MAX_BATCH = 5000
FEED_GROUPS_KEY = "certgate.feed_groups"
FEED_CHANNEL = "certgate_feed"  # PostgreSQL NOTIFY channel; the payload is a group id


def entry_of(cert: Certificate, device: Device) -> Entry:
    """The feed entry of a device or app certificate, as its device stands now."""
    return Entry(
        cert.thumbprint,
        device.uid,
        device.group_id,
        cert.bundle_id,
        EnrollmentStatus(device.enrollment_status),
        ComplianceStatus(device.compliance_status),
        device.blocked,
        int(cert.not_after.timestamp()),
    )


def upsert_entry(cert: Certificate, device: Device) -> dict[str, Any]:
    return entry_of(cert, device).encode()


def delete_entry(cert: Certificate) -> dict[str, Any]:
    assert cert.device_uid is not None and cert.group_id is not None  # client certs only
    return Delete(cert.thumbprint, cert.device_uid, cert.group_id).encode()


def policy_of(group: Group) -> PolicyUpdate:
    """The group policy at its current version (what nodes and devices apply)."""
    return PolicyUpdate.from_settings(group.policy_version, group.settings)


def emit_policy(session: Session, group: Group) -> int:
    """Publish the group's policy at its current version; returns the new seq."""
    return emit(session, group.id, [policy_of(group).encode()])


def for_version(entries: Iterable[dict[str, Any]], version: int) -> list[dict[str, Any]]:
    """The operations a node of contract ``version`` can read (docs/CONVENTIONS.md):
    policy operations from version 2, trust operations (rotations) from version 3, of
    the kinds ``trust_kinds_of(version)``."""
    kinds = trust_kinds_of(version)
    return [
        entry
        for entry in entries
        if (entry.get("op") != "policy" or version >= POLICY_VERSION)
        and (entry.get("op") != "trust" or entry.get("kind") in kinds)
    ]


def active_certs(session: Session, device_uid: str) -> list[Certificate]:
    return list(
        session.execute(
            select(Certificate).where(
                Certificate.device_uid == device_uid,
                Certificate.kind.in_(CLIENT_KINDS),
                Certificate.revoked_at.is_(None),
            )
        ).scalars()
    )


def emit(session: Session, group_id: str, entries: Iterable[dict[str, Any]]) -> int:
    """Append entries to ``group_id``'s feed; returns the new sequence number.

    Core statements on the session's connection: loading the group and flushing the events
    through the ORM cost 0.45-0.7 ms of the writer thread's ~2 ms per profile delivery."""
    conn = session.connection()
    if conn.dialect.name != "sqlite":
        # Pending ORM changes first, as the ORM query did by autoflush: rows changed are
        # locked before the group row, in one order for every writer (as ``audit.append``).
        session.flush()
    rows = list(entries)
    seq = _bump(session, conn, group_id, len(rows))
    first, stamp = seq - len(rows) + 1, now()
    if rows:
        events = [
            {"group_id": group_id, "seq": first + i, "entry": e, "created_at": stamp}
            for i, e in enumerate(rows)
        ]
        conn.execute(_INSERT_EVENTS, events)
    notified = session.info.setdefault(FEED_GROUPS_KEY, set())
    if group_id not in notified and conn.dialect.name == "postgresql":
        conn.execute(_NOTIFY, {"g": group_id})  # once a transaction: PostgreSQL folds repeats
    notified.add(group_id)
    return seq


# Built once, so they reuse their compiled form. The UPDATE takes the row lock the snapshot
# readers' share lock waits for (``current_seq``), so seqs stay gapless and in order.
_BUMP_SEQ = (
    update(Group)
    .where(Group.id == bindparam("g"))
    .values(feed_seq=Group.feed_seq + bindparam("n", type_=BigInteger))
    .returning(Group.feed_seq)
)
_INSERT_EVENTS = insert(FeedEvent)
_NOTIFY = select(func.pg_notify(FEED_CHANNEL, bindparam("g")))


def _bump(session: Session, conn: Connection, group_id: str, n: int) -> int:
    """Add ``n`` to the group's feed seq under its row lock; returns the new value."""
    seq = conn.execute(_BUMP_SEQ, {"g": group_id, "n": n}).scalar_one_or_none()
    if seq is None:
        # A group still pending in this session (SQLite skips the flush above): the ORM
        # query this replaced would have flushed it by autoflush.
        session.flush()
        seq = conn.execute(_BUMP_SEQ, {"g": group_id, "n": n}).scalar_one()
    group = session.identity_map.get(identity_key(Group, group_id))
    if group is not None:
        set_committed_value(group, "feed_seq", seq)  # the ORM copy stays true
    return int(seq)


def emit_device(session: Session, device: Device) -> int:
    """Publish the current state of every active cert of ``device``."""
    return emit(
        session,
        device.group_id,
        [upsert_entry(c, device) for c in active_certs(session, device.uid)],
    )


def batch_after(
    session: Session, group_id: str, cursor: int, limit: int = MAX_BATCH
) -> list[FeedEvent]:
    return list(
        session.execute(
            select(FeedEvent)
            .where(FeedEvent.group_id == group_id, FeedEvent.seq > cursor)
            .order_by(FeedEvent.seq)
            .limit(limit)
        ).scalars()
    )


SNAPSHOT_PAGE = 50_000


class EpochSeconds(FunctionElement[int]):
    """Whole seconds since 1970 of a UTC timestamp column, computed by the database.

    Converting 50,000 values a page to ``datetime`` and back cost about 7 % of a page."""

    type = Integer()
    inherit_cache = True


@compiles(EpochSeconds)
def _epoch_seconds_postgresql(element: EpochSeconds, compiler: Any, **kw: Any) -> str:
    return f"CAST(FLOOR(EXTRACT(EPOCH FROM {compiler.process(element.clauses, **kw)})) AS BIGINT)"


@compiles(EpochSeconds, "sqlite")
def _epoch_seconds_sqlite(element: EpochSeconds, compiler: Any, **kw: Any) -> str:
    # The store keeps UTC text ("2027-12-01 14:35:12.771298"); %s floors to whole seconds.
    return f"CAST(strftime('%s', {compiler.process(element.clauses, **kw)}) AS INTEGER)"


class DevicesCovered(Join):
    """``certificates JOIN devices`` whose devices side SQLite reads from the covering index
    ``ix_devices_snapshot`` (migration 0003) alone. Past the first page (a cursor in the
    query) SQLite's planner picks the devices primary key instead and reads every row from
    the table too: 2x the SQL time of a page (bench/FINDINGS.md). Other databases plan it
    themselves (a plain JOIN)."""

    inherit_cache = True


@compiles(DevicesCovered, "sqlite")
def _devices_covered_sqlite(join: DevicesCovered, compiler: Any, **kw: Any) -> str:
    assert join.onclause is not None  # built with one
    kw["asfrom"] = True
    left = join.left._compiler_dispatch(compiler, **kw)
    right = join.right._compiler_dispatch(compiler, **kw)
    on = join.onclause._compiler_dispatch(compiler, **{**kw, "asfrom": False})
    return f"{left} JOIN {right} INDEXED BY ix_devices_snapshot ON {on}"


# Row layout: thumbprint, device uid, not_after, then the ATTRIBUTE_FIELDS. Plain column
# types (no Boolean or datetime result processing), and only columns that the indexes of
# migration 0003 hold, so that a format 2 page is two index walks.
_SNAPSHOT_COLUMNS = (
    Certificate.thumbprint,
    Device.uid,
    EpochSeconds(Certificate.not_after),
    Device.group_id,
    Certificate.bundle_id,
    Device.enrollment_status,
    Device.compliance_status,
    type_coerce(Device.blocked, Integer),
)
_PageQuery = Select[str, str, int, str, str | None, str, str, int]
UID_HEX = 32  # a format 2 cursor: the device uid, then the thumbprint


def current_seq(session: Session, group_id: str, *, share_lock: bool = False) -> int:
    """The group's feed seq now. With ``share_lock`` its row stays share-locked until the
    transaction ends: writers bump it under an update lock (``emit``), so the entries read
    next agree with it."""
    query = select(Group.feed_seq).where(Group.id == group_id)
    if share_lock:
        query = query.with_for_update(read=True)
    seq = session.execute(query).scalar_one_or_none()
    if seq is None:
        raise NotFound(f"group {group_id!r} not found")
    return seq


def snapshot(
    session: Session, group_id: str, after: str = "", limit: int = SNAPSHOT_PAGE
) -> tuple[int, list[dict[str, Any]], str | None]:
    """Format 1: (seq, the live entries with thumbprint > ``after`` in thumbprint order as
    feed upsert objects, the next page's cursor or None when this one is the last).

    Each page carries the seq it was read at: a follower that assembles pages read at
    different seqs replays the feed from the first page's seq, which converges because
    upserts and deletes are idempotent per thumbprint.
    """
    seq = current_seq(session, group_id, share_lock=True)
    rows = session.connection().execute(_page_query(group_id, after, limit, False)).all()
    entries = [
        Entry(
            tp,
            uid,
            group,
            bundle,
            EnrollmentStatus(enrollment),
            ComplianceStatus(compliance),
            bool(blocked),
            not_after,
        ).encode()
        for tp, uid, not_after, group, bundle, enrollment, compliance, blocked in rows[:limit]
    ]
    following = entries[-1]["thumbprint"] if len(rows) > limit else None
    return seq, entries, following


def snapshot_columns(
    session: Session,
    group_id: str,
    after: str = "",
    limit: int = SNAPSHOT_PAGE,
    version: int = MIN_FEED_VERSION,
) -> dict[str, Any]:
    """Format 2: the payload of one columnar page (docs/CONVENTIONS.md, "Snapshot pages");
    from contract version 2 on it also carries the group policy at the page's seq.

    Entries come in (device uid, thumbprint) order and a cursor names both: walking the
    devices in uid order makes the join a sequential walk of their index (at 1,000,000
    devices, 0.17 s of CPU a page in thumbprint order, 0.075 s in device order).
    """
    seq = current_seq(session, group_id, share_lock=True)
    rows = session.connection().execute(_page_query(group_id, after, limit, True))
    entries, following = _columns(rows, limit)
    page = {"seq": seq, "after": after, "next": following, "entries": entries}
    if version >= 2:
        # Read under the same share lock as the seq: a policy change bumps it too.
        group = session.get(Group, group_id)
        assert group is not None  # current_seq found it
        page.update(version=version, policy=policy_of(group).encode())
    return page


def _page_query(group_id: str, after: str, limit: int, by_device: bool) -> _PageQuery:
    # Certificate.group_id (always the device's group) lets one index serve the group,
    # the cursor and the order. Run on Core, not the ORM: its row loading cost 50 ms a page.
    query = (
        select(*_SNAPSHOT_COLUMNS)
        .select_from(
            DevicesCovered(
                Certificate.__table__, Device.__table__, Device.uid == Certificate.device_uid
            )
        )
        .where(
            Certificate.group_id == group_id,
            Device.group_id == group_id,
            Certificate.kind.in_(CLIENT_KINDS),
            Certificate.revoked_at.is_(None),
        )
        .limit(limit + 1)
    )
    if not by_device:
        query = query.order_by(Certificate.thumbprint)
        return query.where(Certificate.thumbprint > after) if after else query
    query = query.order_by(Certificate.device_uid, Certificate.thumbprint)
    if not after:
        return query
    cursor = tuple_(Certificate.device_uid, Certificate.thumbprint)
    return query.where(cursor > tuple_(after[:UID_HEX], after[UID_HEX:]))


def _columns(rows: Iterable[Sequence[Any]], limit: int) -> tuple[dict[str, Any], str | None]:
    """A page's entries as columns, and the next page's cursor (None: this is the last).

    Thumbprints and device uids go as one hex string each, the ATTRIBUTE_FIELDS of every
    entry as an index into their distinct combinations (one group, a few apps and states:
    a page has a handful). Rows are consumed one at a time: holding a page's 50,000 row
    tuples until they were transposed cost more in cyclic garbage collection (0.075 s a
    page) than reading them.
    """
    thumbprints: list[str] = []
    uids: list[str] = []
    not_after: list[int] = []
    index: list[int] = []
    combinations: dict[tuple[Any, ...], int] = {}
    following = None
    for row in rows:
        if len(thumbprints) == limit:
            following = uids[-1] + thumbprints[-1]
            break
        thumbprints.append(row[0])
        uids.append(row[1])
        not_after.append(row[2])
        index.append(combinations.setdefault(tuple(row[3:]), len(combinations)))
    values = [[g, b, e, c, bool(blocked)] for g, b, e, c, blocked in combinations]
    attributes = {"fields": list(ATTRIBUTE_FIELDS), "values": values, "index": index}
    entries = {
        "count": len(thumbprints),
        "thumbprint": "".join(thumbprints),
        "device_uid": "".join(uids),
        "not_after": not_after,
        "attributes": attributes,
    }
    return entries, following


# What woke a long-poll (``FeedNotifier.wait``): a commit in this process, a PostgreSQL
# NOTIFY from another console node, the SQLite data_version watcher (another process on the
# file, e.g. the CLI), or a watcher's (re)connection, after which every group is woken.
WAKE_COMMIT, WAKE_NOTIFY, WAKE_DATA_VERSION, WAKE_RECONNECT = (
    "commit",
    "notify",
    "data_version",
    "reconnect",
)


class FeedNotifier:
    """Wakes long-polls when a transaction that emitted feed events commits.

    Commits happen on worker threads; waiters live on the event loop. Each group has an
    ``asyncio.Event`` that is set and replaced on every notification. A waiter reads the
    feed before it waits, so a wake in between would be lost: it takes ``mark`` before
    reading and passes it to ``wait``, which returns at once if a wake came since.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, asyncio.Event] = {}
        self._lock = threading.Lock()  # guards the counts, read by ``mark`` on any thread
        self._wakes: dict[str, int] = {}
        self._wakes_of_all = 0
        self._source: dict[str, str] = {}  # the group's latest wake-up (event loop only)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def notify(self, groups: Iterable[str], source: str = WAKE_COMMIT) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake, tuple(groups), source)

    def notify_all(self, source: str = WAKE_RECONNECT) -> None:
        """Wake every waiting group (changes may have been missed, e.g. on a reconnect)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake_all, source)

    def mark(self, group: str) -> int:
        """How often ``group`` was woken so far (any thread): take it before reading."""
        with self._lock:
            return self._wakes.get(group, 0) + self._wakes_of_all

    def _wake(self, groups: tuple[str, ...], source: str) -> None:
        with self._lock:
            for group in groups:
                self._wakes[group] = self._wakes.get(group, 0) + 1
        for group in groups:
            self._source[group] = source
            event = self._events.pop(group, None)
            if event is not None:
                event.set()

    def _wake_all(self, source: str) -> None:
        with self._lock:
            self._wakes_of_all += 1
        events, self._events = self._events, {}
        self._source = dict.fromkeys(self._source, source)
        for group, event in events.items():
            self._source[group] = source
            event.set()

    async def wait(self, group: str, timeout: float, since: int | None = None) -> str | None:
        """What woke ``group`` (a ``WAKE_*`` source), or None if ``timeout`` passed first.
        ``since``: a ``mark`` taken before the caller read the feed."""
        if since is None or self.mark(group) == since:
            event = self._events.setdefault(group, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except TimeoutError:
                return None
        return self._source.get(group, WAKE_RECONNECT)
