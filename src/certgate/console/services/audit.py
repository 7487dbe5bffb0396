"""Append-only audit log: each entry chained to the previous one by HMAC-SHA256.

What it resists: a person with write access to the database but not the master key.

- The chain is keyed: each entry's MAC is HMAC-SHA256 under a key derived (HKDF, purpose
  label ``certgate audit chain v1``) from the master key. The key lives only in memory,
  handed to sessions through ``Database(session_info=session_info(master))``; it is never
  stored or logged. Editing, deleting or reordering a row and then recomputing the chain,
  with the unkeyed function of older releases or any key but ours, breaks it at that row.
- Entries written before revision 0005 keep their unkeyed SHA-256 hashes: positions
  1..``instance.audit_keyed_from`` (the cut-over). Every keyed MAC covers the cut-over, so
  moving it breaks the keyed entries after it; moving it past the last entry is caught by
  the signed checkpoints, which record it too.
- What a chain inside the database cannot see: its tail deleted with the head and count on
  the instance rewound, or an older copy of the database put back. Checkpoints signed by
  the console identity into a sink outside the database (``services.checkpoints``) record
  (count, head) as they were; ``verify_chain`` holds the chain to each of them. Entries
  appended since the last checkpoint can still be cut unseen: the window is the
  checkpoint interval (``audit_checkpoint_s``).

Appends lock the instance row first, so concurrent writers (threads or console nodes on
PostgreSQL) form one chain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, event, func, insert, select, update
from sqlalchemy.orm import Session

from certgate import logs
from certgate.console.store.models import AuditEntry, Instance
from certgate.errors import ConfigError
from certgate.pki.keystore import MasterKey

log = logging.getLogger("certgate.audit")
_PENDING = "certgate.audit.pending"

GENESIS = "0" * 64
KEY_INFO = "certgate_audit_key"  # the session.info entry holding the AuditKey
_KDF_LABEL = b"certgate audit chain v1"
# Built once: Core statements reuse their compiled form (an ORM unit of work per append cost
# more than the hash). The head is read under the row lock, so writers form one chain.
_HEAD = select(Instance.audit_head, Instance.audit_keyed_from).with_for_update()
_INSERT = insert(AuditEntry)
_ADVANCE = update(Instance).values(
    audit_head=bindparam("new_head"), audit_count=Instance.audit_count + 1
)
# Streamed in chunks: a log of millions of entries is verified in bounded memory.
_ENTRIES = select(AuditEntry).order_by(AuditEntry.id).execution_options(yield_per=1000)
# One statement, so one snapshot on every backend (READ COMMITTED included).
_CURRENT = select(
    Instance.audit_count,
    Instance.audit_head,
    Instance.audit_keyed_from,
    select(func.max(AuditEntry.id)).scalar_subquery(),
)


@dataclass(frozen=True, slots=True)
class AuditKey:
    """The chain's MAC key. ``repr`` never shows it."""

    secret: bytes

    def __repr__(self) -> str:
        return "AuditKey(<redacted>)"

    @classmethod
    def derive(cls, master: MasterKey) -> AuditKey:
        # A purpose-bound key: the master key itself never MACs anything.
        return cls(master.derive(_KDF_LABEL))


def session_info(master: MasterKey) -> dict[str, Any]:
    """What a ``Database`` gives each session so that it can append to and verify the chain."""
    return {KEY_INFO: AuditKey.derive(master)}


def _key_of(session: Session) -> AuditKey:
    key = session.info.get(KEY_INFO)
    if not isinstance(key, AuditKey):  # fail closed: never write or judge an unkeyed entry
        raise ConfigError("this database was opened without the audit key (session_info)")
    return key


def _canonical(prev: str, ts: datetime, fields: dict[str, Any]) -> bytes:
    body = {"prev": prev, "ts": ts.astimezone(UTC).isoformat(timespec="microseconds"), **fields}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _fields(
    actor: str, group_id: str | None, action: str, outcome: str, detail: dict[str, Any]
) -> dict[str, Any]:
    return {
        "actor": actor,
        "group": group_id,
        "action": action,
        "outcome": outcome,
        "detail": detail,
    }


def entry_hash(
    prev_hash: str,
    ts: datetime,
    actor: str,
    group_id: str | None,
    action: str,
    outcome: str,
    detail: dict[str, Any],
) -> str:
    """The unkeyed SHA-256 of releases before 0005: checks legacy entries only."""
    fields = _fields(actor, group_id, action, outcome, detail)
    return hashlib.sha256(_canonical(prev_hash, ts, fields)).hexdigest()


def entry_mac(
    key: AuditKey,
    keyed_from: int,
    prev_hash: str,
    ts: datetime,
    actor: str,
    group_id: str | None,
    action: str,
    outcome: str,
    detail: dict[str, Any],
) -> str:
    """HMAC-SHA256 of an entry; it covers the cut-over (``keyed_from``) as well."""
    fields = {**_fields(actor, group_id, action, outcome, detail), "keyed_from": keyed_from}
    return hmac.new(key.secret, _canonical(prev_hash, ts, fields), hashlib.sha256).hexdigest()


def append(
    session: Session,
    actor: str,
    action: str,
    outcome: str = "ok",
    group_id: str | None = None,
    **detail: Any,
) -> str:
    """Append one entry in the caller's transaction (it commits with the action it records);
    returns the entry's MAC, the new head of the chain.

    Written with Core statements on the session's connection: an ``Instance`` loaded as an
    ORM object in the same session keeps its old ``audit_head`` in memory."""
    key = _key_of(session)
    conn = session.connection()
    if conn.dialect.name != "sqlite":
        # Pending ORM changes first, as an ORM query would autoflush them: rows changed are
        # locked before the instance row, in one order for every writer. (SQLite locks the
        # whole database at BEGIN; there, flushing here would only cost a unit of work.)
        session.flush()
    prev, keyed_from = conn.execute(_HEAD).one()
    # Microsecond precision survives every backend, so the MAC recomputes identically.
    ts = datetime.now(UTC)
    digest = entry_mac(key, keyed_from, prev, ts, actor, group_id, action, outcome, detail)
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
class Checkpoint:
    """The chain at one moment: ``count`` entries, the last one ``last_id`` with MAC
    ``head``, the first ``keyed_from`` unkeyed. ``signed_at`` (epoch s) once signed."""

    count: int
    head: str
    last_id: int | None
    keyed_from: int
    signed_at: int | None = None

    def describe(self) -> str:
        when = "" if self.signed_at is None else f" signed {_iso(self.signed_at)}"
        return f"checkpoint of count {self.count}{when}"


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def current(session: Session) -> Checkpoint:
    """The chain's head as the instance row records it now (one consistent read)."""
    count, head, keyed_from, last_id = session.execute(_CURRENT).one()
    return Checkpoint(count, head, last_id, keyed_from)


@dataclass(frozen=True, slots=True)
class ChainReport:
    entries: int
    ok: bool
    first_bad_id: int | None
    problem: str | None


class _Broken(Exception):
    def __init__(self, entry_id: int | None, problem: str) -> None:
        super().__init__(problem)
        self.entry_id, self.problem = entry_id, problem


def verify_chain(session: Session, checkpoints: Sequence[Checkpoint] = ()) -> ChainReport:
    """Recompute the whole chain and hold it to the instance's head and to each (already
    signature-checked) checkpoint; report the first entry that does not fit."""
    key = _key_of(session)
    recorded = current(session)  # read first: later appends must not look like a bad head
    signed_cut_overs = {c.keyed_from for c in checkpoints}
    if len(signed_cut_overs) > 1:  # only a holder of the identity key could cause this
        problem = f"signed checkpoints disagree on the cut-over: {sorted(signed_cut_overs)}"
        return ChainReport(0, False, None, problem)
    # The signed cut-over when there is one: the database's own can be rewritten.
    keyed_from = signed_cut_overs.pop() if signed_cut_overs else recorded.keyed_from
    walk = _Walk(key, keyed_from, recorded, checkpoints)
    rows = session.execute(_ENTRIES)
    try:
        for row in rows.scalars():
            walk.step(row)
        walk.finish()
    except _Broken as broken:
        moved = "" if keyed_from == recorded.keyed_from else _moved(recorded, keyed_from)
        return ChainReport(walk.position, False, broken.entry_id, broken.problem + moved)
    finally:
        rows.close()  # a walk cut short must not leave PostgreSQL's server cursor open
    if keyed_from != recorded.keyed_from:
        return ChainReport(walk.position, False, None, _moved(recorded, keyed_from).strip("; "))
    return ChainReport(walk.position, True, None, None)


def _moved(recorded: Checkpoint, signed: int) -> str:
    return (
        f"; cut-over moved: the database says {recorded.keyed_from} unkeyed entries, "
        f"the signed checkpoints say {signed}"
    )


class _Walk:
    """The chain walked in id order; ``step`` raises ``_Broken`` at the first misfit."""

    def __init__(
        self,
        key: AuditKey,
        keyed_from: int,
        recorded: Checkpoint,
        checkpoints: Sequence[Checkpoint],
    ) -> None:
        self.key, self.keyed_from, self.recorded = key, keyed_from, recorded
        self.position, self.prev, self.last_id = 0, GENESIS, 0
        self.signed: dict[int, list[Checkpoint]] = defaultdict(list)
        for checkpoint in checkpoints:
            self.signed[checkpoint.count].append(checkpoint)

    def step(self, row: AuditEntry) -> None:
        self.position += 1
        if row.prev_hash != self.prev:
            raise _Broken(row.id, "previous-hash link broken (row removed or reordered?)")
        if not hmac.compare_digest(self._expected(row), row.hash):
            raise _Broken(row.id, self._mismatch())
        for checkpoint in self.signed.get(self.position, ()):
            if (row.hash, row.id) != (checkpoint.head, checkpoint.last_id):
                problem = f"differs from the {checkpoint.describe()} (rewritten or renumbered)"
                raise _Broken(row.id, problem)
        if self.position == self.recorded.count and row.hash != self.recorded.head:
            raise _Broken(row.id, "differs from the head the instance records (rewritten)")
        self.prev, self.last_id = row.hash, row.id

    def _expected(self, row: AuditEntry) -> str:
        content = (row.ts, row.actor, row.group_id, row.action, row.outcome, row.detail)
        if self.position <= self.keyed_from:
            return entry_hash(self.prev, *content)
        return entry_mac(self.key, self.keyed_from, self.prev, *content)

    def _mismatch(self) -> str:
        if self.position <= self.keyed_from:
            return "content does not match its unkeyed hash (edited)"
        return "content does not match its MAC (edited, or rechained without the audit key)"

    def finish(self) -> None:
        """After the last row: nothing signed or recorded may lie beyond it."""
        beyond = [c for c in self.signed if c > self.position]
        if beyond:  # the earliest checkpoint past the end names the nearest missing entry
            checkpoint = self.signed[min(beyond)][0]
            raise _Broken(
                checkpoint.last_id,
                f"missing: entries after {self.last_id} were deleted (tail); the "
                f"{checkpoint.describe()} ends at entry {checkpoint.last_id}, "
                f"the log holds {self.position} entries",
            )
        if self.recorded.count > self.position:
            raise _Broken(None, "chain head/count mismatch (tail truncated)")
