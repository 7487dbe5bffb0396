"""Who a certificate speaks for, carried in its single URI SAN (docs/CONVENTIONS.md).

Parsing is strict: an identity that does not round-trip exactly is rejected, so that two
different strings can never name the same principal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from cryptography import x509

from certgate.errors import ChainError

GROUP_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
DEVICE_UID_RE = re.compile(r"[0-9a-f]{32}")
BUNDLE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,254}")
ADMIN_ID_RE = re.compile(r"[0-9a-f]{32}")

_PREFIX = "urn:certgate:"


class IdentityKind(Enum):
    DEVICE = "device"
    APP = "app"
    ADMIN = "admin"
    TUNNEL = "tunnel"
    CONSOLE = "console"


@dataclass(frozen=True, slots=True)
class Identity:
    """A parsed identity. Fields not meaningful for ``kind`` are None."""

    kind: IdentityKind
    group_id: str | None = None
    device_uid: str | None = None
    bundle_id: str | None = None
    admin_id: str | None = None

    def __post_init__(self) -> None:
        _check(self)

    def uri(self) -> str:
        match self.kind:
            case IdentityKind.DEVICE:
                return f"{_PREFIX}device:{self.device_uid}:group:{self.group_id}"
            case IdentityKind.APP:
                base = f"{_PREFIX}device:{self.device_uid}:group:{self.group_id}"
                return f"{base}:app:{self.bundle_id}"
            case IdentityKind.ADMIN:
                return f"{_PREFIX}admin:{self.admin_id}"
            case IdentityKind.TUNNEL | IdentityKind.CONSOLE:
                return f"{_PREFIX}{self.kind.value}:group:{self.group_id}"
        raise AssertionError(self.kind)  # pragma: no cover - exhaustive match


def device(device_uid: str, group_id: str) -> Identity:
    return Identity(IdentityKind.DEVICE, group_id=group_id, device_uid=device_uid)


def app(device_uid: str, group_id: str, bundle_id: str) -> Identity:
    return Identity(IdentityKind.APP, group_id=group_id, device_uid=device_uid, bundle_id=bundle_id)


def admin(admin_id: str) -> Identity:
    return Identity(IdentityKind.ADMIN, admin_id=admin_id)


def tunnel(group_id: str) -> Identity:
    return Identity(IdentityKind.TUNNEL, group_id=group_id)


def console(group_id: str) -> Identity:
    return Identity(IdentityKind.CONSOLE, group_id=group_id)


def _need(value: str | None, pattern: re.Pattern[str], what: str) -> None:
    if value is None or not pattern.fullmatch(value):
        raise ChainError(f"invalid {what} in identity: {value!r}")


_FIELDS = {
    IdentityKind.DEVICE: {"group_id", "device_uid"},
    IdentityKind.APP: {"group_id", "device_uid", "bundle_id"},
    IdentityKind.ADMIN: {"admin_id"},
    IdentityKind.TUNNEL: {"group_id"},
    IdentityKind.CONSOLE: {"group_id"},
}


def _check(ident: Identity) -> None:
    # A field that does not belong to the kind would vanish from uri(): refuse it, so that
    # equal URIs always mean equal identities.
    for name in ("group_id", "device_uid", "bundle_id", "admin_id"):
        if name not in _FIELDS[ident.kind] and getattr(ident, name) is not None:
            raise ChainError(f"{ident.kind.value} identity cannot carry {name}")
    if ident.kind in (IdentityKind.DEVICE, IdentityKind.APP):
        _need(ident.device_uid, DEVICE_UID_RE, "device uid")
    if ident.kind is not IdentityKind.ADMIN:
        _need(ident.group_id, GROUP_ID_RE, "group id")
    if ident.kind is IdentityKind.APP:
        _need(ident.bundle_id, BUNDLE_ID_RE, "bundle id")
    if ident.kind is IdentityKind.ADMIN:
        _need(ident.admin_id, ADMIN_ID_RE, "admin id")


def parse_uri(uri: str) -> Identity:
    """Parse a ``urn:certgate:...`` URI; raise ChainError unless it is canonical."""
    if not uri.startswith(_PREFIX):
        raise ChainError(f"not a certgate identity URI: {uri!r}")
    parts = uri[len(_PREFIX) :].split(":")
    ident = _from_parts(parts, uri)
    if ident.uri() != uri:
        raise ChainError(f"non-canonical identity URI: {uri!r}")
    return ident


def _from_parts(parts: list[str], uri: str) -> Identity:
    match parts:
        case ["device", uid, "group", gid]:
            return device(uid, gid)
        case ["device", uid, "group", gid, "app", bundle]:
            return app(uid, gid, bundle)
        case ["admin", aid]:
            return admin(aid)
        case ["tunnel", "group", gid]:
            return tunnel(gid)
        case ["console", "group", gid]:
            return console(gid)
    raise ChainError(f"unrecognised identity URI: {uri!r}")


def identity_of(cert: x509.Certificate) -> Identity:
    """The identity in ``cert``'s URI SAN; exactly one certgate URI must be present."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise ChainError("certificate has no subjectAltName") from exc
    all_uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    uris = [u for u in all_uris if u.startswith(_PREFIX)]
    if len(uris) != 1:
        raise ChainError(f"expected exactly one certgate URI SAN, found {len(uris)}")
    return parse_uri(uris[0])
