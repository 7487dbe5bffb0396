"""Fleet pages: dashboard, devices (search, filters, keyset pages), a device and its
actions, tunnel nodes, certificates. Every read is scoped by ``rbac``; every action calls
the API's own service path (``api.admin``) after the same ``rbac.require``."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import Select, func, select, true, tuple_
from sqlalchemy.orm import Session

from certgate.console.api.admin import rehearsed
from certgate.console.api.deps import state_of
from certgate.console.paging import decode_cursor, encode_cursor
from certgate.console.services import audit, ca, denials, devices, rbac, tunnels
from certgate.console.services.rbac import Permission as P
from certgate.console.services.signin import SignedIn
from certgate.console.store.models import (
    AuditEntry,
    Certificate,
    Device,
    Group,
    ProfileDelivery,
    TunnelNode,
)
from certgate.console.ui.web import SECURITY_HEADERS, FormBody, may, redirect, render, ui_tx
from certgate.errors import BadRequest, NotFound

router = APIRouter(prefix="/ui")
PAGE_SIZE = 50
EXPIRING = timedelta(days=30)
LABELS = {"noncompliant": "Mark non-compliant", "compliant": "Mark compliant"}
ACTIONS: dict[str, str] = {
    "noncompliant": "Mark the device non-compliant: every tunnel node refuses its certificates "
    "and closes its live tunnels.",
    "compliant": "Mark the device compliant: nodes admit its certificates again.",
    "block": "Block the device: nodes refuse it and close its live tunnels until unblocked.",
    "unblock": "Unblock the device: nodes admit it again if it is otherwise allowed.",
    "wipe": "Wipe: unenroll the device, revoke every certificate it holds and tell it to "
    "erase its certgate data. It must enroll again.",
    "unenroll": "Unenroll the device and revoke every certificate it holds. It must enroll again.",
}


def readable_groups(session: Session, who: SignedIn, permission: P) -> list[Group]:
    return [
        g for g in rbac.visible_groups(session, who.admin) if may(session, who, permission, g.id)
    ]


@router.get("/")
def dashboard(request: Request) -> Response:
    with ui_tx(request) as (session, who):
        scope = _scope(session, [g.id for g in readable_groups(session, who, P.DEVICES_READ)])
        return render(
            "dashboard.html",
            who,
            states=_device_states(session, scope),
            expiring=_expiring(session, scope),
            nodes=_nodes(session, [g.id for g in readable_groups(session, who, P.TUNNEL_READ)]),
            denials=_denials(session, [g.id for g in readable_groups(session, who, P.AUDIT_READ)]),
            tunnel_denials=_tunnel_denials(session, who),
        )


def _tunnel_denials(session: Session, who: SignedIn) -> denials.Series:
    """The last 24 hours of tunnel-side denials, hour by hour, in the groups ``who`` reads."""
    scope = _scope(session, [g.id for g in readable_groups(session, who, P.TUNNEL_READ)])
    return denials.series(session, scope, ca.now(), timedelta(hours=1), 24)


def _scope(session: Session, readable: list[str]) -> list[str] | None:
    """``readable``, or None when that is every group: then a query needs no group
    condition and reads one index in order (or a covering one whole)."""
    every = session.execute(select(func.count()).select_from(Group)).scalar_one()
    return None if len(readable) == every else readable


def _in(column: Any, scope: list[str] | None) -> Any:
    return true() if scope is None else column.in_(scope)


def _device_states(session: Session, scope: list[str] | None) -> dict[str, Counter[str]]:
    rows = session.execute(
        select(Device.enrollment_status, Device.compliance_status, Device.blocked, func.count())
        .where(_in(Device.group_id, scope))
        .group_by(Device.enrollment_status, Device.compliance_status, Device.blocked)
    ).all()
    states: dict[str, Counter[str]] = {"enrollment": Counter(), "compliance": Counter()}
    for enrollment, compliance, blocked, count in rows:
        states["enrollment"][enrollment] += count
        states["compliance"]["blocked" if blocked else compliance] += count
    return states


def _expiring(session: Session, scope: list[str] | None) -> int:
    now = ca.now()
    return int(
        session.execute(
            select(func.count())
            .select_from(Certificate)
            .where(
                # Group certificates only (not the admins' or the instance CAs').
                Certificate.group_id.is_not(None)
                if scope is None
                else _in(Certificate.group_id, scope),
                Certificate.revoked_at.is_(None),
                Certificate.not_after > now,
                Certificate.not_after < now + EXPIRING,
            )
        ).scalar_one()
    )


def _nodes(session: Session, group_ids: list[str]) -> list[dict[str, Any]]:
    rows = session.execute(
        select(TunnelNode, Group.feed_seq)
        .join(Group, Group.id == TunnelNode.group_id)
        .where(TunnelNode.group_id.in_(group_ids))
        .order_by(TunnelNode.group_id, TunnelNode.name)
    ).all()
    return [_node_view(node, feed_seq) for node, feed_seq in rows]


def _node_view(node: TunnelNode, feed_seq: int) -> dict[str, Any]:
    report = node.report or {}
    status = report.get("status") or {}
    table_seq = status.get("table_seq")
    age = (ca.now() - node.reported_at).total_seconds() if node.reported_at else None
    return {
        "group": node.group_id,
        "name": node.name,
        "address": node.address,
        "last_seen_at": node.last_seen_at,
        "report_age_s": age,
        "healthy": bool(status.get("fresh")) and age is not None and age < 10,
        "version": report.get("version", "-"),
        "feed_lag": feed_seq - table_seq if isinstance(table_seq, int) else None,
        "table_age_s": status.get("age_s"),
        "live": report.get("live_total", 0),
        "policy_version": status.get("policy_version"),
    }


def _denials(session: Session, group_ids: list[str]) -> Counter[str]:
    """Denied requests to the console by code, over its last 1,000 audited denials."""
    rows = session.execute(
        select(AuditEntry.detail)
        .where(AuditEntry.outcome == "denied", AuditEntry.group_id.in_(group_ids))
        .order_by(AuditEntry.id.desc())
        .limit(1000)
    ).scalars()
    return Counter(str((d or {}).get("code", "denied")) for d in rows)


@router.get("/devices")
def device_list(
    request: Request,
    q: str = "",
    group: str = "",
    compliance: str = "",
    enrollment: str = "",
    sort: str = "uid",
    after: str = "",
) -> Response:
    """Keyset pages: ``uid`` order on the primary key, ``owner`` order on (owner, uid)
    (``ix_devices_owner``); the cursor is the last row's sort key, so page N costs what
    page 1 costs at any fleet size."""
    if sort not in ("uid", "owner"):
        raise BadRequest("sort is uid or owner")
    q = q.strip()[:128]
    sort = effective_sort(sort, q, compliance)
    with ui_tx(request, group_id=group or None) as (session, who):
        if q and (uid := _exact_device(session, q)):
            return redirect(f"/ui/devices/{uid}")
        readable = [g.id for g in readable_groups(session, who, P.DEVICES_READ)]
        if group:
            rbac.require(session, who.admin, P.DEVICES_READ, group)
            scope: list[str] | None = [group]
        else:
            scope = _scope(session, readable)
        query = _filtered(scope, q, compliance, enrollment)
        rows = session.execute(_paged(query, sort, after)).scalars().all()
        more = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE]
        last = rows[-1] if rows else None
        cursor = ""
        if more and last is not None:
            cursor = encode_cursor([last.uid] if sort == "uid" else [last.owner, last.uid])
        return render(
            "devices.html",
            who,
            devices=rows,
            cursor=cursor,
            filters={
                "q": q,
                "group": group,
                "compliance": compliance,
                "enrollment": enrollment,
                "sort": sort,
            },
            groups=readable,
        )


def _exact_device(session: Session, q: str) -> str | None:
    """A uid, or a certificate thumbprint (64 hex), names exactly one device."""
    if session.get(Device, q) is not None:
        return q
    if len(q) == 64:
        cert = session.execute(
            select(Certificate).where(Certificate.thumbprint == q.lower())
        ).scalar_one_or_none()
        if cert is not None and cert.device_uid is not None:
            return cert.device_uid
    return None


def effective_sort(sort: str, q: str, compliance: str) -> str:
    """The order an index serves: an owner prefix pages in owner order, a compliance
    filter alone in uid order (its indexes are (compliance, uid) and (group, compliance,
    uid)); an order no index serves would sort the whole fleet for each page."""
    if q:
        return "owner"
    return "uid" if compliance else sort


def _filtered(group_ids: list[str] | None, q: str, compliance: str, enrollment: str) -> Select[Any]:
    query = select(Device)
    if group_ids is not None:
        query = query.where(Device.group_id.in_(group_ids))
    if q:  # an owner prefix, on the (owner, uid) index
        query = query.where(Device.owner >= q, Device.owner < q + "\uffff")
    if compliance == "blocked":
        query = query.where(Device.blocked.is_(True))
    elif compliance and q:
        # Not indexable on purpose (SQLite would take the equality's index and sort the
        # fleet): the owner prefix is the narrow range here, compliance a residual test.
        query = query.where(Device.compliance_status.concat("") == compliance)
    elif compliance:
        query = query.where(Device.compliance_status == compliance)
    if enrollment:
        query = query.where(Device.enrollment_status == enrollment)
    return query


def _paged(query: Select[Any], sort: str, after: str) -> Select[Any]:
    if sort == "uid":
        if after:
            query = query.where(Device.uid > decode_cursor(after, 1)[0])
        return query.order_by(Device.uid).limit(PAGE_SIZE + 1)
    if after:
        owner, uid = decode_cursor(after, 2)
        query = query.where(tuple_(Device.owner, Device.uid) > tuple_(owner, uid))
    return query.order_by(Device.owner, Device.uid).limit(PAGE_SIZE + 1)


def _device_for(session: Session, who: SignedIn, uid: str, permission: P) -> Device:
    device = devices.get_device(session, uid)
    rbac.require(session, who.admin, permission, device.group_id)
    return device


@router.get("/devices/{uid}")
def device_page(request: Request, uid: str) -> Response:
    with ui_tx(request) as (session, who):
        device = _device_for(session, who, uid, P.DEVICES_READ)
        certs = session.execute(
            select(Certificate)
            .where(Certificate.device_uid == uid)
            .order_by(Certificate.issued_at.desc())
        ).scalars()
        return render(
            "device.html",
            who,
            device=device,
            certs=list(certs),
            tunnels=_live_tunnels(session, device),
            history=_history(session, device),
            profiles=_profiles(session, device),
            can_write=may(session, who, P.DEVICES_WRITE, device.group_id),
            can_revoke=may(session, who, P.CERTS_REVOKE, device.group_id),
            actions=ACTIONS,
            labels=LABELS,
        )


def _live_tunnels(session: Session, device: Device) -> list[dict[str, Any]]:
    nodes = session.execute(
        select(TunnelNode).where(TunnelNode.group_id == device.group_id)
    ).scalars()
    return [
        {"node": node.name, **tunnel}
        for node in nodes
        for tunnel in (node.report or {}).get("live", [])
        if tunnel.get("device_uid") == device.uid
    ]


def _profiles(session: Session, device: Device) -> list[ProfileDelivery]:
    """The Per-App Tunnel profile versions delivered to the device, newest first."""
    return list(
        session.execute(
            select(ProfileDelivery)
            .where(ProfileDelivery.device_uid == device.uid)
            .order_by(ProfileDelivery.version.desc())
            .limit(20)
        ).scalars()
    )


def _history(session: Session, device: Device) -> list[AuditEntry]:
    """The device's audited changes (compliance, block, ...), newest first."""
    rows = session.execute(
        select(AuditEntry)
        .where(AuditEntry.group_id == device.group_id, AuditEntry.action.like("device.%"))
        .order_by(AuditEntry.id.desc())
        .limit(500)
    ).scalars()
    return [r for r in rows if (r.detail or {}).get("device") == device.uid][:50]


def _change(device: Device, action: str) -> Any:
    if action in ("compliant", "noncompliant"):
        return lambda tx: devices.set_compliance(tx, device, action)
    return lambda tx: devices.apply_action(tx, device, action)


@router.get("/devices/{uid}/confirm/{action}")
def confirm_action(request: Request, uid: str, action: str) -> Response:
    """What the action will do, and whom the nodes would refuse (a dry-run), before it."""
    if action not in ACTIONS:
        raise NotFound(f"no device action {action!r}")
    with ui_tx(request) as (session, who):
        device = _device_for(session, who, uid, P.DEVICES_WRITE)
        request.state.group_id = device.group_id
        preview = rehearsed(
            request,
            session,
            _audit_action(action),
            device.group_id,
            _change(device, action),
            device=uid,
        )
        return render(
            "confirm.html",
            who,
            device=device,
            action=action,
            says=ACTIONS[action],
            label=LABELS.get(action, action.capitalize()),
            preview=preview,
        )


def _audit_action(action: str) -> str:
    return "device.compliance" if action in ("compliant", "noncompliant") else f"device.{action}"


@router.post("/devices/{uid}/{action}")
def device_action(request: Request, uid: str, action: str, form: FormBody) -> Response:
    if action not in ACTIONS:
        raise NotFound(f"no device action {action!r}")
    with ui_tx(request, form) as (session, who):
        device = _device_for(session, who, uid, P.DEVICES_WRITE)
        request.state.group_id = device.group_id
        _change(device, action)(session)
        detail: dict[str, Any] = {"device": uid}
        if action in ("compliant", "noncompliant"):
            detail["status"] = action
        audit.append(
            session,
            request.state.actor,
            _audit_action(action),
            group_id=device.group_id,
            via="ui",
            **detail,
        )
    return redirect(f"/ui/devices/{uid}")


@router.post("/certificates/{serial}/revoke")
def revoke_certificate(request: Request, serial: str, form: FormBody) -> Response:
    with ui_tx(request, form) as (session, who):
        row = session.get(Certificate, serial.lower())
        if row is None or row.group_id is None or row.device_uid is None:
            raise NotFound(f"device certificate {serial} not found")
        request.state.group_id = row.group_id
        rbac.require(session, who.admin, P.CERTS_REVOKE, row.group_id)
        reason = form.get("reason", "unspecified")
        devices.revoke_client_cert(session, row, reason)
        audit.append(
            session,
            request.state.actor,
            "cert.revoke",
            group_id=row.group_id,
            serial=row.serial,
            reason=reason,
            via="ui",
        )
        uid = row.device_uid
    return redirect(f"/ui/devices/{uid}")


@router.get("/certificates/{serial}/confirm-revoke")
def confirm_revoke(request: Request, serial: str) -> Response:
    with ui_tx(request) as (session, who):
        row = session.get(Certificate, serial.lower())
        if row is None or row.group_id is None or row.device_uid is None:
            raise NotFound(f"device certificate {serial} not found")
        rbac.require(session, who.admin, P.CERTS_REVOKE, row.group_id)
        return render("confirm_revoke.html", who, cert=row)


@router.get("/nodes")
def nodes_page(request: Request) -> Response:
    with ui_tx(request) as (session, who):
        groups = readable_groups(session, who, P.TUNNEL_READ)
        return render(
            "nodes.html",
            who,
            nodes=_nodes(session, [g.id for g in groups]),
            setup_groups=[g.id for g in groups if may(session, who, P.TUNNEL_SETUP, g.id)],
            console_url=state_of(request).config.public_url,
        )


@router.get("/certificates")
def certificates_page(request: Request, group: str = "", after: str = "") -> Response:
    """A group's certificates, newest serial first... in serial order (keyset on the key)."""
    with ui_tx(request, group_id=group or None) as (session, who):
        groups = [g.id for g in readable_groups(session, who, P.CERTS_READ)]
        group = group or (groups[0] if groups else "")
        certs: list[Certificate] = []
        cursor = ""
        if group:
            rbac.require(session, who.admin, P.CERTS_READ, group)
            query = select(Certificate).where(Certificate.group_id == group)
            if after:
                query = query.where(Certificate.serial > decode_cursor(after, 1)[0])
            certs = list(
                session.execute(query.order_by(Certificate.serial).limit(PAGE_SIZE + 1)).scalars()
            )
            if len(certs) > PAGE_SIZE:
                certs = certs[:PAGE_SIZE]
                cursor = encode_cursor([certs[-1].serial])
        return render(
            "certificates.html", who, certs=certs, group=group, groups=groups, cursor=cursor
        )


@router.post("/groups/{group_id}/installer")
def tunnel_installer(request: Request, group_id: str, form: FormBody) -> Response:
    """The node installer archive, as ``GET /api/v1/groups/{id}/tunnel/installer`` makes
    it (it holds a one-time install token, hence a POST with the CSRF token here)."""
    state = state_of(request)
    with ui_tx(request, form, group_id) as (session, who):
        data = tunnels.download_installer(
            session,
            state.pki,
            who.admin,
            group_id,
            state.config.public_url,
            request.state.actor,
            timedelta(seconds=state.config.installer_ttl_s),
            via="ui",
        )
    name = f"certgate-tunnel-{group_id}.tar.gz"
    return Response(
        data,
        media_type="application/gzip",
        headers={**SECURITY_HEADERS, "content-disposition": f'attachment; filename="{name}"'},
    )
