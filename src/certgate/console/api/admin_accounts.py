"""Admin API: the admins an admin manages, their web console factors, and the audit
chain's verification.

The remote CLI's ``admin list``, ``admin show USERNAME``, ``admin set-password``, ``admin
totp`` and ``audit verify`` use these (``console.remote``); the same services answer the
local commands and the web console.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from certgate.console import paging
from certgate.console.api import schemas as s
from certgate.console.api.admin import PAGED, PageCursor, PageLimit, page_of
from certgate.console.api.deps import admin_tx, state_of
from certgate.console.local import TOP_GROUP
from certgate.console.services import admins, audit, checkpoints, rbac, signin
from certgate.console.services.rbac import Permission as P
from certgate.errors import PermissionDenied

router = APIRouter(prefix="/api/v1", responses=s.CALL_ERRORS)


@router.get("/admins", responses=PAGED)
def list_admins(
    request: Request,
    response: Response,
    limit: int = PageLimit,
    cursor: str = PageCursor,
    username: str | None = Query(None, max_length=128, description="This admin only."),
) -> list[s.AdminOut]:
    """The admins the caller manages (itself; others where it holds admins:write on every
    group they are bound to), by username, a page at a time."""
    after = paging.decode_cursor(cursor, 1)[0] if cursor else None
    with admin_tx(request) as (session, who):
        rows = [
            (admin, bindings)
            for admin, bindings in admins.manageable(session, who.admin, username)
            if after is None or admin.username > after
        ][: limit + 1]
        page, next_cursor = page_of(rows, limit, lambda row: [row[0].username])
        response.headers.update(paging.next_link(request.url, next_cursor))
        return [
            s.AdminOut(
                id=admin.id,
                username=admin.username,
                roles=[f"{b.role}@{b.group_id}" for b in bindings],
                disabled=admin.disabled,
            )
            for admin, bindings in page
        ]


@router.put("/admins/{admin_id}/password", status_code=204)
def set_password(request: Request, admin_id: str, body: s.PasswordIn) -> Response:
    """The admin's web console password (signs its browsers out); the caller manages it."""
    with admin_tx(request) as (session, who):
        target = admins.get_admin_for(session, who.admin, admin_id)
        signin.set_password(session, target, body.password)
        audit.append(session, request.state.actor, "admin.set_password", admin=target.username)
    return Response(status_code=204)


@router.post("/admins/{admin_id}/totp", status_code=201)
def new_totp(request: Request, admin_id: str) -> s.TotpOut:
    """A new TOTP second factor for the admin, its ``otpauth://`` URI answered once; the
    previous factor stops working and the admin's browsers are signed out."""
    with admin_tx(request) as (session, who):
        target = admins.get_admin_for(session, who.admin, admin_id)
        uri = signin.new_totp(session, state_of(request).pki.master, target)
        audit.append(session, request.state.actor, "admin.totp", admin=target.username)
        return s.TotpOut(otpauth_uri=uri)


@router.get("/audit/verify")
def verify_audit(request: Request) -> s.AuditVerifyOut:
    """The whole audit chain recomputed and held to the console's signed checkpoints, as
    ``certgate console audit verify`` does on the console host (audit:read on the top
    group: the chain is the instance's). A broken chain is a 200 with ``ok: false``."""
    state = state_of(request)
    with admin_tx(request, TOP_GROUP) as (session, who):
        if P.AUDIT_READ not in rbac.permissions_on(session, who.admin, TOP_GROUP):
            # Not rbac.require: its 404 for an unseen group would deny the group exists.
            raise PermissionDenied(f"verifying the audit chain needs audit:read on {TOP_GROUP}")
        verdict = checkpoints.verify(session, state.pki, state.config.audit_sink, TOP_GROUP)
        return s.AuditVerifyOut.of(verdict)
