"""Compliance from posture: check-ins, group policies, the timer's sweep, admin overrides.

The decision is ``certgate.posture.evaluate`` (pure); this module gathers its inputs and
applies the result through ``devices.set_compliance``, the one service that changes a
device's compliance (it publishes the feed entry, so tunnels refuse the device and close
its live tunnels). Only devices of groups with an effective policy (their own or an
ancestor's) are governed; the others keep the status an admin or ``initial_compliance``
gave them (a device the policy had failed becomes compliant when its rules are removed).
An unexpired override wins over the policy; the sweep clears expired ones.
A history row records each change of a device's status or failing rules, with its facts,
and each override set, cleared or expired, with what the admin decided and why (even when
the status stays the same: the history answers "who decided this device's status").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session

from certgate import posture
from certgate.console.services import ca, devices
from certgate.console.services.rbac import ancestors
from certgate.console.store.models import (
    Certificate,
    ComplianceEvent,
    CompliancePolicy,
    Device,
    DevicePosture,
    Group,
)
from certgate.errors import AuthError, BadRequest, ChainError, NotFound
from certgate.pki import identity
from certgate.pki.thumbprint import thumbprint
from certgate.pki.verify import verify_client_chain

OVERRIDE_MAX = timedelta(days=90)
REASON_MAX = 500  # device_posture.override_reason
HISTORY_LIMIT = 200


@dataclass(frozen=True, slots=True)
class Verdict:
    status: str
    failures: tuple[posture.Failure, ...]
    overridden: bool
    changed: bool = False  # the device's status or failing rules changed

    def to_dict(self) -> dict[str, Any]:
        """What the API answers and the CLI prints."""
        return {
            "compliance_status": self.status,
            "failures": [f.to_dict() for f in self.failures],
            "overridden": self.overridden,
        }


# -- policies ----------------------------------------------------------------------------


def group_rules(session: Session, group_id: str) -> tuple[posture.Rule, ...]:
    """The group's own rules (empty without a policy)."""
    row = session.get(CompliancePolicy, group_id)
    return posture.parse_rules(row.rules) if row is not None else ()


def effective_rules(session: Session, group_id: str) -> tuple[posture.Rule, ...]:
    """The rules that govern the group's devices: its ancestors' then its own."""
    chain = reversed(ancestors(session, group_id))
    return posture.merge_policies(group_rules(session, g) for g in chain)


def set_policy(session: Session, group_id: str, rules: Any, by: str) -> tuple[posture.Rule, ...]:
    """Replace the group's own rules and judge again every device of the group and its
    subgroups (``policy``). Returns the group's effective rules."""
    ancestors(session, group_id)  # NotFound for an unknown group
    try:
        parsed = posture.parse_rules(rules)
    except ValueError as exc:
        raise BadRequest(f"invalid compliance policy: {exc}") from exc
    row = session.get(CompliancePolicy, group_id)
    if row is None:
        row = CompliancePolicy(group_id=group_id)
        session.add(row)
    row.rules, row.updated_at, row.updated_by = [r.to_dict() for r in parsed], ca.now(), by
    session.flush()
    for device in _devices_under(session, group_id):
        judge(session, device, "policy")
    return effective_rules(session, group_id)


def _devices_under(session: Session, group_id: str) -> list[Device]:
    parents = {g: p for g, p in session.execute(select(Group.id, Group.parent_id))}
    subtree = {g for g in parents if _descends(g, group_id, parents)}
    query = select(Device).where(
        Device.group_id.in_(subtree), Device.enrollment_status == "enrolled"
    )
    return list(session.execute(query).scalars())


def _descends(group: str | None, top: str, parents: dict[str, str | None]) -> bool:
    for _ in range(64):  # the hierarchy is bounded (rbac.MAX_GROUP_DEPTH)
        if group is None:
            return False
        if group == top:
            return True
        group = parents.get(group)
    return False


# -- check-in ----------------------------------------------------------------------------


def device_by_cert(session: Session, pki: ca.InstancePKI, peer_der: bytes | None) -> Device:
    """The device proven by its current device certificate over mTLS (Per-App Tunnel
    device cert: issued by the Device Root, registered, unrevoked)."""
    device, _ = client_by_cert(session, pki, peer_der, (identity.IdentityKind.DEVICE,))
    return device


def client_by_cert(
    session: Session,
    pki: ca.InstancePKI,
    peer_der: bytes | None,
    kinds: tuple[identity.IdentityKind, ...],
) -> tuple[Device, Certificate]:
    """The active device and the registered, unrevoked client certificate of one of
    ``kinds`` (device, or a Proxy-mode app cert) that the Device Root issued it."""
    if peer_der is None:
        raise AuthError("device certificate required (mTLS)")
    cert = x509.load_der_x509_certificate(peer_der)
    ident = identity.identity_of(cert)
    if ident.kind not in kinds or ident.device_uid is None:
        wanted = " or ".join(k.value for k in kinds)
        raise AuthError(f"certificate is not a {wanted} certificate (it is {ident.kind.value})")
    try:
        verify_client_chain(
            cert,
            [pki.certs[ca.DEVICE_ROOT]],
            [pki.certs[ca.ROOT]],
            expected_issuer=pki.certs[ca.DEVICE_ROOT],
            at=ca.now(),
        )
    except ChainError as exc:
        raise AuthError(f"device certificate rejected: {exc}") from exc
    row = session.execute(
        select(Certificate).where(Certificate.thumbprint == thumbprint(cert))
    ).scalar_one_or_none()
    if (
        row is None
        or row.kind != ident.kind.value
        or row.device_uid != ident.device_uid
        or row.bundle_id != ident.bundle_id
    ):
        raise AuthError(f"not a registered {ident.kind.value} certificate")
    if row.revoked_at is not None:
        raise AuthError(f"device certificate revoked ({row.revocation_reason})")
    device = devices.get_device(session, ident.device_uid)
    devices.require_active(device)
    return device, row


def check_in(session: Session, device: Device, cert_not_before: datetime, report: Any) -> Verdict:
    """Store a check-in's posture and judge the device (``checkin``)."""
    try:
        parsed = posture.PostureReport.from_dict(report)
    except ValueError as exc:
        raise BadRequest(f"invalid posture report: {exc}") from exc
    row = _posture_row(session, device)
    row.facts, row.unavailable = dict(parsed.facts), dict(parsed.unavailable)
    row.checked_in_at, row.cert_not_before = ca.now(), cert_not_before
    return judge(session, device, "checkin")


def _posture_row(session: Session, device: Device) -> DevicePosture:
    row = session.execute(
        select(DevicePosture).where(DevicePosture.device_uid == device.uid).with_for_update()
    ).scalar_one_or_none()
    if row is None:
        row = DevicePosture(device_uid=device.uid, failures=[])
        session.add(row)
    return row


# -- judging -----------------------------------------------------------------------------


def facts_of(row: DevicePosture | None, now: datetime) -> dict[str, posture.FactValue]:
    """The reported facts with the derived ones (ages in whole seconds)."""
    facts: dict[str, posture.FactValue] = dict(row.facts or {}) if row else {}
    last = row.checked_in_at if row else None
    issued = row.cert_not_before if row else None
    facts["checkin_age_s"] = int((now - last).total_seconds()) if last else None
    facts["cert_age_s"] = int((now - issued).total_seconds()) if issued else None
    return facts


def judge(
    session: Session, device: Device, cause: str, note: dict[str, Any] | None = None
) -> Verdict:
    """Evaluate the device against its group's effective rules and apply the result; a
    device of an ungoverned group and without override is left as it is. ``note``: an
    override set or ended, recorded in the history whatever the verdict."""
    rules, now = effective_rules(session, device.group_id), ca.now()
    row = _posture_row(session, device)
    if row.override_until is not None and row.override_until <= now:
        note = _end_override(row, "expire", None)
        cause = "override-end" if cause == "timer" else cause
    facts = facts_of(row, now)
    failures = posture.evaluate(rules, facts)
    if row.override_status is not None:
        verdict = Verdict(row.override_status, failures, True)
    elif rules or row.failures:
        # No rules left but the policy had failed the device: those rules are gone, so
        # nothing fails it now (a status an admin set by hand, without failures, stays).
        verdict = Verdict("noncompliant" if failures else "compliant", failures, False)
    else:
        verdict = Verdict(device.compliance_status, (), False)
        if note is None:
            return verdict
    return _apply(session, device, row, verdict, cause, facts, note)


def _apply(
    session: Session,
    device: Device,
    row: DevicePosture,
    verdict: Verdict,
    cause: str,
    facts: dict[str, posture.FactValue],
    note: dict[str, Any] | None,
) -> Verdict:
    failures = [f.to_dict() for f in verdict.failures]
    unchanged = verdict.status == device.compliance_status and failures == row.failures
    if unchanged and note is None:
        return verdict  # nothing changed: no feed entry, no history row
    row.failures = failures
    if verdict.status != device.compliance_status:
        devices.set_compliance(session, device, verdict.status)
    session.add(
        ComplianceEvent(
            device_uid=device.uid,
            at=ca.now(),
            status=verdict.status,
            cause=cause,
            failures=failures,
            facts=facts,
            override=note,
        )
    )
    return Verdict(verdict.status, verdict.failures, verdict.overridden, changed=not unchanged)


def sweep(session: Session) -> int:
    """Judge every governed device (``timer``): a silent device's check-in age grows until
    a rule over it fails; expired overrides end. Returns how many devices changed."""
    governed = [
        g for g in session.execute(select(Group.id)).scalars() if effective_rules(session, g)
    ]
    overridden = select(DevicePosture.device_uid).where(DevicePosture.override_until.is_not(None))
    query = select(Device).where(
        Device.enrollment_status == "enrolled",
        Device.group_id.in_(governed) | Device.uid.in_(overridden),
    )
    devices_now = session.execute(query).scalars().all()
    return sum(judge(session, device, "timer").changed for device in devices_now)


# -- override and history ------------------------------------------------------------------


def set_override(
    session: Session,
    device: Device,
    status: str | None,
    ttl: timedelta | None,
    by: str,
    reason: str | None = None,
) -> Verdict:
    """An admin's status for the device until ``ttl`` has passed (then the policy judges
    it again); ``status`` None ends an override at once. Either is a history row."""
    row = _posture_row(session, device)
    if reason is not None and not 0 < len(reason) <= REASON_MAX:
        raise BadRequest(f"an override's reason is 1 to {REASON_MAX} characters")
    if status is None:
        if row.override_status is None:
            raise NotFound(f"device {device.uid!r} has no compliance override")
        return judge(session, device, "override-end", _end_override(row, "clear", by, reason))
    if status not in devices.COMPLIANCE:
        raise BadRequest(f"compliance must be one of {list(devices.COMPLIANCE)}")
    if ttl is None or not timedelta(seconds=1) <= ttl <= OVERRIDE_MAX:
        raise BadRequest(f"an override needs an expiry of 1 s to {OVERRIDE_MAX.days} days")
    row.override_status, row.override_until, row.override_by = status, ca.now() + ttl, by
    row.override_reason = reason
    return judge(session, device, "override", {"action": "set", **_override_of(row)})


def _end_override(
    row: DevicePosture, action: str, by: str | None, reason: str | None = None
) -> dict[str, Any]:
    """Clear the row's override; the history note says how, by whom and why it ended,
    and which override it was."""
    ended = _override_of(row)
    row.override_status = row.override_until = row.override_by = row.override_reason = None
    return {"action": action, "by": by, "reason": reason, "ended": ended}


def state_of(session: Session, device: Device, limit: int = HISTORY_LIMIT) -> dict[str, Any]:
    """What the API and CLI show: status, facts, failing rules, override, history."""
    row = session.get(DevicePosture, device.uid)
    history = session.execute(
        select(ComplianceEvent)
        .where(ComplianceEvent.device_uid == device.uid)
        .order_by(ComplianceEvent.id.desc())
        .limit(limit)
    ).scalars()
    return {
        "device_uid": device.uid,
        "compliance_status": device.compliance_status,
        "checked_in_at": row.checked_in_at if row else None,
        "facts": facts_of(row, ca.now()),
        "unavailable": (row.unavailable or {}) if row else {},
        "failures": row.failures if row else [],
        "override": _override_of(row) if row and row.override_status else None,
        "history": [
            {
                "at": e.at,
                "status": e.status,
                "cause": e.cause,
                "failures": e.failures,
                "facts": e.facts,
                "override": e.override,
            }
            for e in history
        ],
    }


def _override_of(row: DevicePosture) -> dict[str, Any]:
    """The override as JSON (stored in history rows as shown by the API)."""
    until = row.override_until.isoformat() if row.override_until else None
    return {
        "status": row.override_status,
        "until": until,
        "by": row.override_by,
        "reason": row.override_reason,
    }
