"""Admin accounts, their role bindings, API keys and client certificates.

An admin request is authenticated by BOTH an API key and, over mTLS, the admin's own
client certificate: the key must belong to the admin the certificate names.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session

from certgate.console.services import ca
from certgate.console.services.rbac import ROLES, ancestors, require_over_admin
from certgate.console.services.secrets import IssuedSecret, new_secret, secret_matches, split_secret
from certgate.console.store.models import Admin, ApiKey, Certificate, RoleBinding
from certgate.errors import AuthError, BadRequest, ChainError, Conflict, NotFound, PermissionDenied
from certgate.pki import identity
from certgate.pki.authority import Names
from certgate.pki.keys import PrivateKey, generate_key
from certgate.pki.profiles import ADMIN_CLIENT
from certgate.pki.thumbprint import thumbprint
from certgate.pki.verify import verify_client_chain

API_KEY_PREFIX = "cgk"
USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")


def create_admin(session: Session, username: str, role: str, group_id: str) -> Admin:
    if not USERNAME_RE.fullmatch(username):
        raise BadRequest(f"invalid admin username {username!r}")
    if session.execute(select(Admin).where(Admin.username == username)).first():
        raise Conflict(f"admin {username!r} exists")
    admin = Admin(id=secrets.token_hex(16), username=username, created_at=ca.now(), disabled=False)
    session.add(admin)
    session.flush()
    bind_role(session, admin, role, group_id)
    return admin


def bind_role(session: Session, admin: Admin, role: str, group_id: str) -> RoleBinding:
    if role not in ROLES:
        raise BadRequest(f"unknown role {role!r}; one of {sorted(ROLES)}")
    ancestors(session, group_id)  # raises NotFound for an unknown group
    binding = RoleBinding(admin_id=admin.id, role=role, group_id=group_id)
    session.add(binding)
    return binding


def issue_api_key(session: Session, admin: Admin, label: str = "") -> IssuedSecret:
    issued = new_secret(API_KEY_PREFIX)
    session.add(
        ApiKey(
            id=issued.id,
            admin_id=admin.id,
            secret_hash=issued.secret_hash,
            label=label[:128],
            created_at=ca.now(),
            revoked_at=None,
            last_used_at=None,
        )
    )
    return issued


def revoke_api_key(session: Session, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"API key {key_id} not found")
    if row.revoked_at is None:
        row.revoked_at = ca.now()
    return row


def issue_admin_cert(
    session: Session, pki: ca.InstancePKI, admin: Admin, key: PrivateKey | None = None
) -> tuple[x509.Certificate, PrivateKey]:
    """A client certificate for ``admin`` from the Admin CA; revokes the previous one."""
    key = key or generate_key()
    for old in _active_admin_certs(session, admin.id):
        ca.revoke(session, old.serial, "superseded")
    cert, _ = pki.issue(
        session,
        ca.ADMIN_CA,
        ADMIN_CLIENT,
        Names(f"admin {admin.username}"[:64], identity.admin(admin.id)),
        key.public_key(),
        ca.Record(kind="admin", admin_id=admin.id),
    )
    return cert, key


def _active_admin_certs(session: Session, admin_id: str) -> list[Certificate]:
    return list(
        session.execute(
            select(Certificate).where(
                Certificate.admin_id == admin_id,
                Certificate.kind == "admin",
                Certificate.revoked_at.is_(None),
            )
        ).scalars()
    )


@dataclass(frozen=True, slots=True)
class AdminPrincipal:
    admin: Admin
    api_key_id: str
    cert_thumbprint: str


def authenticate(
    session: Session,
    pki: ca.InstancePKI,
    api_key: str | None,
    peer_der: bytes | None,
    at: datetime,
) -> AdminPrincipal:
    """Both factors or nothing: a valid, unrevoked API key and the same admin's valid cert."""
    if not api_key:
        raise AuthError("missing API key (send it as 'Authorization: Bearer <key>')")
    key_row = _api_key_row(session, api_key)
    if peer_der is None:
        raise AuthError("missing admin client certificate (mTLS) alongside the API key")
    cert = _admin_cert(session, pki, peer_der, at)
    ident = identity.identity_of(cert)
    admin = session.get(Admin, key_row.admin_id)
    if admin is None or admin.disabled:
        raise AuthError("admin account disabled")
    if ident.admin_id != admin.id:
        raise AuthError("API key and client certificate belong to different admins")
    key_row.last_used_at = at
    return AdminPrincipal(admin, key_row.id, thumbprint(cert))


def _api_key_row(session: Session, api_key: str) -> ApiKey:
    key_id, secret = split_secret(api_key, API_KEY_PREFIX)
    row = session.get(ApiKey, key_id)
    if row is None or not secret_matches(secret, row.secret_hash):
        raise AuthError("unknown or wrong API key")
    if row.revoked_at is not None:
        raise AuthError("API key revoked")
    return row


def _admin_cert(
    session: Session, pki: ca.InstancePKI, der: bytes, at: datetime
) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise AuthError("client certificate does not parse") from exc
    try:
        verify_client_chain(
            cert,
            [pki.certs[ca.ADMIN_CA]],
            [pki.certs[ca.ROOT]],
            expected_issuer=pki.certs[ca.ADMIN_CA],
            at=at,
        )
    except ChainError as exc:
        raise AuthError(f"admin certificate rejected: {exc}") from exc
    row = session.execute(
        select(Certificate).where(Certificate.thumbprint == thumbprint(cert))
    ).scalar_one_or_none()
    if row is None or row.kind != "admin":
        raise AuthError("client certificate is not a registered admin certificate")
    if row.revoked_at is not None:
        raise AuthError(f"admin certificate revoked ({row.revocation_reason})")
    return cert


def get_admin_for(session: Session, actor: Admin, admin_id: str) -> Admin:
    target = session.get(Admin, admin_id)
    if target is None:
        raise NotFound("admin not found")
    require_over_admin(session, actor, target)
    return target


def api_key_for(session: Session, actor: Admin, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"API key {key_id} not found")
    get_admin_for(session, actor, row.admin_id)
    return row


def api_keys_of(session: Session, admin: Admin) -> list[ApiKey]:
    return list(
        session.execute(
            select(ApiKey).where(ApiKey.admin_id == admin.id).order_by(ApiKey.created_at)
        ).scalars()
    )


def by_username(session: Session, username: str) -> Admin:
    admin = session.execute(select(Admin).where(Admin.username == username)).scalar_one_or_none()
    if admin is None:
        raise NotFound(f"admin {username!r} not found")
    return admin


def manageable(
    session: Session, actor: Admin, username: str | None = None
) -> list[tuple[Admin, list[RoleBinding]]]:
    """The admins ``actor`` may manage (``rbac.require_over_admin``: itself, or those whose
    every binding is in a group where it holds admins:write), by username, with their
    bindings; ``username``: that one only."""
    query = select(Admin).order_by(Admin.username)
    if username is not None:
        query = query.where(Admin.username == username)
    out = []
    for admin in session.execute(query).scalars():
        try:
            require_over_admin(session, actor, admin)
        except (PermissionDenied, NotFound):
            continue
        bindings = session.execute(
            select(RoleBinding).where(RoleBinding.admin_id == admin.id)
        ).scalars()
        out.append((admin, list(bindings)))
    return out
