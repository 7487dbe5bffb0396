"""Append-only audit log, each entry chained to the previous one by SHA-256.

Appends lock the instance row first, so concurrent writers (threads or console nodes on
PostgreSQL) form one chain. Deleting, editing or reordering a row breaks the chain at
that row; truncating the tail is caught by the head hash and count kept on the instance.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, event, insert, select, update
from sqlalchemy.orm import Session

from certgate import logs
from certgate.console.store.models import AuditEntry, Instance

log = logging.getLogger("certgate.audit")
_PENDING = "certgate.audit.pending"

GENESIS = "0" * 64
# Built once: Core statements reuse their compiled form (an ORM unit of work per append cost
# more than the hash). The head is read under the row lock, so writers form one chain.
_HEAD = select(Instance.audit_head).with_for_update()
_INSERT = insert(AuditEntry)
_ADVANCE = update(Instance).values(
    audit_head=bindparam("new_head"), audit_count=Instance.audit_count + 1
)


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
) -> str:
    """Append one entry in the caller's transaction (it commits with the action it records);
    returns the entry's hash, the new head of the chain.

    Written with Core statements on the session's connection: an ``Instance`` loaded as an
    ORM object in the same session keeps its old ``audit_head`` in memory."""
    conn = session.connection()
    if conn.dialect.name != "sqlite":
        # Pending ORM changes first, as an ORM query would autoflush them: rows changed are
        # locked before the instance row, in one order for every writer. (SQLite locks the
        # whole database at BEGIN; there, flushing here would only cost a unit of work.)
        session.flush()
    prev = conn.execute(_HEAD).scalar_one()
    # Microsecond precision survives every backend, so the hash recomputes identically.
    ts = datetime.now(UTC)
    digest = entry_hash(prev, ts, actor, group_id, action, outcome, detail)
    row = {
        "ts": ts,
        "actor": actor,
        "group_id": group_id,
        "action": action,
        "outcome": outcome,
        "detail": detail,
        "prev_hash": prev,
        "hash": digest,
    }
    conn.execute(_INSERT, row)
    conn.execute(_ADVANCE, {"new_head": digest})
    fields = logs.event(
        "audit",
        action=action,
        actor=actor,
        outcome=outcome,
        group=group_id,
        reason=detail.get("reason"),
        device_uid=detail.get("device"),
        thumbprint=detail.get("thumbprint"),
        app=detail.get("app"),
        node=detail.get("node"),
    )
    session.info.setdefault(_PENDING, []).append((actor, action, outcome, group_id, fields))
    return digest


@event.listens_for(Session, "after_commit")
def _log_committed(session: Session) -> None:
    """Audit events reach the logs (and a SIEM) once committed, never before: a rolled
    back action was not done."""
    for actor, action, outcome, group_id, fields in session.info.pop(_PENDING, ()):
        log.info(
            "audit actor=%s action=%s outcome=%s group=%s",
            actor,
            action,
            outcome,
            group_id,
            extra=fields,
        )


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING, None)


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
