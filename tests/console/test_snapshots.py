"""Tests for certgate.console.services.snapshots: format 2 pages signed once per feed seq,
shared between the nodes that ask, and the next page prepared ahead, on both backends.

The pages are read back with the tunnel's own decoder, so that what is kept and shared is
always a page a node accepts.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509

from certgate import jws
from certgate.console.services import ca, feed, groups
from certgate.console.services.snapshots import PageKey, SignedPage, SnapshotPages
from certgate.console.store.db import Database
from certgate.console.store.models import Device
from certgate.errors import NotFound
from certgate.tunnel.snapshot import decode_page
from certgate.tunnel.table import DeviceTable
from tests.console.conftest import add_device

LIMIT = 2
DEVICES = 5


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Reads:
    """Counts the pages read from the store (``feed.snapshot_columns`` calls)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self._lock = threading.Lock()
        real = feed.snapshot_columns

        def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
            with self._lock:
                self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(feed, "snapshot_columns", counted)


@pytest.fixture
def group(store: tuple[Database, ca.InstancePKI]) -> str:
    """A new group holding DEVICES devices with one certificate each."""
    db, pki = store
    group_id = f"snap-{secrets.token_hex(4)}"
    with db.transaction() as session:
        groups.create_group(session, pki, group_id, group_id, "global")
        for _ in range(DEVICES):
            add_device(session, group_id)
    return group_id


@pytest.fixture
def pages(store: tuple[Database, ca.InstancePKI]) -> Iterator[SnapshotPages]:
    made = SnapshotPages(*store)
    try:
        yield made
    finally:
        made.close()


def seq_of(store: tuple[Database, ca.InstancePKI], group_id: str) -> int:
    with store[0].transaction() as session:
        return feed.current_seq(session, group_id)


def console_cert(store: tuple[Database, ca.InstancePKI], group_id: str) -> x509.Certificate:
    with store[0].transaction() as session:
        return groups.group_certificates(session, group_id)[0]


def walk(pages: SnapshotPages, group_id: str, seq: int) -> list[SignedPage]:
    walked, after = [], ""
    while True:
        signed = pages.page(PageKey(group_id, after, LIMIT), seq)
        walked.append(signed)
        if signed.next is None:
            return walked
        after = signed.next


def table_of(walked: list[SignedPage], signer: x509.Certificate, group_id: str) -> DeviceTable:
    table, after = None, ""
    for signed in walked:
        payload = jws.verify(signed.token, signer, jws.TYP_SNAPSHOT_V2, group_id)
        decoded = decode_page(payload, after, LIMIT)
        table = table or DeviceTable(decoded.seq)
        table.extend_columns(decoded.columns)
        after = decoded.next or ""
    assert table is not None
    table.fit()  # the last page read: its entries placed
    return table


def test_every_page_is_read_once_for_all_the_nodes_that_ask(
    store: tuple[Database, ca.InstancePKI],
    group: str,
    pages: SnapshotPages,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads, seq = Reads(monkeypatch), seq_of(store, group)
    first = walk(pages, group, seq)
    second = walk(pages, group, seq)  # another node of the group (HA), or a retry
    assert len(first) == 3 and reads.count == 3  # the next page was prepared, not re-read
    assert [p.token for p in first] == [p.token for p in second]
    table = table_of(first, console_cert(store, group), group)
    assert (len(table), table.seq) == (DEVICES, seq)
    assert pages.kept_bytes == sum(len(p.token) for p in first)


def test_a_change_makes_the_pages_read_again_at_the_new_seq(
    store: tuple[Database, ca.InstancePKI],
    group: str,
    pages: SnapshotPages,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads, seq = Reads(monkeypatch), seq_of(store, group)
    before = walk(pages, group, seq)
    with store[0].transaction() as session:
        uid = add_device(session, group)
        device = session.get(Device, uid)
        assert device is not None
        feed.emit_device(session, device)
    moved = seq_of(store, group)
    after = walk(pages, group, moved)
    assert moved > seq and {p.seq for p in after} == {moved}
    assert len(table_of(after, console_cert(store, group), group)) == DEVICES + 1
    assert before[0].token != after[0].token and reads.count == len(before) + len(after)
    assert pages.kept_bytes == sum(len(p.token) for p in after)  # the old seq's pages went


def test_a_page_prepared_before_a_change_is_not_served_after_it(
    store: tuple[Database, ca.InstancePKI], group: str, pages: SnapshotPages
) -> None:
    seq = seq_of(store, group)
    first = pages.page(PageKey(group, "", LIMIT), seq)  # prepares the second page at seq
    assert first.next is not None
    with store[0].transaction() as session:
        device = session.get(Device, add_device(session, group))
        assert device is not None
        feed.emit_device(session, device)
    second = pages.page(PageKey(group, first.next, LIMIT), seq_of(store, group))
    assert second.seq == seq_of(store, group) > seq


def test_kept_pages_are_bounded_in_bytes_and_age(
    store: tuple[Database, ca.InstancePKI], group: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads, seq, clock = Reads(monkeypatch), seq_of(store, group), Clock()
    tiny = SnapshotPages(*store, max_bytes=1, clock=clock)
    aging = SnapshotPages(*store, max_age_s=60, clock=clock)
    try:
        walk(tiny, group, seq)
        assert tiny.kept_bytes == 0
        once = reads.count
        walk(tiny, group, seq)
        assert reads.count - once >= 3  # nothing kept: each of the 3 pages is read again
        reads.count = 0
        walk(aging, group, seq)
        walk(aging, group, seq)
        assert reads.count == 3
        clock.now += 61
        walk(aging, group, seq)
        assert reads.count == 6  # too old to serve: read and signed again
    finally:
        tiny.close()
        aging.close()


def test_a_failure_reaches_the_asker_and_leaves_nothing_pending(pages: SnapshotPages) -> None:
    for _ in range(2):  # the second ask reads again instead of waiting on the first
        with pytest.raises(NotFound, match="group 'no-such-group' not found"):
            pages.page(PageKey("no-such-group", "", LIMIT), 0)
    assert pages.kept_bytes == 0


def test_a_page_after_the_first_reads_devices_from_their_covering_index(
    store: tuple[Database, ca.InstancePKI], group: str
) -> None:
    """With a cursor, SQLite's planner chose the devices primary key and read each device
    row from the table too; the page asks for the covering index (``feed.DevicesCovered``)."""
    db, _ = store
    if db.engine.dialect.name != "sqlite":
        pytest.skip("INDEXED BY is SQLite's; PostgreSQL plans the join itself")
    query = feed._page_query(group, "0" * 32 + "f" * 64, LIMIT, True)
    with db.read_only() as session:
        conn = session.connection()
        sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
        plan = [row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")]
    devices = [step for step in plan if "devices" in step.split()[:2]]
    assert devices == [
        "SEARCH devices USING COVERING INDEX ix_devices_snapshot (uid=? AND group_id=?)"
    ], plan
