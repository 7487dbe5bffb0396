"""Whether a tunnel admits a client certificate: a pure function with a reason.

Modelled on ghostunnel's ``auth/`` package (STYLE.md habit 5): ``admit`` takes the
identity of an already chain-verified leaf, its device table entry, the tunnel's mode and
the request, and returns a ``Decision``. No I/O, no clock (``now`` is an argument), no
exceptions for a denial.

Deny by default. The checks run in this order and the first failure is the reason:

1. ``stale_table``         the shell could not refresh the table in time (it says so in
                           ``AdmissionRequest.table_fresh``); nothing new is admitted.
2. ``unknown_thumbprint``  the table has no entry for the certificate (spec: the tunnel
                           "only authenticates ... a certificate it recognizes").
3. ``wrong_kind``          Proxy mode takes only app certificates whose entry names an
                           app; Per-App Tunnel mode only device certificates whose entry
                           has ``app_bundle_id`` null. Admin, tunnel and console
                           certificates are never device traffic.
4. ``wrong_group``         the certificate's group is not this tunnel's group.
5. ``identity_mismatch``   the URI SAN's device uid or group differ from the entry's.
6. ``app_mismatch``        (Proxy) the SAN's bundle id differs from the entry's, or the
                           request names a different app than the certificate.
7. ``unenrolled``, ``wiped``            enrollment status is not ``enrolled``.
8. ``blocked``                          an administrator blocked the device.
9. ``noncompliant``, ``compliance_unknown``  compliance status is not ``compliant``.
10. ``expired``            the leaf's or the entry's ``not_after`` is not in the future.
11. ``invalid_app``        (Per-App) the app named in the request is missing or is not a
                           syntactically valid bundle id; otherwise it is only recorded.

Identity and binding checks (3-6) come before lifecycle checks (7-10) because they point
at misuse rather than at a device that merely fell out of policy, and the log should say
so. Expiry follows CONVENTIONS.md ("``not_after`` is in the future"): a certificate is
refused at ``now == not_after``, one second stricter than RFC 5280 section 4.1.2.5, which
makes notAfter inclusive.

HTTP status (RFC 9110): 200 for an admitted CONNECT (section 9.3.6), 403 for every policy
denial (section 15.5.4), 400 for a malformed app name (section 15.5.1) and 503 while the
table is stale (section 15.6.4: temporary, retry later). 407 is never used: a certificate
is not proxy authentication (section 15.5.8).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from cryptography import x509

from certgate.feed import ComplianceStatus, EnrollmentStatus, Entry
from certgate.pki.identity import BUNDLE_ID_RE, Identity, IdentityKind, identity_of
from certgate.pki.thumbprint import thumbprint

__all__ = [
    "AdmissionRequest",
    "Decision",
    "DenyReason",
    "Mode",
    "PeerIdentity",
    "admit",
    "peer_identity",
]


class Mode(Enum):
    PROXY = "proxy"
    PER_APP = "per_app"


class DenyReason(Enum):
    """Why a certificate was refused. Values are stable: logs and metrics use them."""

    STALE_TABLE = "stale_table"
    UNKNOWN_THUMBPRINT = "unknown_thumbprint"
    WRONG_KIND = "wrong_kind"
    WRONG_GROUP = "wrong_group"
    IDENTITY_MISMATCH = "identity_mismatch"
    APP_MISMATCH = "app_mismatch"
    UNENROLLED = "unenrolled"
    WIPED = "wiped"
    BLOCKED = "blocked"
    NONCOMPLIANT = "noncompliant"
    COMPLIANCE_UNKNOWN = "compliance_unknown"
    EXPIRED = "expired"
    INVALID_APP = "invalid_app"


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What admission needs from a chain-verified client certificate."""

    thumbprint: str
    identity: Identity
    not_after: float  # POSIX seconds


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """What the shell knows about the request besides the certificate.

    ``table_fresh``: the device table was refreshed within the allowed staleness.
    ``app_bundle_id``: the app the client names in its CONNECT request, if any (Per-App
    Tunnel mode requires it; Proxy mode, if given, must equal the certificate's app).
    """

    table_fresh: bool
    app_bundle_id: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome. ``detail`` is safe to log: identifiers only, never key material, and
    request-supplied text only after it has passed its syntax check."""

    admitted: bool
    reason: DenyReason | None
    detail: str
    http_status: int
    app_bundle_id: str | None = None  # the app the traffic is attributed to, if admitted


_STATUS_FOR_REASON = {DenyReason.STALE_TABLE: 503, DenyReason.INVALID_APP: 400}
_POLICY_DENIAL_STATUS = 403
_ADMITTED_STATUS = 200


def peer_identity(cert: x509.Certificate) -> PeerIdentity:
    """Extract the admission inputs from a leaf the TLS layer has already chain-verified.

    Raises ``ChainError`` when the certificate does not carry exactly one canonical
    certgate identity URI SAN; the shell refuses the connection.
    """
    return PeerIdentity(
        thumbprint=thumbprint(cert),
        identity=identity_of(cert),
        not_after=cert.not_valid_after_utc.timestamp(),
    )


@dataclass(frozen=True, slots=True)
class _Context:
    leaf: PeerIdentity
    entry: Entry
    mode: Mode
    request: AdmissionRequest
    now: float
    group_id: str


def admit(
    leaf: PeerIdentity,
    entry: Entry | None,
    mode: Mode,
    request: AdmissionRequest,
    now: float,
    group_id: str,
) -> Decision:
    """Decide whether ``leaf`` may open a tunnel; see the module docstring for the order."""
    if not request.table_fresh:
        return _deny(DenyReason.STALE_TABLE, "device table is stale; admitting nothing new")
    if entry is None or entry.thumbprint != leaf.thumbprint:
        return _deny(DenyReason.UNKNOWN_THUMBPRINT, f"no entry for {_short(leaf.thumbprint)}")
    context = _Context(leaf, entry, mode, request, now, group_id)
    for check in _CHECKS:
        denial = check(context)
        if denial is not None:
            return denial
    app = _attributed_app(context)
    return Decision(True, None, f"admitted ({mode.value}, app {app})", _ADMITTED_STATUS, app)


def _check_kind(c: _Context) -> Decision | None:
    wanted = IdentityKind.APP if c.mode is Mode.PROXY else IdentityKind.DEVICE
    kind = c.leaf.identity.kind
    entry_kind = IdentityKind.DEVICE if c.entry.app_bundle_id is None else IdentityKind.APP
    if kind is wanted and entry_kind is wanted:
        return None
    detail = (
        f"{c.mode.value} mode needs {wanted.value} certificates; "
        f"got a {kind.value} certificate with a {entry_kind.value} entry"
    )
    return _deny(DenyReason.WRONG_KIND, detail)


def _check_group(c: _Context) -> Decision | None:
    if c.leaf.identity.group_id != c.group_id:
        detail = f"certificate group {c.leaf.identity.group_id} is not tunnel group {c.group_id}"
        return _deny(DenyReason.WRONG_GROUP, detail)
    return None


def _check_identity(c: _Context) -> Decision | None:
    ident = c.leaf.identity
    if (ident.device_uid, ident.group_id) != (c.entry.device_uid, c.entry.group_id):
        detail = (
            f"certificate names device {ident.device_uid} in {ident.group_id}, "
            f"entry says {c.entry.device_uid} in {c.entry.group_id}"
        )
        return _deny(DenyReason.IDENTITY_MISMATCH, detail)
    return None


def _check_app_binding(c: _Context) -> Decision | None:
    if c.mode is not Mode.PROXY:
        return None
    cert_app = c.leaf.identity.bundle_id
    if cert_app != c.entry.app_bundle_id:
        detail = f"certificate app {cert_app} is not entry app {c.entry.app_bundle_id}"
        return _deny(DenyReason.APP_MISMATCH, detail)
    requested = c.request.app_bundle_id
    if requested is not None and requested != cert_app:
        return _deny(DenyReason.APP_MISMATCH, f"request names {_app(requested)}, not {cert_app}")
    return None


def _check_enrollment(c: _Context) -> Decision | None:
    status = c.entry.enrollment_status
    if status is EnrollmentStatus.ENROLLED:
        return None
    reason = DenyReason.WIPED if status is EnrollmentStatus.WIPED else DenyReason.UNENROLLED
    return _deny(reason, f"device {c.entry.device_uid} is {status.value}")


def _check_blocked(c: _Context) -> Decision | None:
    if c.entry.blocked:
        return _deny(DenyReason.BLOCKED, f"device {c.entry.device_uid} is blocked")
    return None


def _check_compliance(c: _Context) -> Decision | None:
    status = c.entry.compliance_status
    if status is ComplianceStatus.COMPLIANT:
        return None
    reason = (
        DenyReason.NONCOMPLIANT
        if status is ComplianceStatus.NONCOMPLIANT
        else DenyReason.COMPLIANCE_UNKNOWN
    )
    return _deny(reason, f"device {c.entry.device_uid} compliance is {status.value}")


def _check_expiry(c: _Context) -> Decision | None:
    for source, not_after in (("certificate", c.leaf.not_after), ("entry", c.entry.not_after)):
        if c.now >= not_after:
            return _deny(DenyReason.EXPIRED, f"{source} not_after {not_after:.0f} has passed")
    return None


def _check_requested_app(c: _Context) -> Decision | None:
    if c.mode is not Mode.PER_APP:
        return None
    requested = c.request.app_bundle_id
    if requested is None or not BUNDLE_ID_RE.fullmatch(requested):
        return _deny(DenyReason.INVALID_APP, f"request names {_app(requested)}")
    return None


_CHECKS: tuple[Callable[[_Context], Decision | None], ...] = (
    _check_kind,
    _check_group,
    _check_identity,
    _check_app_binding,
    _check_enrollment,
    _check_blocked,
    _check_compliance,
    _check_expiry,
    _check_requested_app,
)


def _attributed_app(c: _Context) -> str | None:
    if c.mode is Mode.PROXY:
        return c.leaf.identity.bundle_id
    return c.request.app_bundle_id


def _deny(reason: DenyReason, detail: str) -> Decision:
    status = _STATUS_FOR_REASON.get(reason, _POLICY_DENIAL_STATUS)
    return Decision(False, reason, f"{reason.value}: {detail}", status)


def _short(thumbprint_hex: str) -> str:
    return f"thumbprint {thumbprint_hex[:16]}..."


def _app(requested: str | None) -> str:
    """Request text is attacker-controlled: echo it only once it is a valid bundle id."""
    if requested is None:
        return "no app"
    if BUNDLE_ID_RE.fullmatch(requested):
        return f"app {requested}"
    return f"a malformed app id ({len(requested)} chars)"
