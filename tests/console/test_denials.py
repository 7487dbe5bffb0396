"""certgate.console.services.denials on SQLite and PostgreSQL: report totals become
differences in time buckets, per node; series sum nodes and buckets into slots, scoped by
group; old buckets go. The real node -> console path: tests/tunnel/test_report.py."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from certgate.console.services import denials
from certgate.console.store.db import Database, migrate
from certgate.console.store.models import DenialCount, Group, TunnelNode

T0 = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("previous", "current", "new"),
    [
        ({}, {"a": 3}, {"a": 3}),
        ({"a": 3}, {"a": 5, "b": 1}, {"a": 2, "b": 1}),
        ({"a": 3}, {"a": 3}, {}),
        ({"a": 9}, {"a": 2}, {"a": 2}),  # the node started again: counted from zero
        ({"a": 2, "b": 4}, {"b": 4}, {}),
    ],
)
def test_differences_of_totals(
    previous: dict[str, int], current: dict[str, int], new: dict[str, int]
) -> None:
    assert denials.differences(previous, current) == new


@pytest.fixture
def session(db_url: str) -> Iterator[Session]:
    database = Database(db_url)
    migrate(database.engine)
    try:
        with database.transaction() as session:
            for group in ("g1", "g2"):
                session.add(Group(id=group, name=group, created_at=T0))
            yield session
    finally:
        database.dispose()


def _node(session: Session, group: str, name: str) -> TunnelNode:
    node = TunnelNode(
        group_id=group, name=name, address="127.0.0.1", registered_at=T0, last_seen_at=T0
    )
    session.add(node)
    session.flush()
    return node


def test_reports_become_buckets_and_series_sum_them_by_group(session: Session) -> None:
    a, b, other = _node(session, "g1", "a"), _node(session, "g1", "b"), _node(session, "g2", "c")
    denials.record(session, a, {}, {"destination_denied": 2}, T0 + timedelta(minutes=1))
    denials.record(session, a, {"destination_denied": 2}, {"destination_denied": 5},
                   T0 + timedelta(minutes=2))  # fmt: skip
    denials.record(session, b, {}, {"unknown_thumbprint": 1}, T0 + timedelta(minutes=70))
    denials.record(session, other, {}, {"destination_denied": 7}, T0 + timedelta(minutes=3))
    session.flush()
    series = denials.series(session, ["g1"], T0 + timedelta(minutes=90), timedelta(hours=1), 3)
    assert series.start == T0 - timedelta(hours=1)
    assert series.counts == {"destination_denied": [0, 5, 0], "unknown_thumbprint": [0, 0, 1]}
    assert series.total == 6 and series.slot_totals() == [0, 5, 1]
    everyone = denials.series(session, None, T0 + timedelta(minutes=90), timedelta(hours=1), 3)
    assert everyone.counts["destination_denied"] == [0, 12, 0]


def test_buckets_older_than_a_week_go_when_their_node_reports(session: Session) -> None:
    node = _node(session, "g1", "a")
    denials.record(session, node, {}, {"x": 1}, T0)
    denials.record(session, node, {"x": 1}, {"x": 2}, T0 + denials.KEEP + timedelta(hours=1))
    session.flush()
    buckets = session.execute(select(func.count()).select_from(DenialCount)).scalar_one()
    assert buckets == 1
