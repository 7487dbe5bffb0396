"""Compliance from posture: device check-ins (device certificate over mTLS), group
compliance policies, a device's compliance state and history, admin overrides, and the
timer that judges silent devices (``sweep_forever``, run by the app's lifespan)."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any, Literal

from cryptography import x509
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from certgate.console.api import schemas as s
from certgate.console.api.deps import admin_tx, device_actor, state_of
from certgate.console.services import audit, compliance, devices
from certgate.console.services.rbac import Permission as P
from certgate.console.services.rbac import require
from certgate.console.state import ConsoleState
from certgate.console.store.models import Admin, Device
from certgate.httpserver import peer_cert_der

router = APIRouter(prefix="/api/v1", responses=s.CALL_ERRORS)
log = logging.getLogger("certgate.console.compliance")


class PolicyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[dict[str, Any]] = Field(max_length=100)


Reason = Field(default=None, min_length=1, max_length=compliance.REASON_MAX)


class OverrideIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["compliant", "noncompliant", "unknown"]
    expires_in_s: s.Whole = Field(ge=1, le=90 * 86400)
    reason: str | None = Reason


def _device_for(session: Session, admin: Admin, uid: str, perm: P) -> Device:
    device = devices.get_device(session, uid)
    require(session, admin, perm, device.group_id)
    return device


@router.post("/device/checkin")
def check_in(request: Request, report: dict[str, Any]) -> dict[str, Any]:
    """The agent's posture, authenticated by its current device certificate (mTLS); the
    answer is the verdict it earned."""
    state = state_of(request)
    peer = peer_cert_der(request.scope)
    with state.db.transaction() as session:
        device = compliance.device_by_cert(session, state.pki, peer)
        request.state.actor, request.state.group_id = device_actor(device), device.group_id
        assert peer is not None  # device_by_cert proved it
        not_before = x509.load_der_x509_certificate(peer).not_valid_before_utc
        verdict = compliance.check_in(session, device, not_before, report)
        if verdict.changed:  # an unchanged check-in is not worth an audit entry
            audit.append(
                session,
                request.state.actor,
                "device.checkin",
                group_id=device.group_id,
                device=device.uid,
                status=verdict.status,
                failing=[f.rule for f in verdict.failures],
            )
        return verdict.to_dict()


@router.get("/groups/{group_id}/compliance-policy")
def get_policy(request: Request, group_id: str) -> dict[str, Any]:
    with admin_tx(request, group_id) as (session, who):
        require(session, who.admin, P.GROUPS_READ, group_id)
        return {
            "group_id": group_id,
            "rules": [r.to_dict() for r in compliance.group_rules(session, group_id)],
            "effective": [r.to_dict() for r in compliance.effective_rules(session, group_id)],
        }


@router.put("/groups/{group_id}/compliance-policy")
def put_policy(request: Request, group_id: str, body: PolicyIn) -> dict[str, Any]:
    """Replace the group's own rules; every device of the group and its subgroups is
    judged again in the same transaction (their tunnels close if they now fail)."""
    with admin_tx(request, group_id) as (session, who):
        require(session, who.admin, P.RULES_WRITE, group_id)
        effective = compliance.set_policy(session, group_id, body.rules, request.state.actor)
        audit.append(
            session,
            request.state.actor,
            "group.compliance_policy",
            group_id=group_id,
            rules=[r["id"] for r in body.rules if isinstance(r, dict) and "id" in r],
        )
        return {
            "group_id": group_id,
            "rules": body.rules,
            "effective": [r.to_dict() for r in effective],
        }


@router.get("/devices/{uid}/compliance")
def device_compliance(
    request: Request, uid: str, limit: int = Query(compliance.HISTORY_LIMIT, ge=1, le=1000)
) -> dict[str, Any]:
    """Status, last facts, failing rules, override and history (newest first)."""
    with admin_tx(request) as (session, who):
        device = _device_for(session, who.admin, uid, P.DEVICES_READ)
        return compliance.state_of(session, device, limit)


@router.put("/devices/{uid}/compliance-override")
def put_override(request: Request, uid: str, body: OverrideIn) -> dict[str, Any]:
    """The admin's status for the device until it expires (then the policy judges it);
    recorded in its compliance history with the reason."""
    with admin_tx(request) as (session, who):
        device = _device_for(session, who.admin, uid, P.DEVICES_WRITE)
        ttl = timedelta(seconds=body.expires_in_s)
        verdict = compliance.set_override(
            session, device, body.status, ttl, request.state.actor, body.reason
        )
        audit.append(
            session,
            request.state.actor,
            "device.compliance_override",
            group_id=device.group_id,
            device=uid,
            status=body.status,
            expires_in_s=body.expires_in_s,
            reason=body.reason,
        )
        return verdict.to_dict()


@router.delete("/devices/{uid}/compliance-override")
def delete_override(
    request: Request,
    uid: str,
    reason: str | None = Query(None, min_length=1, max_length=compliance.REASON_MAX),
) -> dict[str, Any]:
    """End the device's override now (404 when it has none); the policy judges it again."""
    with admin_tx(request) as (session, who):
        device = _device_for(session, who.admin, uid, P.DEVICES_WRITE)
        verdict = compliance.set_override(session, device, None, None, request.state.actor, reason)
        audit.append(
            session,
            request.state.actor,
            "device.compliance_override.end",
            group_id=device.group_id,
            device=uid,
            reason=reason,
        )
        return verdict.to_dict()


def sweep_once(state: ConsoleState) -> int:
    with state.db.transaction() as session:
        changed = compliance.sweep(session)
        if changed:
            audit.append(session, "console:compliance-timer", "compliance.sweep", changed=changed)
        return changed


async def sweep_forever(state: ConsoleState) -> None:
    """Judge governed devices every ``compliance_sweep_s``; a failed pass is logged and the
    next one tries again (the timer must not die with one error)."""
    while True:
        await asyncio.sleep(state.config.compliance_sweep_s)
        try:
            await run_in_threadpool(sweep_once, state)
        except Exception:
            log.exception("compliance sweep failed; retrying at the next tick")
