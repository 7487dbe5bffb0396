"""Tests for certgate.console.services.feed emission: gapless per-group seqs from 1, the
events and the commit hook's groups exactly as the transaction that emitted them, on both
backends (``emit`` writes with Core statements beside the session's ORM work)."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from certgate.console.services import ca, feed, groups
from certgate.console.store.db import Database
from certgate.console.store.models import Device, Group
from tests.console.conftest import add_device


@pytest.fixture
def group(store: tuple[Database, ca.InstancePKI]) -> str:
    db, pki = store
    group_id = f"feed-{secrets.token_hex(4)}"
    with db.transaction() as session:
        groups.create_group(session, pki, group_id, group_id, "global")
    return group_id


def entry(n: int) -> dict[str, Any]:
    return {"op": "delete", "thumbprint": f"{n:064x}", "device_uid": "u", "group_id": "g"}


def events(db: Database, group_id: str) -> list[tuple[int, dict[str, Any]]]:
    with db.read_only() as session:
        return [(e.seq, e.entry) for e in feed.batch_after(session, group_id, 0)]


def test_emits_in_one_transaction_get_consecutive_seqs_from_1(
    store: tuple[Database, ca.InstancePKI], group: str
) -> None:
    db = store[0]
    with db.transaction() as session:  # as a writer batch of several deliveries does
        returned = [feed.emit(session, group, [entry(1), entry(2)]), feed.emit(session, group, [])]
        returned.append(feed.emit(session, group, [entry(3)]))
    assert returned == [2, 2, 3]
    assert events(db, group) == [(1, entry(1)), (2, entry(2)), (3, entry(3))]
    with db.transaction() as session:
        assert feed.emit(session, group, [entry(4)]) == feed.current_seq(session, group) == 4
    assert [seq for seq, _ in events(db, group)] == [1, 2, 3, 4]


def test_a_rolled_back_emit_leaves_no_event_and_no_gap(
    store: tuple[Database, ca.InstancePKI], group: str
) -> None:
    db = store[0]
    with pytest.raises(RuntimeError), db.transaction() as session:
        feed.emit(session, group, [entry(1)])
        raise RuntimeError("the delivery failed")
    with db.transaction() as session:
        assert feed.emit(session, group, [entry(2)]) == 1
    assert events(db, group) == [(1, entry(2))]


def test_emit_after_orm_work_publishes_it_and_keeps_the_loaded_group_true(
    store: tuple[Database, ca.InstancePKI], group: str
) -> None:
    db = store[0]
    with db.transaction() as session:
        uid = add_device(session, group)
    with db.transaction() as session:
        loaded = session.get(Group, group)
        device = session.get(Device, uid)
        assert loaded is not None and device is not None
        device.compliance_status = "noncompliant"  # pending in the session, not flushed
        assert feed.emit_device(session, device) == 1
        assert loaded.feed_seq == 1
    with db.read_only() as session:
        assert feed.current_seq(session, group) == 1
        stored = session.get(Device, uid)
        assert stored is not None and stored.compliance_status == "noncompliant"
    [(_, published)] = events(db, group)
    assert published["compliance_status"] == "noncompliant"


def test_emit_into_a_group_not_yet_flushed(store: tuple[Database, ca.InstancePKI]) -> None:
    db, group_id = store[0], f"feed-{secrets.token_hex(4)}"
    with db.transaction() as session:
        session.add(
            Group(
                id=group_id,
                name=group_id,
                parent_id="global",
                created_at=ca.now(),
                feed_seq=0,
                settings={},
            )
        )
        assert feed.emit(session, group_id, [entry(1)]) == 1
    assert events(db, group_id) == [(1, entry(1))]


def test_the_commit_hook_gets_the_groups_that_emitted(
    store: tuple[Database, ca.InstancePKI], group: str
) -> None:
    db, seen = store[0], []
    db.on_commit(lambda info: seen.append(set(info.get(feed.FEED_GROUPS_KEY, ()))))
    with db.transaction() as session:
        feed.emit(session, group, [])
    with db.transaction() as session:
        feed.current_seq(session, group)
    assert seen == [{group}, set()]
