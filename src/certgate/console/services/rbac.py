"""Roles, permissions and the group-subtree scope check.

A role binding grants a role's permissions on a group and all its descendants. Every API
handler asks ``require(...)`` for the group the object belongs to, so an admin of group A
can never see or change an object of group B (a sibling or an ancestor).
"""

from __future__ import annotations

from enum import Enum

from sqlalchemy import select
from sqlalchemy.orm import Session

from certgate.console.store.models import Admin, Group, RoleBinding
from certgate.errors import BadRequest, NotFound, PermissionDenied

MAX_GROUP_DEPTH = 32


class Permission(Enum):
    GROUPS_READ = "groups:read"
    GROUPS_WRITE = "groups:write"
    ADMINS_READ = "admins:read"
    ADMINS_WRITE = "admins:write"
    DEVICES_READ = "devices:read"
    DEVICES_WRITE = "devices:write"
    CERTS_READ = "certs:read"
    CERTS_REVOKE = "certs:revoke"
    ENROLLMENT_WRITE = "enrollment:write"
    RULES_WRITE = "rules:write"
    TUNNEL_SETUP = "tunnel:setup"
    TUNNEL_READ = "tunnel:read"
    AUDIT_READ = "audit:read"
    ACCESS_SIGNIN = "access:signin"


P = Permission
_READ = frozenset(
    {P.GROUPS_READ, P.ADMINS_READ, P.DEVICES_READ, P.CERTS_READ, P.TUNNEL_READ, P.AUDIT_READ}
)
ROLES: dict[str, frozenset[Permission]] = {
    "superadmin": frozenset(Permission),
    "tunnel-setup": frozenset({P.TUNNEL_SETUP, P.TUNNEL_READ, P.GROUPS_READ}),
    "device-admin": frozenset(
        {
            P.DEVICES_READ,
            P.DEVICES_WRITE,
            P.CERTS_READ,
            P.CERTS_REVOKE,
            P.ENROLLMENT_WRITE,
            P.RULES_WRITE,
            P.GROUPS_READ,
        }
    ),
    "read-only": _READ,
    # Access (certgate.access): reads devices, keeps sign-in transactions for its devices.
    "access": frozenset({P.DEVICES_READ, P.GROUPS_READ, P.ACCESS_SIGNIN}),
}


RULE_SETTINGS = frozenset({"device_rules", "server_rules"})


def settings_permission(keys: set[str]) -> Permission:
    """Changing only traffic rules needs rules:write; any other setting groups:write."""
    return Permission.RULES_WRITE if keys <= RULE_SETTINGS else Permission.GROUPS_WRITE


def ancestors(session: Session, group_id: str) -> list[str]:
    """``group_id`` then its parents up to the top. Raises NotFound for an unknown group."""
    chain: list[str] = []
    current: str | None = group_id
    while current is not None:
        if len(chain) >= MAX_GROUP_DEPTH:
            raise PermissionDenied("group hierarchy too deep")
        group = session.get(Group, current)
        if group is None:
            raise NotFound(f"group {group_id!r} not found")
        chain.append(group.id)
        current = group.parent_id
    return chain


def permissions_on(session: Session, admin: Admin, group_id: str) -> frozenset[Permission]:
    scope = set(ancestors(session, group_id))
    bindings = session.execute(
        select(RoleBinding).where(RoleBinding.admin_id == admin.id)
    ).scalars()
    granted: set[Permission] = set()
    for binding in bindings:
        if binding.group_id in scope:
            granted |= ROLES.get(binding.role, frozenset())
    return frozenset(granted)


def require(session: Session, admin: Admin, permission: Permission, group_id: str) -> None:
    """Raise unless ``admin`` holds ``permission`` on ``group_id``.

    Without any read permission on the group the answer is NotFound, so the existence of
    another tenant's group or object is not disclosed.
    """
    granted = permissions_on(session, admin, group_id)
    if permission in granted:
        return
    if not granted & _READ and permission not in granted:
        raise NotFound(f"group {group_id!r} not found")
    raise PermissionDenied(f"role lacks {permission.value} on group {group_id!r}")


def require_somewhere(session: Session, admin: Admin, permission: Permission) -> None:
    """Raise unless ``admin`` holds ``permission`` on some group (for objects that belong to
    no group yet, such as a sign-in before the device is known)."""
    bindings = session.execute(
        select(RoleBinding).where(RoleBinding.admin_id == admin.id)
    ).scalars()
    if not any(permission in ROLES.get(b.role, frozenset()) for b in bindings):
        raise PermissionDenied(f"role lacks {permission.value} on every group")


def visible_groups(session: Session, admin: Admin) -> list[Group]:
    """Groups on which ``admin`` holds any permission (their bindings' subtrees)."""
    roots = {
        b.group_id
        for b in session.execute(
            select(RoleBinding).where(RoleBinding.admin_id == admin.id)
        ).scalars()
    }
    groups = session.execute(select(Group).order_by(Group.id)).scalars().all()
    return [g for g in groups if roots & set(ancestors(session, g.id))]


def require_global(
    session: Session, admin: Admin, what: str = "creating a top-level group"
) -> None:
    """Top-level groups may be created (and instance-wide changes made, ``what``) only by
    a superadmin bound at a top-level group."""
    for binding in session.execute(
        select(RoleBinding).where(
            RoleBinding.admin_id == admin.id, RoleBinding.role == "superadmin"
        )
    ).scalars():
        group = session.get(Group, binding.group_id)
        if group is not None and group.parent_id is None:
            return
    raise PermissionDenied(f"{what} needs a top-level superadmin")


def require_can_grant(session: Session, admin: Admin, role: str, group_id: str) -> None:
    """No escalation: an admin grants only a role whose permissions it holds there."""
    wanted = ROLES.get(role)
    if wanted is None:
        raise BadRequest(f"unknown role {role!r}; one of {sorted(ROLES)}")
    missing = wanted - permissions_on(session, admin, group_id)
    if missing:
        names = ", ".join(sorted(p.value for p in missing))
        raise PermissionDenied(f"cannot grant {role!r}: you lack {names} on {group_id!r}")


def require_over_admin(session: Session, actor: Admin, target: Admin) -> None:
    """``actor`` manages ``target`` when it is itself, or holds admins:write on every group
    ``target`` is bound to."""
    if actor.id == target.id:
        return
    bindings = (
        session.execute(select(RoleBinding).where(RoleBinding.admin_id == target.id))
        .scalars()
        .all()
    )
    for binding in bindings:
        require(session, actor, Permission.ADMINS_WRITE, binding.group_id)
    if not bindings:
        raise NotFound("admin not found")
