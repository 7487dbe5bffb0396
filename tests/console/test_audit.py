"""The audit log's hash chain detects edited, deleted and truncated entries."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update

from certgate.console import local
from certgate.console.services import audit
from certgate.console.store.models import AuditEntry
from tests.support import CERTGATE, init_console


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory, _ = init_console(tmp_path)
    db, _ = local.open_db(local.load_config(directory))
    with db.transaction() as session:
        for n in range(5):
            audit.append(session, "cli:test", "test.action", group_id="global", n=n)
    db.dispose()
    return directory


def tamper(data_dir: Path, statement: object) -> None:
    db, _ = local.open_db(local.load_config(data_dir))
    with db.transaction() as session:
        session.execute(statement)  # type: ignore[call-overload]
    db.dispose()


def verify(data_dir: Path) -> audit.ChainReport:
    db, _ = local.open_db(local.load_config(data_dir))
    with db.transaction() as session:
        report = audit.verify_chain(session)
    db.dispose()
    return report


def cli_verify(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CERTGATE, "console", "audit", "verify", "-d", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_intact_chain_verifies(data_dir: Path) -> None:
    report = verify(data_dir)
    assert report.ok and report.entries == 5
    result = cli_verify(data_dir)
    assert result.returncode == 0 and "audit chain OK: 5 entries" in result.stdout


def test_edited_entry_is_detected(data_dir: Path) -> None:
    tamper(data_dir, update(AuditEntry).where(AuditEntry.id == 3).values(actor="cli:mallory"))
    report = verify(data_dir)
    assert not report.ok and report.first_bad_id == 3 and "edited" in (report.problem or "")
    result = cli_verify(data_dir)
    assert result.returncode == 1 and "BROKEN at entry 3" in result.stderr


def test_edited_detail_is_detected(data_dir: Path) -> None:
    tamper(data_dir, update(AuditEntry).where(AuditEntry.id == 2).values(detail={"n": 99}))
    assert verify(data_dir).first_bad_id == 2


def test_deleted_entry_is_detected(data_dir: Path) -> None:
    tamper(data_dir, delete(AuditEntry).where(AuditEntry.id == 2))
    report = verify(data_dir)
    assert not report.ok and report.first_bad_id == 3 and "link broken" in (report.problem or "")


def test_truncated_tail_is_detected(data_dir: Path) -> None:
    tamper(data_dir, delete(AuditEntry).where(AuditEntry.id == 5))
    report = verify(data_dir)
    assert not report.ok and report.first_bad_id is None and "truncated" in (report.problem or "")


def test_rehashed_forgery_still_breaks_the_head(data_dir: Path) -> None:
    """Recomputing one row's hash moves the break to the next row's link."""
    db, _ = local.open_db(local.load_config(data_dir))
    with db.transaction() as session:
        row = session.execute(select(AuditEntry).where(AuditEntry.id == 4)).scalar_one()
        row.actor = "cli:mallory"
        row.hash = audit.entry_hash(
            row.prev_hash, row.ts, row.actor, row.group_id, row.action, row.outcome, row.detail
        )
    db.dispose()
    assert verify(data_dir).first_bad_id == 5
