"""Append-only audit log, each entry chained to the previous one by SHA-256.

Appends lock the instance row first, so concurrent writers (threads or console nodes on
PostgreSQL) form one chain. Deleting, editing or reordering a row breaks the chain at
that row; truncating the tail is caught by the head hash and count kept on the instance.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from certgate.console.store.models import AuditEntry, Instance

GENESIS = "0" * 64


def entry_hash(
    prev_hash: str,
    ts: datetime,
    actor: str,
    group_id: str | None,
    action: str,
    outcome: str,
    detail: dict[str, Any],
) -> str:
    body = {
        "prev": prev_hash,
        "ts": ts.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor": actor,
        "group": group_id,
        "action": action,
        "outcome": outcome,
        "detail": detail,
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def append(
    session: Session,
    actor: str,
    action: str,
    outcome: str = "ok",
    group_id: str | None = None,
    **detail: Any,
) -> AuditEntry:
    """Append one entry in the caller's transaction (it commits with the action it records)."""
    instance = session.execute(select(Instance).with_for_update()).scalar_one()
    # Microsecond precision survives every backend, so the hash recomputes identically.
    ts = datetime.now(UTC)
    digest = entry_hash(instance.audit_head, ts, actor, group_id, action, outcome, detail)
    entry = AuditEntry(
        ts=ts,
        actor=actor,
        group_id=group_id,
        action=action,
        outcome=outcome,
        detail=detail,
        prev_hash=instance.audit_head,
        hash=digest,
    )
    session.add(entry)
    instance.audit_head = digest
    instance.audit_count += 1
    return entry


@dataclass(frozen=True, slots=True)
class ChainReport:
    entries: int
    ok: bool
    first_bad_id: int | None
    problem: str | None


def verify_chain(session: Session) -> ChainReport:
    """Recompute the whole chain; report the first row that does not fit."""
    prev, count = GENESIS, 0
    rows = session.execute(select(AuditEntry).order_by(AuditEntry.id)).scalars()
    for row in rows:
        count += 1
        if row.prev_hash != prev:
            return ChainReport(count, False, row.id, "previous-hash link broken (row removed?)")
        expected = entry_hash(
            prev, row.ts, row.actor, row.group_id, row.action, row.outcome, row.detail
        )
        if expected != row.hash:
            return ChainReport(count, False, row.id, "content does not match its hash (edited)")
        prev = row.hash
    instance = session.execute(select(Instance)).scalar_one()
    if instance.audit_head != prev or instance.audit_count != count:
        return ChainReport(count, False, None, "chain head/count mismatch (tail truncated)")
    return ChainReport(count, True, None, None)
