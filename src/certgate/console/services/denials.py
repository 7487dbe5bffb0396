"""Tunnel-side denials by reason over time: what the dashboard charts.

A node's report carries ``denials``, its totals by reason since it started
(``tunnel.report``). ``record`` keeps the difference from the node's previous report in
the current ``BUCKET``; a total that went down means the node (or a worker) started
again, and then the new total is the difference. A node writes only its own rows (one
report at a time), so concurrent reports of several nodes never touch the same row.
Buckets older than ``KEEP`` go when their node reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from certgate.console.store.models import DenialCount, TunnelNode

__all__ = ["BUCKET", "KEEP", "Series", "differences", "record", "series"]

BUCKET = timedelta(minutes=5)
KEEP = timedelta(days=7)


def bucket_of(at: datetime, size: timedelta = BUCKET) -> datetime:
    """The start of the ``size`` slot holding ``at`` (slots aligned on the epoch)."""
    step = int(size.total_seconds())
    return datetime.fromtimestamp(int(at.timestamp()) // step * step, tz=at.tzinfo)


def differences(previous: Mapping[str, int], current: Mapping[str, int]) -> dict[str, int]:
    """New denials per reason between two reports' totals (a reset counts from zero)."""
    new: dict[str, int] = {}
    for reason, total in current.items():
        before = previous.get(reason, 0)
        delta = total - before if total >= before else total
        if delta > 0:
            new[reason] = delta
    return new


def record(
    session: Session,
    node: TunnelNode,
    previous: Mapping[str, int],
    current: Mapping[str, int],
    at: datetime,
) -> None:
    bucket = bucket_of(at)
    for reason, delta in differences(previous, current).items():
        row = session.get(DenialCount, (node.id, bucket, reason))
        if row is None:
            row = DenialCount(
                node_id=node.id, bucket=bucket, reason=reason, group_id=node.group_id, count=delta
            )
            session.add(row)
        else:
            row.count += delta
    session.execute(
        delete(DenialCount).where(DenialCount.node_id == node.id, DenialCount.bucket < at - KEEP)
    )


@dataclass(frozen=True, slots=True)
class Series:
    """Denials per reason in consecutive slots of ``step`` from ``start`` (oldest first)."""

    start: datetime
    step: timedelta
    slots: int
    counts: dict[str, list[int]]

    @property
    def total(self) -> int:
        return sum(sum(values) for values in self.counts.values())

    def slot_totals(self) -> list[int]:
        return [sum(values[i] for values in self.counts.values()) for i in range(self.slots)]


def series(
    session: Session,
    group_ids: Iterable[str] | None,
    until: datetime,
    step: timedelta,
    slots: int,
) -> Series:
    """The denials of ``group_ids`` (None: every group) in the ``slots`` slots of ``step``
    (a multiple of ``BUCKET``) that end with the one holding ``until``."""
    end = bucket_of(until, step) + step
    start = end - step * slots
    query = (
        select(DenialCount.bucket, DenialCount.reason, func.sum(DenialCount.count))
        .where(DenialCount.bucket >= start, DenialCount.bucket < end)
        .group_by(DenialCount.bucket, DenialCount.reason)
    )
    if group_ids is not None:
        query = query.where(DenialCount.group_id.in_(list(group_ids)))
    counts: dict[str, list[int]] = {}
    for bucket, reason, total in session.execute(query):
        index = int((_aware(bucket, start) - start) / step)
        counts.setdefault(reason, [0] * slots)[index] += int(total)
    return Series(start, step, slots, dict(sorted(counts.items())))


def _aware(value: datetime, like: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored as UTC)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=like.tzinfo)
