"""Compliance from posture: device check-ins (device certificate over mTLS), group
compliance policies, a device's compliance state and history, admin overrides, and the
timer that judges silent devices (``sweep_forever``, run by the app's lifespan)."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Annotated, Any, Literal

from cryptography import x509
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictStr, Tag
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from certgate import posture
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


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=f"^{posture.RULE_ID_RE.pattern}$", max_length=63)


def _facts(kind: type) -> Any:
    return Literal[tuple(name for name, of in posture.FACTS.items() if of is kind)]


Text = Annotated[StrictStr, Field(max_length=posture.MAX_TEXT)]


class TextRule(_Rule):
    fact: _facts(str)  # type: ignore[valid-type]
    op: Literal["equals"]
    value: Text


class ListRule(_Rule):
    fact: _facts(str)  # type: ignore[valid-type]
    op: Literal["one_of"]
    value: list[Text] = Field(min_length=1, max_length=posture.MAX_RULES)


class VersionRule(_Rule):
    fact: _facts(str)  # type: ignore[valid-type]
    op: Literal["version_at_least", "version_at_most"]
    value: Text = Field(pattern="^[0-9]")  # leading digits: posture's version


class FlagRule(_Rule):
    fact: _facts(bool)  # type: ignore[valid-type]
    op: Literal["equals"]
    value: StrictBool


class AgeRule(_Rule):
    fact: _facts(int)  # type: ignore[valid-type]
    op: Literal["at_most", "at_least"]
    value: s.Whole = Field(ge=0, le=posture.MAX_AGE_S)


# Which model a rule is read with: its fact's type and its op (posture._OPS_FOR). An
# unknown fact or op is read as a text rule, whose enums then name the valid ones.
_KINDS = {str: "text", bool: "flag", int: "age"}
_BY_OP = {"one_of": "list", "version_at_least": "version", "version_at_most": "version"}


def _rule_kind(raw: Any) -> str:
    fact, op = (raw.get("fact"), raw.get("op")) if isinstance(raw, dict) else (None, None)
    kind = _KINDS.get(posture.FACTS.get(fact, str), "text") if isinstance(fact, str) else "text"
    return _BY_OP.get(op, kind) if kind == "text" and isinstance(op, str) else kind


RuleIn = Annotated[
    Annotated[TextRule, Tag("text")]
    | Annotated[ListRule, Tag("list")]
    | Annotated[VersionRule, Tag("version")]
    | Annotated[FlagRule, Tag("flag")]
    | Annotated[AgeRule, Tag("age")],
    Discriminator(_rule_kind),
]


class PolicyIn(BaseModel):
    """A group's own compliance rules, each typed by its fact and op (``posture``). Rule
    ids are unique within a policy: that, no schema can state (400, from the parser)."""

    model_config = ConfigDict(extra="forbid")
    rules: list[RuleIn] = Field(max_length=posture.MAX_RULES)

    def as_stored(self) -> list[dict[str, Any]]:
        return [rule.model_dump() for rule in self.rules]


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
        rules = body.as_stored()
        effective = compliance.set_policy(session, group_id, rules, request.state.actor)
        audit.append(
            session,
            request.state.actor,
            "group.compliance_policy",
            group_id=group_id,
            rules=[rule["id"] for rule in rules],
        )
        return {
            "group_id": group_id,
            "rules": rules,
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
