"""``certgate console device compliance``: the history listing (still the default, as
``device compliance UID``), ``override`` with status, expiry and reason, ``clear``; on a
real console data directory, with what they change read back from the store (device
row, feed entry, audit entry). The remote mode of the same commands is in test_remote."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from certgate.console.services import ca
from certgate.console.store.models import AuditEntry
from certgate.pki.keystore import ENV_VAR
from tests.console.test_cli import (
    ACTOR,
    device_row,
    enroll_device,
    last_feed_entry,
    refuse,
    succeed,
    transaction,
)
from tests.support import init_console


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(ENV_VAR, raising=False)  # the data directory's own key file
    directory, _ = init_console(tmp_path)
    return directory


def compliance(data_dir: Path, *args: str) -> str:
    command, *rest = args
    return succeed("device", "compliance", command, "-d", str(data_dir), *rest).stdout


def history(data_dir: Path, uid: str) -> dict[str, object]:
    shown = json.loads(compliance(data_dir, "show", uid, "--json"))
    assert isinstance(shown, dict)
    return shown


def last_audit(data_dir: Path) -> AuditEntry:
    with transaction(data_dir) as (session, _):
        entry = session.execute(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(1))
        found = entry.scalar_one()
        session.expunge(found)
        return found


def test_override_then_clear_are_enforced_audited_and_in_the_history(data_dir: Path) -> None:
    uid, _ = enroll_device(data_dir)
    printed = compliance(
        data_dir, "override", uid, "--status", "noncompliant", "--expires", "2h",
        "--reason", "laptop reported lost",
    )  # fmt: skip
    assert printed == f"device {uid}: noncompliant (override); failing rules: none\n"
    assert device_row(data_dir, uid).compliance_status == "noncompliant"
    entry = last_feed_entry(data_dir)
    assert entry["op"] == "upsert" and entry["compliance_status"] == "noncompliant"
    audited = last_audit(data_dir)
    assert (audited.actor, audited.action) == (ACTOR, "device.compliance_override")
    assert audited.detail["reason"] == "laptop reported lost"
    assert audited.detail["expires_in_s"] == 7200

    shown = history(data_dir, uid)
    override = shown["override"]
    assert isinstance(override, dict) and override["reason"] == "laptop reported lost"
    assert override["by"] == ACTOR and override["until"] > ca.now().isoformat()
    assert override["until"] < (ca.now() + timedelta(hours=2, minutes=1)).isoformat()
    table = succeed("device", "compliance", "-d", str(data_dir), uid).stdout  # the default
    assert f"override: noncompliant until {override['until'][:10]}" in table
    assert f"by {ACTOR}: laptop reported lost" in table
    assert "set noncompliant until" in table

    printed = compliance(data_dir, "clear", uid, "--reason", "found in the office")
    assert printed == f"device {uid}: noncompliant; failing rules: none\n"
    assert last_audit(data_dir).detail["reason"] == "found in the office"
    shown = history(data_dir, uid)
    assert shown["override"] is None
    events = shown["history"]
    assert isinstance(events, list)
    cleared, set_ = events[0]["override"], events[1]["override"]
    assert (cleared["action"], cleared["by"], cleared["reason"]) == (
        "clear",
        ACTOR,
        "found in the office",
    )
    assert set_ == {"action": "set", **override} and cleared["ended"] == override
    table = compliance(data_dir, "show", uid)
    assert f"cleared by {ACTOR}: found in the office (was noncompliant until" in table


def test_bad_overrides_are_refused_with_the_reason_and_change_nothing(data_dir: Path) -> None:
    uid, _ = enroll_device(data_dir)
    d = ("-d", str(data_dir))
    base = ("device", "compliance", "override", *d, uid, "--reason", "r")
    assert "needs an expiry of 1 s to 90 days" in refuse(
        *base, "--status", "compliant", "--expires", "91d"
    )
    assert "use a whole number with s, m, h or d" in refuse(
        *base, "--status", "compliant", "--expires", "soon"
    )
    assert "compliance must be one of" in refuse(*base, "--status", "trusted", "--expires", "1h")
    assert "has no compliance override" in refuse("device", "compliance", "clear", *d, uid)
    assert "not found" in refuse(
        "device", "compliance", "override", *d, "0" * 32, "--status", "compliant",
        "--expires", "1h", "--reason", "r",
    )  # fmt: skip
    assert device_row(data_dir, uid).compliance_status == "unknown"
    assert history(data_dir, uid)["history"] == []
