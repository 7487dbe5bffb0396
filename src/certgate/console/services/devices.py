"""Enrollment, device credentials, Proxy-mode app certs, Per-App Tunnel profiles, status.

Provisioners here decide *whether* a certificate may be issued (enrollment credentials,
one-time token, device credential); ``InstancePKI`` signs. Every state change publishes
feed entries in the same transaction, which is what makes tunnels enforce it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from certgate.console.services import ca, feed
from certgate.console.services.admins import USERNAME_RE
from certgate.console.services.groups import delivery_facts, get_group
from certgate.console.services.secrets import (
    IssuedSecret,
    hash_password,
    new_secret,
    password_matches,
    secret_matches,
    sha256_hex,
    split_secret,
)
from certgate.console.store.models import (
    Certificate,
    Device,
    EnrollmentUser,
    OneTimeToken,
    ProfileDelivery,
)
from certgate.errors import AuthError, BadRequest, Conflict, NotFound, PermissionDenied
from certgate.pki import identity
from certgate.pki.authority import Names
from certgate.pki.profiles import APP_CLIENT, DEVICE_CLIENT

ENROLL_TOKEN_PREFIX = "cge"
DEVICE_CREDENTIAL_PREFIX = "cgd"
PLATFORMS = ("android", "ios", "windows", "macos", "linux")
COMPLIANCE = ("compliant", "noncompliant", "unknown")


def create_enrollment_user(
    session: Session, group_id: str, username: str, password: str
) -> EnrollmentUser:
    get_group(session, group_id)
    if not USERNAME_RE.fullmatch(username):
        raise BadRequest(f"invalid enrollment username {username!r}")
    if session.get(EnrollmentUser, username) is not None:
        raise Conflict(f"enrollment user {username!r} exists")
    try:
        hashed = hash_password(password)
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    user = EnrollmentUser(
        username=username,
        group_id=group_id,
        password_hash=hashed,
        created_at=ca.now(),
        disabled=False,
    )
    session.add(user)
    return user


def create_enrollment_token(
    session: Session, group_id: str, owner: str, created_by: str, ttl: timedelta
) -> IssuedSecret:
    """A one-time enrollment token for ``owner`` (an enrollment user of the group)."""
    require_enrollment_user(session, group_id, owner)
    issued = new_secret(ENROLL_TOKEN_PREFIX)
    session.add(
        OneTimeToken(
            id=issued.id,
            purpose="enroll",
            group_id=group_id,
            secret_hash=issued.secret_hash,
            owner=owner,
            created_by=created_by,
            created_at=ca.now(),
            expires_at=ca.now() + ttl,
            used_at=None,
        )
    )
    return issued


def require_enrollment_user(session: Session, group_id: str, owner: str) -> None:
    """``owner`` is an enrollment user of the group (who a new device will belong to)."""
    user = session.get(EnrollmentUser, owner)
    if user is None or user.group_id != group_id:
        # The named user does not exist (in this group): a missing object, as for any id.
        raise NotFound(f"{owner!r} is not an enrollment user of group {group_id!r}")


def consume_token(session: Session, token: str, prefix: str, purpose: str) -> OneTimeToken:
    """Check and burn a one-time token (the row is locked so two uses cannot both win)."""
    token_id, secret = split_secret(token, prefix)
    row = session.execute(
        select(OneTimeToken).where(OneTimeToken.id == token_id).with_for_update()
    ).scalar_one_or_none()
    if row is None or row.purpose != purpose or not secret_matches(secret, row.secret_hash):
        raise AuthError(f"unknown {purpose} token")
    if row.used_at is not None:
        raise AuthError(f"{purpose} token already used")
    if row.expires_at <= ca.now():
        raise AuthError(f"{purpose} token expired")
    row.used_at = ca.now()
    return row


def check_enrollment_user(session: Session, username: str, password: str) -> EnrollmentUser:
    user = session.get(EnrollmentUser, username)
    # Hash even for unknown users so response time does not reveal which usernames exist.
    stored = user.password_hash if user else "scrypt$AAAAAAAAAAAAAAAAAAAAAA==$AAAA"
    if not password_matches(password, stored) or user is None or user.disabled:
        raise AuthError("wrong enrollment credentials")
    return user


@dataclass(frozen=True, slots=True)
class Enrollment:
    device: Device
    credential: IssuedSecret


def enroll(
    session: Session,
    *,
    token: str | None,
    username: str | None,
    password: str | None,
    platform: str,
    name: str,
) -> Enrollment:
    if platform not in PLATFORMS:
        raise BadRequest(f"unknown platform {platform!r}; one of {list(PLATFORMS)}")
    if token:
        row = consume_token(session, token, ENROLL_TOKEN_PREFIX, "enroll")
        group_id, owner = row.group_id, row.owner or ""
    elif username and password:
        user = check_enrollment_user(session, username, password)
        group_id, owner = user.group_id, user.username
    else:
        raise AuthError("enrollment needs a one-time token or enrollment user + password")
    return new_device(session, group_id, owner, platform, name)


def new_device(session: Session, group_id: str, owner: str, platform: str, name: str) -> Enrollment:
    """A device enrolled in the group, once a provisioner (``enroll``, a SCEP challenge)
    allowed it; its compliance starts as the group's ``initial_compliance``."""
    group = get_group(session, group_id)
    credential = new_secret(DEVICE_CREDENTIAL_PREFIX)
    device = Device(
        uid=secrets.token_hex(16),
        group_id=group_id,
        platform=platform,
        owner=owner,
        name=name[:128],
        enrollment_status="enrolled",
        compliance_status=group.settings.get("initial_compliance", "unknown"),
        blocked=False,
        credential_hash=credential.secret_hash,
        enrolled_at=ca.now(),
        updated_at=ca.now(),
        profile_version=0,
    )
    session.add(device)
    return Enrollment(device, credential)


_BY_CREDENTIAL = select(Device).where(Device.credential_hash == bindparam("credential_hash"))


def authenticate_device(session: Session, bearer: str | None) -> Device:
    if not bearer:
        raise AuthError("missing device credential")
    _, secret = split_secret(bearer, DEVICE_CREDENTIAL_PREFIX)
    device = session.execute(
        _BY_CREDENTIAL, {"credential_hash": sha256_hex(secret)}
    ).scalar_one_or_none()
    if device is None:
        raise AuthError("unknown device credential")
    return device


def require_active(device: Device) -> None:
    if device.enrollment_status != "enrolled":
        raise PermissionDenied(f"device is {device.enrollment_status}; enroll it again")
    if device.blocked:
        raise PermissionDenied("device is blocked")


def get_device(session: Session, uid: str) -> Device:
    device = session.get(Device, uid) if identity.DEVICE_UID_RE.fullmatch(uid) else None
    if device is None:
        raise unknown_device(uid)
    return device


def unknown_device(uid: str) -> NotFound:
    """The one answer for a device the caller may not know of: absent, or in a group it
    cannot read (a different answer would confirm the device and name its group)."""
    return NotFound(f"device {uid!r} not found")


# Issuance runs these per request, so they are built once and executed as Core statements
# on the session's connection (the unit of work cost more than signing).
_SUPERSEDE = (
    update(Certificate)
    .where(
        Certificate.device_uid == bindparam("b_device_uid"),
        Certificate.kind.in_(feed.CLIENT_KINDS),
        Certificate.revoked_at.is_(None),
        Certificate.bundle_id.is_not_distinct_from(bindparam("b_bundle_id")),
    )
    .values(revoked_at=bindparam("b_revoked_at"), revocation_reason="superseded")
    .returning(Certificate.thumbprint, Certificate.group_id)
)
_NEXT_PROFILE_VERSION = (
    update(Device)
    .where(Device.uid == bindparam("b_uid"))
    .values(profile_version=Device.profile_version + 1)
    .returning(Device.profile_version)
)
_INSERT_DELIVERY = insert(ProfileDelivery)


def _supersede(session: Session, device: Device, bundle_id: str | None) -> list[dict[str, Any]]:
    """Revoke the device's current cert of this kind (one UPDATE ... RETURNING); return the
    feed deletions. ORM copies of those rows in this session keep their old values."""
    if device in session.new:  # enrolled in this transaction: Core statements must see it
        session.flush()
    params = {"b_device_uid": device.uid, "b_bundle_id": bundle_id, "b_revoked_at": ca.now()}
    revoked = session.connection().execute(_SUPERSEDE, params).all()
    # Detached values shaped as the rows, for the feed's own entry builder.
    return [
        feed.delete_entry(Certificate(thumbprint=tp, device_uid=device.uid, group_id=group))
        for tp, group in revoked
    ]


def issue_app_cert(
    session: Session,
    pki: ca.InstancePKI,
    device: Device,
    bundle_id: str,
    username: str,
    password: str,
    csr_pem: bytes,
) -> tuple[str, list[str]]:
    """Proxy mode: the app's first authentication with the enrollment credentials earns a
    client cert for this app on this device. Returns (cert PEM, chain PEMs)."""
    _check_app(device, bundle_id)  # before the credentials: a bad request is told as such
    user = check_enrollment_user(session, username, password)
    if user.username != device.owner:
        raise AuthError("enrollment credentials are not those of this device's owner")
    row = deliver_app_cert(session, pki, device, bundle_id, csr_pem)
    return row.cert_pem, pki.chain_pem(ca.DEVICE_ROOT)


def deliver_app_cert(
    session: Session, pki: ca.InstancePKI, device: Device, bundle_id: str, csr_pem: bytes
) -> Certificate:
    """Proxy mode: the app+device certificate for ``bundle_id`` on this device, once a
    provisioner (the owner's credentials, a SCEP challenge for this app) allowed it. It
    supersedes the device's previous certificate for the same app."""
    _check_app(device, bundle_id)
    gone = _supersede(session, device, bundle_id)
    names = Names(bundle_id[:64], identity.app(device.uid, device.group_id, bundle_id))
    _, row = pki.issue_from_csr(
        session,
        ca.DEVICE_ROOT,
        APP_CLIENT,
        names,
        csr_pem,
        ca.Record("app", device.group_id, device.uid, bundle_id),
    )
    feed.emit(session, device.group_id, [*gone, feed.upsert_entry(row, device)])
    return row


def _check_app(device: Device, bundle_id: str) -> None:
    require_active(device)
    if not identity.BUNDLE_ID_RE.fullmatch(bundle_id):
        raise BadRequest(f"invalid application bundle id {bundle_id!r}")


def deliver_profile(
    session: Session, pki: ca.InstancePKI, device: Device, csr_pem: bytes
) -> dict[str, Any]:
    """Per-App Tunnel: delivering the profile generates the per-device client cert. A newer
    delivery revokes the previous cert, which tunnels then stop admitting."""
    require_active(device)
    gone = _supersede(session, device, None)
    policy_version, settings, tunnel_thumbprint = delivery_facts(session, device.group_id)
    names = Names(f"device {device.uid}"[:64], identity.device(device.uid, device.group_id))
    _, row = pki.issue_from_csr(
        session,
        ca.DEVICE_ROOT,
        DEVICE_CLIENT,
        names,
        csr_pem,
        ca.Record("device", device.group_id, device.uid),
    )
    version = _record_delivery(session, device, row, settings["device_rules"])
    feed.emit(session, device.group_id, [*gone, feed.upsert_entry(row, device)])
    return {
        "version": version,
        "policy_version": policy_version,
        "device_uid": device.uid,
        "group_id": device.group_id,
        "certificate": row.cert_pem,
        "thumbprint": row.thumbprint,
        "chain": pki.chain_pem(ca.DEVICE_ROOT),
        # Every Secure Channel Root trusted now (two during its rotation), then the Root.
        # During a Root rotation both Roots (the agent trusts either chain) and the cross
        # certificates.
        "tunnel_trust": [
            ca.pem(c) for c in (*pki.secure_channel_roots(), *pki.roots(), *pki.root_crosses())
        ],
        "tunnel_identity_thumbprint": tunnel_thumbprint,
        "tunnel": tunnel_endpoints(settings["tunnel"]),
        "rules": settings["device_rules"],
    }


def tunnel_endpoints(tunnel: dict[str, Any]) -> dict[str, Any]:
    """Where a device reaches its group's tunnel (profile and policy answers alike)."""
    return {
        "hosts": tunnel["hostnames"] + tunnel["ip_addresses"],
        "per_app_port": tunnel["per_app_port"],
        "proxy_port": tunnel["proxy_port"],
    }


def device_policy(session: Session, device: Device, after: int) -> dict[str, Any] | None:
    """The device's group policy (rules and tunnel endpoints) if its version is newer than
    ``after``, else None. A device that may not be served is refused, as for a profile."""
    require_active(device)
    group = get_group(session, device.group_id)
    if group.policy_version <= after:
        return None
    return {
        "version": group.policy_version,
        "group_id": group.id,
        "rules": group.settings["device_rules"],
        "tunnel": tunnel_endpoints(group.settings["tunnel"]),
    }


def _record_delivery(
    session: Session, device: Device, cert: Certificate, rules: dict[str, Any]
) -> int:
    """Bump the device's profile version and record the delivery; returns the version."""
    conn = session.connection()
    version: int = conn.execute(_NEXT_PROFILE_VERSION, {"b_uid": device.uid}).scalar_one()
    set_committed_value(device, "profile_version", version)  # the ORM copy stays true
    delivery = {
        "device_uid": device.uid,
        "version": version,
        "cert_serial": cert.serial,
        "rules": rules,
        "delivered_at": cert.issued_at,
    }
    conn.execute(_INSERT_DELIVERY, delivery)
    return version


def set_compliance(session: Session, device: Device, status: str) -> None:
    if status not in COMPLIANCE:
        raise BadRequest(f"compliance must be one of {list(COMPLIANCE)}")
    device.compliance_status, device.updated_at = status, ca.now()
    feed.emit_device(session, device)


def set_blocked(session: Session, device: Device, blocked: bool) -> None:
    device.blocked, device.updated_at = blocked, ca.now()
    feed.emit_device(session, device)


def unenroll(session: Session, device: Device, wipe: bool = False) -> None:
    """Unenroll (or wipe): the status is published, then every client cert is revoked."""
    device.enrollment_status = "wiped" if wipe else "unenrolled"
    device.updated_at = ca.now()
    entries = []
    for cert in feed.active_certs(session, device.uid):
        entries.append(feed.upsert_entry(cert, device))
        ca.revoke(session, cert.serial, "cessationOfOperation")
        entries.append(feed.delete_entry(cert))
    feed.emit(session, device.group_id, entries)


LIFECYCLE_ACTIONS = ("unenroll", "wipe", "block", "unblock")


def apply_action(session: Session, device: Device, action: str) -> None:
    """One of ``LIFECYCLE_ACTIONS`` on ``device``: the API's and the web console's path."""
    if action in ("unenroll", "wipe"):
        unenroll(session, device, wipe=action == "wipe")
    elif action in ("block", "unblock"):
        set_blocked(session, device, action == "block")
    else:
        raise NotFound(f"no device action {action!r}")


def revoke_client_cert(session: Session, cert: Certificate, reason: str) -> None:
    """Revoke a device or app certificate; tunnels drop it via the feed."""
    if cert.kind not in feed.CLIENT_KINDS or cert.group_id is None:
        raise NotFound(f"device certificate {cert.serial} not found")
    was_active = cert.revoked_at is None
    ca.revoke(session, cert.serial, reason)
    if was_active:
        feed.emit(session, cert.group_id, [feed.delete_entry(cert)])
