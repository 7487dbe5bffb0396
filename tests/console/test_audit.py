"""The audit log's keyed chain: edited, deleted, truncated and rechained entries are detected,
whether rechained with the unkeyed function of older releases or with any other key; the
entries of older releases keep verifying up to a cut-over that cannot be moved."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.orm import Session

from certgate.console import local
from certgate.console.services import audit
from certgate.console.store.db import MIGRATIONS, Database
from certgate.console.store.models import AuditEntry, Instance
from certgate.errors import ConfigError
from certgate.pki.keystore import load_master_key
from tests.console.conftest import append_audit, cli_audit_verify, tamper
from tests.support import init_console

Hasher = Callable[[AuditEntry, str], str]  # (row, prev) -> the hash a forger writes


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory, _ = init_console(tmp_path)
    append_audit(directory, 5)
    return directory


def verify(data_dir: Path) -> audit.ChainReport:
    db, _ = local.open_db(local.load_config(data_dir))
    with db.transaction() as session:
        report = audit.verify_chain(session)
    db.dispose()
    return report


def rechain(session: Session, first_id: int, hasher: Hasher, edit: dict[str, object]) -> None:
    """What a database writer does: edit entry ``first_id``, recompute every hash from it
    on with ``hasher`` and move the instance's head, so that the chain links up again."""
    rows = session.execute(select(AuditEntry).order_by(AuditEntry.id)).scalars().all()
    prev = audit.GENESIS
    for row in rows:
        if row.id == first_id:
            for name, value in edit.items():
                setattr(row, name, value)
        if row.id >= first_id:
            row.prev_hash, row.hash = prev, hasher(row, prev)
        prev = row.hash
    session.execute(update(Instance).values(audit_head=prev, audit_count=len(rows)))


def legacy_hash(row: AuditEntry, prev: str) -> str:
    """The project's own unkeyed function, as a forger would call it."""
    return audit.entry_hash(
        prev, row.ts, row.actor, row.group_id, row.action, row.outcome, row.detail
    )


def wrong_key_mac(keyed_from: int) -> Hasher:
    key = audit.AuditKey(os.urandom(32))

    def mac(row: AuditEntry, prev: str) -> str:
        content = (row.ts, row.actor, row.group_id, row.action, row.outcome, row.detail)
        return audit.entry_mac(key, keyed_from, prev, *content)

    return mac


def test_intact_chain_verifies(data_dir: Path) -> None:
    report = verify(data_dir)
    assert report.ok and report.entries == 5
    result = cli_audit_verify(data_dir)
    assert result.returncode == 0 and "audit chain OK: 5 entries" in result.stdout


@pytest.mark.parametrize("hasher", [legacy_hash, wrong_key_mac(0)], ids=["unkeyed", "wrong-key"])
def test_tampered_and_rechained_database_is_detected(data_dir: Path, hasher: Hasher) -> None:
    """Issue #11: a rewritten entry, the chain recomputed and the head moved, used to verify."""
    db, _ = local.open_db(local.load_config(data_dir))
    with db.transaction() as session:
        rechain(session, 3, hasher, {"actor": "cli:mallory"})
    db.dispose()
    report = verify(data_dir)
    assert not report.ok and report.first_bad_id == 3 and "MAC" in (report.problem or "")
    result = cli_audit_verify(data_dir)
    assert result.returncode == 1 and "BROKEN at entry 3" in result.stderr
    assert "rechained without the audit key" in result.stderr


def test_edited_entry_is_detected(data_dir: Path) -> None:
    tamper(data_dir, update(AuditEntry).where(AuditEntry.id == 3).values(actor="cli:mallory"))
    report = verify(data_dir)
    assert not report.ok and report.first_bad_id == 3 and "edited" in (report.problem or "")


def test_edited_detail_is_detected(data_dir: Path) -> None:
    tamper(data_dir, update(AuditEntry).where(AuditEntry.id == 2).values(detail={"n": 99}))
    assert verify(data_dir).first_bad_id == 2


def test_deleted_entry_is_detected(data_dir: Path) -> None:
    tamper(data_dir, delete(AuditEntry).where(AuditEntry.id == 2))
    report = verify(data_dir)
    assert not report.ok and report.first_bad_id == 3 and "link broken" in (report.problem or "")


def test_truncated_tail_is_detected_by_the_instance_head(data_dir: Path) -> None:
    tamper(data_dir, delete(AuditEntry).where(AuditEntry.id == 5))
    report = verify(data_dir)
    assert not report.ok and report.first_bad_id is None and "truncated" in (report.problem or "")


def test_an_instance_head_that_is_not_the_last_entry_is_detected(data_dir: Path) -> None:
    tamper(data_dir, update(Instance).values(audit_head="f" * 64))
    report = verify(data_dir)
    assert not report.ok and report.first_bad_id == 5 and "head" in (report.problem or "")


def test_append_without_the_audit_key_fails_closed(data_dir: Path) -> None:
    db = Database(local.load_config(data_dir).db_url)  # no session_info: no key
    try:
        with pytest.raises(ConfigError, match="audit key"), db.transaction() as session:
            audit.append(session, "cli:test", "test.action")
        with pytest.raises(ConfigError, match="audit key"), db.transaction() as session:
            audit.verify_chain(session)
    finally:
        db.dispose()
    assert verify(data_dir).entries == 5  # nothing was written


def test_the_key_is_derived_and_never_stored(data_dir: Path) -> None:
    config = local.load_config(data_dir)
    master = load_master_key(config.master_key_file)
    key = audit.AuditKey.derive(master)
    assert key.secret != master.secret and len(key.secret) == 32
    assert key == audit.AuditKey.derive(master)  # the same key at every start
    assert key.secret.hex() not in repr(key) and "redacted" in repr(key)
    stored = b"".join(p.read_bytes() for p in data_dir.iterdir() if p.name != "master.key")
    assert key.secret not in stored and key.secret.hex().encode() not in stored


# --- entries of releases before the keyed chain ------------------------------------------

UNKEYED = 3


@pytest.fixture
def upgraded(tmp_path: Path) -> Path:
    """A data dir as a release before 0005 left it (schema 0004, three entries of the
    unkeyed chain, no checkpoint file), then opened by this release (migrated to 0005, a
    checkpoint signed) and given two keyed entries."""
    directory, _ = init_console(tmp_path)
    (directory / "audit-checkpoints.jsonl").unlink()
    db = Database(local.load_config(directory).db_url)
    with db.engine.begin() as conn:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004")
        prev = audit.GENESIS
        for n in range(UNKEYED):
            ts = datetime.now(UTC)
            digest = audit.entry_hash(prev, ts, "cli:old", None, "old.action", "ok", {"n": n})
            row = {"ts": ts, "actor": "cli:old", "action": "old.action", "outcome": "ok"}
            conn.execute(
                insert(AuditEntry), {**row, "detail": {"n": n}, "prev_hash": prev, "hash": digest}
            )
            prev = digest
        conn.execute(
            text("UPDATE instance SET audit_head = :h, audit_count = :n"), {"h": prev, "n": UNKEYED}
        )
    db.dispose()
    append_audit(directory, 2)  # open_db migrates first
    db, pki = local.open_db(local.load_config(directory))
    local.checkpointer(local.load_config(directory), db, pki).checkpoint()
    db.dispose()
    return directory


def keyed_from(data_dir: Path) -> int:
    db, _ = local.open_db(local.load_config(data_dir))
    with db.transaction() as session:
        return audit.current(session).keyed_from


def test_unkeyed_entries_verify_up_to_the_cut_over(upgraded: Path) -> None:
    assert keyed_from(upgraded) == UNKEYED  # set by migration 0005 from the old count
    report = verify(upgraded)
    assert report.ok and report.entries == UNKEYED + 2
    assert cli_audit_verify(upgraded).returncode == 0


def test_a_rewritten_unkeyed_entry_is_caught_by_the_first_keyed_one(upgraded: Path) -> None:
    db, _ = local.open_db(local.load_config(upgraded))
    with db.transaction() as session:
        rechain(session, 2, legacy_hash, {"actor": "cli:mallory"})
    db.dispose()
    report = verify(upgraded)
    assert not report.ok and report.first_bad_id == UNKEYED + 1 and "MAC" in (report.problem or "")


def test_a_cut_over_moved_into_the_keyed_entries_breaks_them(upgraded: Path) -> None:
    db, _ = local.open_db(local.load_config(upgraded))
    with db.transaction() as session:
        session.execute(update(Instance).values(audit_keyed_from=UNKEYED + 1))
        rechain(session, UNKEYED + 1, legacy_hash, {"actor": "cli:mallory"})
    db.dispose()
    report = verify(upgraded)  # the MAC of entry 5 covers the cut-over it was written under
    assert not report.ok and report.first_bad_id == UNKEYED + 2


def test_a_cut_over_moved_past_the_end_is_caught_by_the_signed_checkpoint(upgraded: Path) -> None:
    db, _ = local.open_db(local.load_config(upgraded))
    with db.transaction() as session:
        session.execute(update(Instance).values(audit_keyed_from=UNKEYED + 2))
        rechain(session, UNKEYED + 1, legacy_hash, {"actor": "cli:mallory"})
    db.dispose()
    assert verify(upgraded).ok  # every entry now "unkeyed": the database alone cannot tell
    result = cli_audit_verify(upgraded)
    assert result.returncode == 1 and f"BROKEN at entry {UNKEYED + 1}" in result.stderr
    assert "cut-over moved" in result.stderr


def test_verify_during_concurrent_appends_sees_no_break(tmp_path: Path, db_url: str) -> None:
    """On PostgreSQL a verify reads in READ COMMITTED: entries committed while it walks
    must not look like a rewritten head or a truncated tail."""
    directory, _ = init_console(tmp_path, db_url=db_url)
    # Opened here, one after the other: migrations must not run in two threads at once.
    writing, _ = local.open_db(local.load_config(directory))
    reading, _ = local.open_db(local.load_config(directory))
    done = threading.Event()

    def appender() -> None:
        try:
            for n in range(60):
                with writing.transaction() as session:
                    audit.append(session, "test:concurrent", "test.action", n=n)
        finally:
            done.set()

    thread = threading.Thread(target=appender)
    thread.start()
    reports = []
    try:
        while not done.is_set():
            with reading.read_only() as session:
                reports.append(audit.verify_chain(session))
    finally:
        thread.join()
        writing.dispose()
        reading.dispose()
    assert reports and all(r.ok for r in reports), [r for r in reports if not r.ok]
    assert verify(directory).entries == 60
