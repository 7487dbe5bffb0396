"""The compliance service on each backend (the store of a real console): check-ins judged
against the group's effective policy (inherited down the tree), every change through the
one compliance service and so into the feed, the timer's sweep, overrides with their
expiry, and history. The API's refusals go through the real console over mTLS.

Time passing is written into the store (a check-in or an override dated in the past)
rather than slept through; the real clock's sweep is shown by
tests/integration/test_posture_compliance.py."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from certgate.console.services import ca, compliance, groups
from certgate.console.store.db import Database
from certgate.console.store.models import (
    AuditEntry,
    ComplianceEvent,
    Device,
    DevicePosture,
    FeedEvent,
)
from certgate.errors import BadRequest, NotFound
from tests.console.conftest import add_device
from tests.support import RunningConsole

pytestmark = pytest.mark.integration
MIN_OS = {"id": "min-os", "fact": "os_version", "op": "version_at_least", "value": "12"}
SEEN = {"id": "seen", "fact": "checkin_age_s", "op": "at_most", "value": 600}


def report(os_version: str = "12") -> dict[str, Any]:
    return {
        "facts": {
            "os_name": "debian",
            "os_version": os_version,
            "kernel": "6.1.0",
            "disk_encrypted": True,
            "screen_lock": None,
            "rooted": None,
            "agent_version": "0.1.0",
        },
        "unavailable": {"screen_lock": "none on Linux", "rooted": "not on Linux"},
    }


@pytest.fixture
def tree(store: tuple[Database, ca.InstancePKI]) -> Iterator[tuple[Database, str, str]]:
    """A parent group and its child, fresh for each test: (db, parent, child)."""
    db, pki = store
    parent, child = f"p{secrets.token_hex(4)}", f"c{secrets.token_hex(4)}"
    with db.transaction() as session:
        groups.create_group(
            session, pki, parent, parent, "global", {"initial_compliance": "compliant"}
        )
        groups.create_group(session, pki, child, child, parent, {"initial_compliance": "compliant"})
    yield db, parent, child


def device(session: Session, uid: str) -> Device:
    found = session.get(Device, uid)
    assert found is not None
    return found


def check_in(db: Database, uid: str, os_version: str) -> compliance.Verdict:
    with db.transaction() as session:
        return compliance.check_in(session, device(session, uid), ca.now(), report(os_version))


def last_feed_status(session: Session, group_id: str) -> str:
    events = session.execute(
        select(FeedEvent).where(FeedEvent.group_id == group_id).order_by(FeedEvent.seq.desc())
    ).scalars()
    return str(next(iter(events)).entry["compliance_status"])


def test_a_parent_policy_governs_the_subgroup_and_a_child_rule_replaces_it(
    tree: tuple[Database, str, str],
) -> None:
    db, parent, child = tree
    with db.transaction() as session:
        uid = add_device(session, child)
    assert check_in(db, uid, "11").status == "compliant"  # ungoverned: left as it was
    with db.transaction() as session:
        compliance.set_policy(session, parent, [MIN_OS], "test")
        assert device(session, uid).compliance_status == "noncompliant"
        assert last_feed_status(session, child) == "noncompliant"  # tunnels learn it
    with db.transaction() as session:
        relaxed = {**MIN_OS, "value": "11"}
        effective = compliance.set_policy(session, child, [relaxed], "test")
        assert [r.to_dict() for r in effective] == [relaxed]
        assert device(session, uid).compliance_status == "compliant"
        assert last_feed_status(session, child) == "compliant"
        history = (
            session.execute(select(ComplianceEvent).where(ComplianceEvent.device_uid == uid))
            .scalars()
            .all()
        )
    assert [(e.status, e.cause) for e in history] == [
        ("noncompliant", "policy"),
        ("compliant", "policy"),
    ]
    assert history[0].failures == [{"rule": "min-os", "reason": "os_version 11 is below 12"}]
    assert history[0].facts["os_version"] == "11" and history[0].facts["cert_age_s"] == 0


def test_removing_the_rules_that_failed_a_device_makes_it_compliant(
    tree: tuple[Database, str, str],
) -> None:
    db, parent, _ = tree
    with db.transaction() as session:
        judged = add_device(session, parent)
    assert check_in(db, judged, "11").status == "compliant"
    with db.transaction() as session:
        compliance.set_policy(session, parent, [MIN_OS], "test")
        assert device(session, judged).compliance_status == "noncompliant"
    with db.transaction() as session:
        compliance.set_policy(session, parent, [], "test")
        assert device(session, judged).compliance_status == "compliant"
        history = compliance.state_of(session, device(session, judged))["history"]
        assert (history[0]["status"], history[0]["failures"]) == ("compliant", [])


def test_an_unchanged_check_in_adds_no_history_and_no_feed_entry(
    tree: tuple[Database, str, str],
) -> None:
    db, parent, _ = tree
    with db.transaction() as session:
        uid = add_device(session, parent)
        compliance.set_policy(session, parent, [MIN_OS], "test")
    assert check_in(db, uid, "12").changed  # failures went from "unknown" to none
    with db.transaction() as session:
        seq = groups.get_group(session, parent).feed_seq
    assert not check_in(db, uid, "12.1").changed
    with db.transaction() as session:
        assert groups.get_group(session, parent).feed_seq == seq


def test_the_sweep_turns_a_silent_device_noncompliant(tree: tuple[Database, str, str]) -> None:
    db, parent, _ = tree
    with db.transaction() as session:
        uid = add_device(session, parent)
        compliance.set_policy(session, parent, [MIN_OS, SEEN], "test")
    assert check_in(db, uid, "12").status == "compliant"
    with db.transaction() as session:
        assert compliance.sweep(session) == 0  # checked in just now
        row = session.get(DevicePosture, uid)
        assert row is not None
        row.checked_in_at = ca.now() - timedelta(seconds=601)
    with db.transaction() as session:
        assert compliance.sweep(session) >= 1
        shown = compliance.state_of(session, device(session, uid))
    assert shown["compliance_status"] == "noncompliant"
    assert [f["rule"] for f in shown["failures"]] == ["seen"]
    assert shown["history"][0]["cause"] == "timer"
    assert check_in(db, uid, "12").status == "compliant"


def test_an_override_wins_until_it_expires(tree: tuple[Database, str, str]) -> None:
    db, parent, _ = tree
    with db.transaction() as session:
        uid = add_device(session, parent)
        compliance.set_policy(session, parent, [MIN_OS], "test")
    assert check_in(db, uid, "11").status == "noncompliant"
    with db.transaction() as session:
        verdict = compliance.set_override(
            session, device(session, uid), "compliant", timedelta(hours=1), "admin:x"
        )
    assert (verdict.status, verdict.overridden) == ("compliant", True)
    assert [f.rule for f in verdict.failures] == ["min-os"]  # still said, not enforced
    assert check_in(db, uid, "11").status == "compliant"  # the override holds
    with db.transaction() as session:
        row = session.get(DevicePosture, uid)
        assert row is not None
        row.override_until = ca.now() - timedelta(seconds=1)
    with db.transaction() as session:
        compliance.sweep(session)
        shown = compliance.state_of(session, device(session, uid))
    assert (shown["compliance_status"], shown["override"]) == ("noncompliant", None)
    assert shown["history"][0]["cause"] == "override-end"


def test_every_override_set_cleared_or_expired_is_a_history_row(
    tree: tuple[Database, str, str],
) -> None:
    """Also when the status does not change (an override confirming the policy's verdict):
    the history says who decided, until when and why."""
    db, parent, _ = tree
    with db.transaction() as session:
        uid = add_device(session, parent)
        compliance.set_policy(session, parent, [MIN_OS], "test")
    assert check_in(db, uid, "12").status == "compliant"
    with db.transaction() as session:
        same = compliance.set_override(
            session, device(session, uid), "compliant", timedelta(hours=1), "admin:a", "audit"
        )
        assert not same.changed  # no feed entry needed: the status is the same
        compliance.set_override(session, device(session, uid), None, None, "admin:b", "done")
        compliance.set_override(
            session, device(session, uid), "noncompliant", timedelta(hours=2), "admin:a", "lost"
        )
        row = session.get(DevicePosture, uid)
        assert row is not None
        row.override_until = ca.now() - timedelta(seconds=1)
    with db.transaction() as session:
        compliance.sweep(session)
        history = compliance.state_of(session, device(session, uid))["history"]
    expired, lost, cleared, confirmed = history[:4]
    assert (confirmed["cause"], confirmed["status"]) == ("override", "compliant")
    assert confirmed["override"]["action"] == "set"
    assert (confirmed["override"]["by"], confirmed["override"]["reason"]) == ("admin:a", "audit")
    assert confirmed["override"]["until"] > ca.now().isoformat()
    assert (cleared["cause"], cleared["override"]["action"]) == ("override-end", "clear")
    assert (cleared["override"]["by"], cleared["override"]["reason"]) == ("admin:b", "done")
    assert cleared["override"]["ended"]["reason"] == "audit"
    assert (lost["status"], lost["override"]["reason"]) == ("noncompliant", "lost")
    assert (expired["cause"], expired["status"]) == ("override-end", "compliant")
    assert expired["override"]["action"] == "expire" and expired["override"]["by"] is None
    assert expired["override"]["ended"]["status"] == "noncompliant"


def test_clearing_no_override_is_a_missing_object(tree: tuple[Database, str, str]) -> None:
    db, parent, _ = tree
    with db.transaction() as session:
        uid = add_device(session, parent)
        with pytest.raises(NotFound, match="has no compliance override"):
            compliance.set_override(session, device(session, uid), None, None, "admin:x")
        with pytest.raises(BadRequest, match="reason is 1 to 500 characters"):
            compliance.set_override(
                session, device(session, uid), "compliant", timedelta(hours=1), "admin:x", ""
            )


@pytest.mark.parametrize(
    ("status", "ttl", "message"),
    [
        ("compliant", None, "needs an expiry"),
        ("compliant", timedelta(days=91), "needs an expiry"),
        ("trusted", timedelta(hours=1), "compliance must be one of"),
    ],
)
def test_bad_overrides_are_refused(
    tree: tuple[Database, str, str], status: str, ttl: timedelta | None, message: str
) -> None:
    db, parent, _ = tree
    with db.transaction() as session:
        uid = add_device(session, parent)
        with pytest.raises(BadRequest, match=message):
            compliance.set_override(session, device(session, uid), status, ttl, "admin:x")


def test_the_api_refuses_a_bad_policy_precisely_and_audits_it(console: RunningConsole) -> None:
    bad = {"rules": [{**MIN_OS, "value": "twelve"}]}
    with console.client(console.admins["root"]) as admin:
        response = admin.put("/api/v1/groups/global/compliance-policy", json=bad)
        # The schema types each rule by its fact and op: a version is leading digits.
        assert response.status_code == 422
        assert response.json() == {
            "error": "invalid_request",
            "detail": "body.rules.0.version.value: String should match pattern '^[0-9]'",
        }
        shown = admin.get("/api/v1/groups/global/compliance-policy").json()
    assert shown == {"group_id": "global", "rules": [], "effective": []}
    with console.local() as (session, _):
        entry = session.execute(
            select(AuditEntry).order_by(AuditEntry.id.desc()).limit(1)
        ).scalar_one()
    assert (entry.action, entry.outcome) == (
        "PUT /api/v1/groups/{group_id}/compliance-policy",
        "denied",
    )
    assert "body.rules.0.version.value" in entry.detail["reason"]


def test_the_api_sets_and_ends_an_override_with_audit_entries(console: RunningConsole) -> None:
    with console.local() as (session, _):
        uid = add_device(session, "global")
    path = f"/api/v1/devices/{uid}/compliance-override"
    with console.client(console.admins["root"]) as admin:
        set_ = admin.put(path, json={"status": "noncompliant", "expires_in_s": 60})
        assert set_.status_code == 200 and set_.json()["compliance_status"] == "noncompliant"
        too_long = admin.put(path, json={"status": "compliant", "expires_in_s": 91 * 86400})
        assert (too_long.status_code, too_long.json()["error"]) == (422, "invalid_request")
        shown = admin.get(f"/api/v1/devices/{uid}/compliance").json()
        assert shown["override"]["status"] == "noncompliant"
        assert shown["override"]["by"] == "admin:root"
        ended = admin.delete(path, params={"reason": "fixed"})
        assert ended.status_code == 200 and ended.json()["overridden"] is False
        again = admin.delete(path)
        assert (again.status_code, again.json()["error"]) == (404, "not_found")
    with console.local() as (session, _):
        actions = (
            session.execute(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(5))
            .scalars()
            .all()
        )
    # newest first: the refused DELETE (the app's denial), the end, the 422, the set
    assert [(e.action, e.outcome) for e in actions[:2]] == [
        ("DELETE /api/v1/devices/{uid}/compliance-override", "denied"),
        ("device.compliance_override.end", "ok"),
    ]
    assert actions[1].detail["reason"] == "fixed"
    assert "device.compliance_override" in [e.action for e in actions]
