"""Management pages: groups (tree, settings, a rules editor that shows the dry-run before
saving), the audit trail (filters, CSV/JSON export, chain verification), admins and API
keys (a new key shown once)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import Session

from certgate.console.api.admin import rehearsed
from certgate.console.api.deps import state_of
from certgate.console.api.schemas import SettingsIn
from certgate.console.paging import decode_cursor, encode_cursor
from certgate.console.services import admins, audit, groups, rbac
from certgate.console.services.rbac import Permission as P
from certgate.console.services.signin import SignedIn
from certgate.console.store.models import AuditEntry, Group
from certgate.console.ui.fleet import readable_groups
from certgate.console.ui.web import SECURITY_HEADERS, FormBody, may, render, ui_tx
from certgate.errors import BadRequest

router = APIRouter(prefix="/ui")
AUDIT_PAGE = 100
EXPORT_MAX = 10_000


def _tree(session: Session, who: SignedIn) -> list[tuple[int, Group]]:
    """Visible groups depth-first, each with its depth below the first visible ancestor."""
    visible = rbac.visible_groups(session, who.admin)
    ids = {g.id for g in visible}
    children: dict[str | None, list[Group]] = {}
    for group in visible:
        parent = group.parent_id if group.parent_id in ids else None
        children.setdefault(parent, []).append(group)
    out: list[tuple[int, Group]] = []

    def walk(parent: str | None, depth: int) -> None:
        for group in children.get(parent, []):
            out.append((depth, group))
            walk(group.id, depth + 1)

    walk(None, 0)
    return out


@router.get("/groups")
def groups_page(request: Request) -> Response:
    with ui_tx(request) as (session, who):
        return render("groups.html", who, tree=_tree(session, who))


@router.get("/groups/{group_id}")
def group_page(request: Request, group_id: str) -> Response:
    with ui_tx(request, group_id=group_id) as (session, who):
        rbac.require(session, who.admin, P.GROUPS_READ, group_id)
        group = groups.get_group(session, group_id)
        rules = {k: group.settings.get(k) for k in sorted(rbac.RULE_SETTINGS)}
        return render(
            "group.html",
            who,
            group=group,
            settings=json.dumps(group.settings, indent=2, sort_keys=True),
            rules=json.dumps(rules, indent=2, sort_keys=True),
            can_write=may(session, who, P.RULES_WRITE, group_id),
        )


def _settings_changes(text: str) -> dict[str, Any]:
    try:
        return SettingsIn.model_validate_json(text).model_dump(exclude_none=True)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise BadRequest(f"settings: {problems}") from exc


@router.post("/groups/{group_id}/settings")
def save_settings(request: Request, group_id: str, form: FormBody) -> Response:
    """Without ``confirm``: the dry-run of the change, and a button to save it. With it:
    the change, as ``PATCH /api/v1/groups/{id}/settings`` makes it."""
    pki = state_of(request).pki
    text = form.one("settings")
    with ui_tx(request, form, group_id) as (session, who):
        changes = _settings_changes(text)
        rbac.require(session, who.admin, rbac.settings_permission(set(changes)), group_id)

        def change(tx: Session) -> Group:
            return groups.update_settings(tx, pki, group_id, changes)

        if form.get("confirm") != "yes":
            preview = rehearsed(
                request, session, "group.settings", group_id, change, keys=sorted(changes)
            )
            return render("group_preview.html", who, group_id=group_id, text=text, preview=preview)
        change(session)
        audit.append(
            session,
            request.state.actor,
            "group.settings",
            group_id=group_id,
            keys=sorted(changes),
            via="ui",
        )
        group = groups.get_group(session, group_id)
        return render(
            "group.html",
            who,
            group=group,
            saved=True,
            settings=json.dumps(group.settings, indent=2, sort_keys=True),
            rules=text,
            can_write=True,
        )


@router.get("/audit")
def audit_page(
    request: Request,
    group: str = "",
    action: str = Query("", max_length=64),
    actor: str = Query("", max_length=200),
    outcome: str = Query("", max_length=16),
    before: str = "",
    format: str = "html",
) -> Response:
    """Newest first, keyset on the entry id; ``format=csv|json`` exports up to 10,000."""
    if format not in ("html", "csv", "json"):
        raise BadRequest("format is html, csv or json")
    with ui_tx(request, group_id=group or None) as (session, who):
        visible = [g.id for g in readable_groups(session, who, P.AUDIT_READ)]
        if group:
            rbac.require(session, who.admin, P.AUDIT_READ, group)
        scope: ColumnElement[bool] = AuditEntry.group_id.in_([group] if group else visible)
        if not group and may_verify(session, who):  # sign-ins, key and admin changes
            scope = or_(scope, AuditEntry.group_id.is_(None))
        query = select(AuditEntry).where(scope)
        if action:
            query = query.where(AuditEntry.action.like(f"{action}%"))
        if actor:
            query = query.where(AuditEntry.actor == actor)
        if outcome:
            query = query.where(AuditEntry.outcome == outcome)
        if before:
            query = query.where(AuditEntry.id < _entry_id(before))
        limit = EXPORT_MAX if format != "html" else AUDIT_PAGE
        rows = list(
            session.execute(query.order_by(AuditEntry.id.desc()).limit(limit + 1)).scalars()
        )
        more, rows = len(rows) > limit, rows[:limit]
        if format != "html":
            audit.append(
                session,
                request.state.actor,
                "audit.export",
                group_id=group or None,
                format=format,
                entries=len(rows),
            )
            return _export(rows, format)
        return render(
            "audit.html",
            who,
            rows=rows,
            groups=visible,
            filters={"group": group, "action": action, "actor": actor, "outcome": outcome},
            cursor=encode_cursor([str(rows[-1].id)]) if more and rows else "",
            chain=audit.verify_chain(session) if may_verify(session, who) else None,
        )


def _entry_id(cursor: str) -> int:
    value = decode_cursor(cursor, 1)[0]
    if not value.isdigit():
        raise BadRequest("malformed page cursor")
    return int(value)


def may_verify(session: Session, who: SignedIn) -> bool:
    """Top-level auditors: they see the chain's verification (it spans every group) and
    the entries of no group (sign-ins, admin and key changes)."""
    top = session.execute(select(Group.id).where(Group.parent_id.is_(None))).scalars()
    return any(may(session, who, P.AUDIT_READ, g) for g in top)


def _as_dict(row: AuditEntry) -> dict[str, Any]:
    return {
        "id": row.id,
        "ts": row.ts.isoformat(),
        "actor": row.actor,
        "group_id": row.group_id,
        "action": row.action,
        "outcome": row.outcome,
        "detail": row.detail,
        "hash": row.hash,
    }


def _export(rows: list[AuditEntry], format: str) -> Response:
    items = [_as_dict(r) for r in rows]
    headers = {**SECURITY_HEADERS, "content-disposition": f'attachment; filename="audit.{format}"'}
    if format == "json":
        return Response(json.dumps(items, indent=1), media_type="application/json", headers=headers)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(items[0]) if items else ["id"])
    writer.writeheader()
    for item in items:
        writer.writerow({**item, "detail": json.dumps(item["detail"], sort_keys=True)})
    return Response(buffer.getvalue(), media_type="text/csv", headers=headers)


@router.get("/admins")
def admins_page(request: Request) -> Response:
    with ui_tx(request) as (session, who):
        return render("admins.html", who, admins=_manageable(session, who), new_key=None)


def _manageable(session: Session, who: SignedIn) -> list[dict[str, Any]]:
    """Admins ``who`` may manage (``admins.manageable``), with roles and keys."""
    return [
        {
            "admin": admin,
            "roles": [f"{b.role} @ {b.group_id}" for b in bindings],
            "api_keys": admins.api_keys_of(session, admin),
        }
        for admin, bindings in admins.manageable(session, who.admin)
    ]


@router.post("/admins/{admin_id}/api-keys")
def new_api_key(request: Request, admin_id: str, form: FormBody) -> Response:
    """A new API key, shown once on the page this answers (never stored in clear)."""
    with ui_tx(request, form) as (session, who):
        target = admins.get_admin_for(session, who.admin, admin_id)
        key = admins.issue_api_key(session, target, form.get("label", "ui")[:128])
        audit.append(
            session,
            request.state.actor,
            "apikey.create",
            admin=target.username,
            api_key_id=key.id,
            via="ui",
        )
        return render(
            "admins.html",
            who,
            admins=_manageable(session, who),
            new_key={"admin": target.username, "token": key.token},
        )
