"""Rotation API (``services.rotation``): start (prepare), switch, finish, status.

``POST /api/v1/groups/{g}/rotations/{kind}`` prepares, ``.../{kind}/switch`` switches,
``.../device-root/renew-devices`` makes every device still on the old Device Root fetch a
new certificate at its agent's next check, ``.../{kind}/finish`` finishes
(``?force=true`` finishes although something still depends on the old one; audited as
such), ``GET /api/v1/groups/{g}/rotations`` is the status.
An instance-wide kind (``device-root``, ``secure-channel-root``) is reached through any
group's path and needs a top-level superadmin.
Every step is audited as ``rotation.<step>`` in the transaction that made it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Path, Query, Request
from sqlalchemy.orm import Session

from certgate.console.api import schemas as s
from certgate.console.api.deps import admin_tx, state_of
from certgate.console.services import audit, rbac, rotation
from certgate.console.services.rbac import Permission as P
from certgate.console.state import ConsoleState
from certgate.console.store.models import Admin

# The kinds that rotate today; any other stays the service's 400 (``rotation.prepare``).
Kind = Path(json_schema_extra={"enum": list(rotation.IMPLEMENTED)})
router = APIRouter(prefix="/api/v1/groups/{group_id}/rotations", responses=s.CALL_ERRORS)


def _require_writer(session: Session, admin: Admin, group_id: str, kind: str) -> None:
    rbac.require(session, admin, P.GROUPS_WRITE, group_id)
    if kind in rotation.INSTANCE_KINDS:
        rbac.require_global(session, admin, f"rotating the {kind}")


@router.get("")
def rotation_status(request: Request, group_id: str) -> list[dict[str, Any]]:
    with admin_tx(request, group_id) as (session, who):
        rbac.require(session, who.admin, P.TUNNEL_READ, group_id)
        return rotation.status(session, group_id)


@router.post("/{kind}", status_code=201)
def rotation_prepare(
    request: Request, group_id: str, kind: str = Kind, body: s.RotateIn | None = None
) -> dict[str, Any]:
    overlap = timedelta(seconds=body.overlap_s) if body else rotation.DEFAULT_OVERLAP
    with admin_tx(request, group_id) as (session, who):
        _require_writer(session, who.admin, group_id, kind)
        state = state_of(request)
        started = rotation.prepare(session, state.pki, group_id, kind, request.state.actor, overlap)
        _present_chain(state, session, kind)
        audit.append(
            session,
            request.state.actor,
            "rotation.prepare",
            group_id=group_id,
            kind=kind,
            rotation=started.id,
            overlap_s=started.overlap_s,
        )
        return rotation.describe(session, started)


@router.post("/{kind}/switch")
def rotation_switch(request: Request, group_id: str, kind: str = Kind) -> dict[str, Any]:
    with admin_tx(request, group_id) as (session, who):
        _require_writer(session, who.admin, group_id, kind)
        state = state_of(request)
        switched = rotation.switch(session, state.pki, group_id, kind)
        _present_chain(state, session, kind)
        audit.append(
            session,
            request.state.actor,
            "rotation.switch",
            group_id=group_id,
            kind=kind,
            rotation=switched.id,
        )
        return rotation.describe(session, switched)


@router.post("/{kind}/finish")
def rotation_finish(
    request: Request, group_id: str, kind: str = Kind, force: bool = Query(False)
) -> dict[str, Any]:
    with admin_tx(request, group_id) as (session, who):
        _require_writer(session, who.admin, group_id, kind)
        state = state_of(request)
        finished = rotation.finish(session, state.pki, group_id, kind, force=force)
        _present_chain(state, session, kind)
        audit.append(
            session,
            request.state.actor,
            "rotation.finish.forced" if force else "rotation.finish",
            group_id=group_id,
            kind=kind,
            rotation=finished.id,
        )
        return rotation.describe(session, finished)


@router.post("/device-root/renew-devices")
def rotation_renew_devices(request: Request, group_id: str) -> dict[str, Any]:
    with admin_tx(request, group_id) as (session, who):
        _require_writer(session, who.admin, group_id, rotation.DEVICE)
        uids = rotation.renew_devices(session, state_of(request).pki, group_id)
        audit.append(
            session,
            request.state.actor,
            "rotation.renew_devices",
            group_id=group_id,
            kind=rotation.DEVICE,
            devices=len(uids),
        )
        return {"devices": uids}


def _present_chain(state: ConsoleState, session: Session, kind: str) -> None:
    """This console presents what the step decided at once (other console processes
    within seconds, ``console.presenter``): a TLS certificate of the new Secure Channel
    Root after its switch, and the chain of a Root rotation's step (a cross certificate
    from prepare on, the offered one after finish)."""
    if kind in (rotation.SECURE_CHANNEL, rotation.ROOT):
        state.renew_tls(session)
