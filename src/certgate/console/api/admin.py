"""Admin API: groups, admins, API keys, enrollment, devices, certificates, tunnels, audit.

Every handler authenticates (API key + admin cert), authorizes on the object's group,
acts, and audits, inside one transaction. The changes that nodes enforce (group settings,
compliance, device actions) take ``?dry_run=true``: the same checks and the same service
call, rolled back (``services.dryrun``); the answer says whom the nodes would refuse, and
only the dry-run itself is audited (``<action>.dry_run``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Path, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from certgate.console import paging
from certgate.console.api import schemas as s
from certgate.console.api.deps import admin_tx, state_of
from certgate.console.services import (
    admins,
    audit,
    ca,
    devices,
    dryrun,
    groups,
    rbac,
    tunnels,
)
from certgate.console.services.rbac import Permission as P
from certgate.console.store.models import (
    Admin,
    AuditEntry,
    Certificate,
    Device,
    Group,
    TunnelNode,
)
from certgate.errors import BadRequest, NotFound
from certgate.pki.keys import private_key_pem

router = APIRouter(prefix="/api/v1", responses=s.CALL_ERRORS)
DeviceAction = Path(json_schema_extra={"enum": ["unenroll", "wipe", "block", "unblock"]})
DryRunFlag = Query(False, description="Change nothing; answer whom the change would refuse.")


def group_out(group: Any) -> s.GroupOut:
    return s.GroupOut(
        id=group.id,
        name=group.name,
        parent_id=group.parent_id,
        feed_seq=group.feed_seq,
        policy_version=group.policy_version,
        settings=group.settings,
    )


def device_out(device: Device) -> s.DeviceOut:
    return s.DeviceOut.model_validate(device, from_attributes=True)


def cert_out(cert: Certificate) -> s.CertOut:
    return s.CertOut.model_validate(cert, from_attributes=True)


@router.get("/groups")
def list_groups(request: Request) -> list[s.GroupOut]:
    with admin_tx(request) as (session, who):
        return [group_out(g) for g in rbac.visible_groups(session, who.admin)]


@router.post("/groups", status_code=201)
def create_group(request: Request, body: s.GroupIn) -> s.GroupOut:
    parent = body.parent_id
    with admin_tx(request, parent) as (session, who):
        if parent is None:
            rbac.require_global(session, who.admin)
        else:
            rbac.require(session, who.admin, P.GROUPS_WRITE, parent)
        settings = body.settings.changes() if body.settings else None
        group = groups.create_group(
            session, state_of(request).pki, body.id, body.name, parent, settings
        )
        detail: dict[str, Any] = {"parent": parent}
        if parent is None:
            # No binding reaches a new top-level group: without one, its creator could not
            # read what it just created (201, then 404), nor anyone manage it over the API.
            admins.bind_role(session, who.admin, "superadmin", group.id)
            detail["creator_role"] = "superadmin"
        audit.append(session, request.state.actor, "group.create", group_id=group.id, **detail)
        return group_out(group)


@router.get("/groups/{group_id}")
def get_group(request: Request, group_id: str) -> s.GroupOut:
    with admin_tx(request, group_id) as (session, who):
        rbac.require(session, who.admin, P.GROUPS_READ, group_id)
        return group_out(groups.get_group(session, group_id))


def rehearsed(
    request: Request,
    session: Session,
    action: str,
    group_id: str,
    change: Callable[[Session], object],
    **detail: Any,
) -> s.DryRunOut:
    """``change`` rolled back, and whom it would refuse; audited as ``<action>.dry_run``."""
    result = dryrun.rehearse(session, group_id, change)
    audit.append(
        session,
        request.state.actor,
        f"{action}.dry_run",
        group_id=group_id,
        devices=len(result.devices),
        live_tunnels=len(result.live_tunnels),
        **detail,
    )
    return s.DryRunOut.model_validate(result.to_dict())


@router.patch("/groups/{group_id}/settings")
def update_settings(
    request: Request, group_id: str, body: s.SettingsIn, dry_run: bool = DryRunFlag
) -> s.GroupOut | s.DryRunOut:
    pki = state_of(request).pki
    with admin_tx(request, group_id) as (session, who):
        changes = body.changes()
        rbac.require(session, who.admin, rbac.settings_permission(set(changes)), group_id)

        def change(tx: Session) -> Group:
            return groups.update_settings(tx, pki, group_id, changes)

        if dry_run:
            return rehearsed(
                request, session, "group.settings", group_id, change, keys=sorted(changes)
            )
        group = change(session)
        audit.append(
            session, request.state.actor, "group.settings", group_id=group_id, keys=sorted(changes)
        )
        return group_out(group)


@router.post("/admins", status_code=201)
def create_admin(request: Request, body: s.AdminIn) -> s.AdminCreated:
    with admin_tx(request, body.group_id) as (session, who):
        rbac.require(session, who.admin, P.ADMINS_WRITE, body.group_id)
        rbac.require_can_grant(session, who.admin, body.role, body.group_id)
        admin = admins.create_admin(session, body.username, body.role, body.group_id)
        key = admins.issue_api_key(session, admin, "initial")
        cert, private = admins.issue_admin_cert(session, state_of(request).pki, admin)
        audit.append(
            session,
            request.state.actor,
            "admin.create",
            group_id=body.group_id,
            admin=admin.username,
            role=body.role,
            api_key_id=key.id,
        )
        return s.AdminCreated(
            id=admin.id,
            username=admin.username,
            api_key=key.token,
            certificate=ca.pem(cert),
            private_key=private_key_pem(private).decode(),
        )


@router.post("/admins/{admin_id}/api-keys", status_code=201)
def create_api_key(request: Request, admin_id: str) -> s.ApiKeyCreated:
    with admin_tx(request) as (session, who):
        target = admins.get_admin_for(session, who.admin, admin_id)
        key = admins.issue_api_key(session, target, "api")
        audit.append(
            session, request.state.actor, "apikey.create", admin=target.username, api_key_id=key.id
        )
        return s.ApiKeyCreated(id=key.id, api_key=key.token)


@router.get("/admins/{admin_id}/api-keys")
def list_api_keys(request: Request, admin_id: str) -> list[s.ApiKeyOut]:
    """Key ids and their last use; the keys themselves were shown once and are not stored."""
    with admin_tx(request) as (session, who):
        target = admins.get_admin_for(session, who.admin, admin_id)
        return [
            s.ApiKeyOut.model_validate(k, from_attributes=True)
            for k in admins.api_keys_of(session, target)
        ]


@router.post("/admins/{admin_id}/roles", status_code=201)
def grant_role(request: Request, admin_id: str, body: s.GrantIn) -> dict[str, str]:
    with admin_tx(request, body.group_id) as (session, who):
        rbac.require(session, who.admin, P.ADMINS_WRITE, body.group_id)
        rbac.require_can_grant(session, who.admin, body.role, body.group_id)
        # Granting needs admins:write where the role applies, not over the grantee's groups.
        target = session.get(Admin, admin_id)
        if target is None:
            raise NotFound("admin not found")
        admins.bind_role(session, target, body.role, body.group_id)
        audit.append(
            session,
            request.state.actor,
            "admin.grant",
            group_id=body.group_id,
            admin=target.username,
            role=body.role,
        )
        return {"admin_id": target.id, "role": body.role, "group_id": body.group_id}


@router.delete("/api-keys/{key_id}", status_code=204)
def revoke_api_key(request: Request, key_id: str) -> Response:
    with admin_tx(request) as (session, who):
        row = admins.api_key_for(session, who.admin, key_id)
        admins.revoke_api_key(session, row.id)
        audit.append(session, request.state.actor, "apikey.revoke", api_key_id=key_id)
    return Response(status_code=204)


@router.post("/groups/{group_id}/enrollment-users", status_code=201)
def create_enrollment_user(
    request: Request, group_id: str, body: s.EnrollmentUserIn
) -> dict[str, str]:
    with admin_tx(request, group_id) as (session, who):
        rbac.require(session, who.admin, P.ENROLLMENT_WRITE, group_id)
        devices.create_enrollment_user(session, group_id, body.username, body.password)
        audit.append(
            session,
            request.state.actor,
            "enrollment_user.create",
            group_id=group_id,
            username=body.username,
        )
        return {"username": body.username, "group_id": group_id}


@router.post("/groups/{group_id}/enrollment-tokens", status_code=201)
def create_enrollment_token(
    request: Request, group_id: str, body: s.EnrollmentTokenIn
) -> s.TokenOut:
    ttl = body.ttl_s or state_of(request).config.enrollment_token_ttl_s
    with admin_tx(request, group_id) as (session, who):
        rbac.require(session, who.admin, P.ENROLLMENT_WRITE, group_id)
        token = devices.create_enrollment_token(
            session, group_id, body.owner, request.state.actor, timedelta(seconds=ttl)
        )
        audit.append(
            session,
            request.state.actor,
            "enrollment_token.create",
            group_id=group_id,
            token_id=token.id,
            owner=body.owner,
        )
        return s.TokenOut(id=token.id, token=token.token, expires_in_s=ttl)


PageLimit = Query(paging.DEFAULT_PAGE, ge=1, le=paging.MAX_PAGE, description="Page size.")
PageCursor = Query(
    "",
    max_length=1024,
    description='Opaque; from the previous page\'s `Link: <...>; rel="next"` (400 if malformed).',
    json_schema_extra={"format": "page-cursor"},
)
PAGED: dict[int | str, dict[str, Any]] = {
    200: {
        "headers": {
            "Link": {
                "description": 'The next page: `<URL>; rel="next"`; absent on the last page.',
                "schema": {"type": "string"},
            }
        }
    }
}


def page_of(rows: list[Any], limit: int, key: Callable[[Any], list[str]]) -> tuple[list[Any], str]:
    """The first ``limit`` of ``limit + 1`` rows, and the cursor after them if more follow."""
    if len(rows) <= limit:
        return rows, ""
    return rows[:limit], paging.encode_cursor(key(rows[limit - 1]))


@router.get("/groups/{group_id}/devices", responses=PAGED)
def list_devices(
    request: Request,
    response: Response,
    group_id: str,
    limit: int = PageLimit,
    cursor: str = PageCursor,
    compliance: str | None = Query(None, max_length=16, description="compliant, ..."),
    enrollment: str | None = Query(None, max_length=16, description="enrolled, ..."),
    blocked: bool | None = None,
) -> list[s.DeviceOut]:
    """The group's devices in uid order, a page at a time (keyset on the primary key)."""
    query = select(Device).where(Device.group_id == group_id)
    if compliance:
        query = query.where(Device.compliance_status == compliance)
    if enrollment:
        query = query.where(Device.enrollment_status == enrollment)
    if blocked is not None:
        query = query.where(Device.blocked.is_(blocked))
    if cursor:
        query = query.where(Device.uid > paging.decode_cursor(cursor, 1)[0])
    with admin_tx(request, group_id) as (session, who):
        rbac.require(session, who.admin, P.DEVICES_READ, group_id)
        rows = list(session.execute(query.order_by(Device.uid).limit(limit + 1)).scalars())
        page, after = page_of(rows, limit, lambda d: [d.uid])
        response.headers.update(paging.next_link(request.url, after))
        return [device_out(d) for d in page]


def _device_for(session: Session, who: admins.AdminPrincipal, uid: str, perm: P) -> Device:
    device = devices.get_device(session, uid)
    try:
        rbac.require(session, who.admin, perm, device.group_id)
    except NotFound as exc:
        raise devices.unknown_device(uid) from exc
    return device


@router.get("/devices/{uid}")
def get_device(request: Request, uid: str) -> s.DeviceOut:
    with admin_tx(request) as (session, who):
        return device_out(_device_for(session, who, uid, P.DEVICES_READ))


@router.put("/devices/{uid}/compliance")
def set_compliance(
    request: Request, uid: str, body: s.ComplianceIn, dry_run: bool = DryRunFlag
) -> s.DeviceOut | s.DryRunOut:
    with admin_tx(request) as (session, who):
        device = _device_for(session, who, uid, P.DEVICES_WRITE)
        if dry_run:
            return rehearsed(
                request,
                session,
                "device.compliance",
                device.group_id,
                lambda tx: devices.set_compliance(tx, device, body.status),
                device=uid,
                status=body.status,
            )
        devices.set_compliance(session, device, body.status)
        audit.append(
            session,
            request.state.actor,
            "device.compliance",
            group_id=device.group_id,
            device=uid,
            status=body.status,
        )
        return device_out(device)


@router.post("/devices/{uid}/{action}")
def device_action(
    request: Request, uid: str, action: str = DeviceAction, dry_run: bool = DryRunFlag
) -> s.DeviceOut | s.DryRunOut:
    """``unenroll``, ``wipe``, ``block`` or ``unblock``."""
    if action not in devices.LIFECYCLE_ACTIONS:
        raise NotFound(f"no device action {action!r}")
    with admin_tx(request) as (session, who):
        device = _device_for(session, who, uid, P.DEVICES_WRITE)
        if dry_run:
            return rehearsed(
                request,
                session,
                f"device.{action}",
                device.group_id,
                lambda tx: devices.apply_action(tx, device, action),
                device=uid,
            )
        devices.apply_action(session, device, action)
        audit.append(
            session, request.state.actor, f"device.{action}", group_id=device.group_id, device=uid
        )
        return device_out(device)


@router.get("/groups/{group_id}/certificates", responses=PAGED)
def list_certificates(
    request: Request,
    response: Response,
    group_id: str,
    limit: int = PageLimit,
    cursor: str = PageCursor,
    kind: str | None = Query(None, max_length=32, description="device, app, ..."),
    revoked: bool | None = None,
    device_uid: str | None = Query(None, max_length=32),
) -> list[s.CertOut]:
    """The group's certificates in thumbprint order, a page at a time (keyset on
    ``ix_certificates_group_thumbprint``)."""
    query = select(Certificate).where(Certificate.group_id == group_id)
    if kind:
        query = query.where(Certificate.kind == kind)
    if revoked is not None:
        query = query.where(
            Certificate.revoked_at.is_not(None) if revoked else Certificate.revoked_at.is_(None)
        )
    if device_uid:
        query = query.where(Certificate.device_uid == device_uid)
    if cursor:
        query = query.where(Certificate.thumbprint > paging.decode_cursor(cursor, 1)[0])
    with admin_tx(request, group_id) as (session, who):
        rbac.require(session, who.admin, P.CERTS_READ, group_id)
        rows = list(
            session.execute(query.order_by(Certificate.thumbprint).limit(limit + 1)).scalars()
        )
        page, after = page_of(rows, limit, lambda c: [c.thumbprint])
        response.headers.update(paging.next_link(request.url, after))
        return [cert_out(c) for c in page]


@router.post("/certificates/{serial}/revoke")
def revoke_certificate(request: Request, serial: str, body: s.RevokeIn) -> s.CertOut:
    with admin_tx(request) as (session, who):
        row = session.get(Certificate, serial.lower())
        unknown = NotFound(f"device certificate {serial} not found")
        if row is None or row.group_id is None or row.device_uid is None:
            raise unknown
        try:
            rbac.require(session, who.admin, P.CERTS_REVOKE, row.group_id)
        except NotFound as exc:  # a group the admin cannot read: answer as for no certificate
            raise unknown from exc
        devices.revoke_client_cert(session, row, body.reason)
        audit.append(
            session,
            request.state.actor,
            "cert.revoke",
            group_id=row.group_id,
            serial=row.serial,
            reason=body.reason,
        )
        return cert_out(row)


@router.post("/groups/{group_id}/tunnel/setup")
def tunnel_setup(request: Request, group_id: str, body: s.SetupIn) -> dict[str, Any]:
    """Tunnel setup: API key + admin certificate of an admin with tunnel:setup on the group."""
    state = state_of(request)
    with admin_tx(request, group_id) as (session, who):
        rbac.require(session, who.admin, P.TUNNEL_SETUP, group_id)
        address = body.address or (request.client.host if request.client else "")
        bundle = tunnels.setup_bundle(
            session, state.pki, group_id, state.config.public_url, body.node_name, address
        )
        audit.append(
            session,
            request.state.actor,
            "tunnel.setup",
            group_id=group_id,
            node=body.node_name,
            address=address,
        )
        return bundle


@router.get(
    "/groups/{group_id}/tunnel/installer",
    response_class=Response,
    responses=s.binary_answer("The installer bundle (tar.gz).", "application/gzip"),
)
def tunnel_installer(request: Request, group_id: str) -> Response:
    state = state_of(request)
    with admin_tx(request, group_id) as (session, who):
        data = tunnels.download_installer(
            session,
            state.pki,
            who.admin,
            group_id,
            state.config.public_url,
            request.state.actor,
            timedelta(seconds=state.config.installer_ttl_s),
        )
    return Response(
        data,
        media_type="application/gzip",
        headers={
            "content-disposition": f'attachment; filename="certgate-tunnel-{group_id}.tar.gz"'
        },
    )


@router.get("/groups/{group_id}/tunnel/nodes")
def tunnel_nodes(request: Request, group_id: str) -> list[dict[str, Any]]:
    with admin_tx(request, group_id) as (session, who):
        rbac.require(session, who.admin, P.TUNNEL_READ, group_id)
        rows = session.execute(
            select(TunnelNode).where(TunnelNode.group_id == group_id).order_by(TunnelNode.name)
        ).scalars()
        return [
            {
                "name": n.name,
                "address": n.address,
                "registered_at": n.registered_at,
                "last_seen_at": n.last_seen_at,
            }
            for n in rows
        ]


@router.get("/audit", responses=PAGED)
def read_audit(
    request: Request,
    response: Response,
    group_id: str = Query(max_length=63),
    limit: int = PageLimit,
    cursor: str = PageCursor,
    action: str | None = Query(None, max_length=64, description="An action prefix."),
    actor: str | None = Query(None, max_length=200),
    outcome: str | None = Query(None, max_length=16, description="ok or denied."),
) -> list[s.AuditOut]:
    """The group's audit entries, newest first, a page at a time (keyset on the id)."""
    query = select(AuditEntry).where(AuditEntry.group_id == group_id)
    if action:
        query = query.where(AuditEntry.action.startswith(action, autoescape=True))
    if actor:
        query = query.where(AuditEntry.actor == actor)
    if outcome:
        query = query.where(AuditEntry.outcome == outcome)
    if cursor:
        before = paging.decode_cursor(cursor, 1)[0]
        if not before.isdigit():
            raise BadRequest("malformed page cursor")
        query = query.where(AuditEntry.id < int(before))
    with admin_tx(request, group_id) as (session, who):
        rbac.require(session, who.admin, P.AUDIT_READ, group_id)
        rows = list(
            session.execute(query.order_by(AuditEntry.id.desc()).limit(limit + 1)).scalars()
        )
        page, after = page_of(rows, limit, lambda e: [str(e.id)])
        response.headers.update(paging.next_link(request.url, after))
        return [s.AuditOut.model_validate(r, from_attributes=True) for r in page]
