"""The Per-App Tunnel profile: delivery, strict parsing, and renewal before expiry.

Profile delivery is what generates the per-device certificate (spec: "the certificate is
generated at the time of profile delivery"); the console revokes the previous one in the
same transaction. So a newer profile always replaces the device identity: the new key and
certificate overwrite the old ones on disk, and tunnels stop admitting the old cert as
soon as the feed reaches them.

Renewal: a certificate is due when less than ``fraction`` of its lifetime remains
(default 1/3). The device certificate renews by re-delivery of the profile; an app
certificate needs the enrollment credentials again, so the agent can only warn about it.

Policy: the rules and tunnel endpoints of the profile are those of a group policy version
(``policy_version``; 0 from a console that predates it). A newer policy
(``GET /api/v1/device/policy``) replaces them in the stored profile without a new
certificate (``apply_policy``).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from certgate.device.enroll import ConsoleAPI, DeviceUnenrolled, check_issued
from certgate.device.rules import DeviceRules
from certgate.device.state import CertifiedKey, StateDir
from certgate.errors import CertgateError, ConfigError
from certgate.pki import identity
from certgate.pki.csr import build_csr
from certgate.pki.keys import generate_key
from certgate.pki.thumbprint import thumbprint
from certgate.pki.verify import vouched_roots
from certgate.protocol.http_proxy import canonical_hostname

__all__ = [
    "DEFAULT_RENEW_FRACTION",
    "AppDue",
    "Delivery",
    "Maintenance",
    "Profile",
    "TunnelEndpoints",
    "apply_policy",
    "check_fraction",
    "fetch_profile",
    "load_profile",
    "maintain",
    "renewal_due",
]

log = logging.getLogger("certgate.device")
DEFAULT_RENEW_FRACTION = 1 / 3
_NOT_STORED = ("certificate", "chain")  # those live in device.sealed, with the key


@dataclass(frozen=True, slots=True)
class TunnelEndpoints:
    hosts: tuple[str, ...]
    per_app_port: int
    proxy_port: int

    def per_app(self) -> list[tuple[str, int]]:
        return [(host, self.per_app_port) for host in self.hosts]


@dataclass(frozen=True, slots=True)
class Profile:
    """A validated profile. ``tunnel_trust`` are the only CAs the tunnel is checked with."""

    version: int
    device_uid: str
    group_id: str
    tunnel: TunnelEndpoints
    tunnel_trust: tuple[x509.Certificate, ...]
    rules: DeviceRules
    thumbprint: str
    policy_version: int = 0  # the group policy the rules and tunnel endpoints are of

    @classmethod
    def from_dict(cls, data: Any) -> Profile:
        if not isinstance(data, dict):
            raise ConfigError("profile is not a JSON object")
        try:
            return cls(
                version=_int(data["version"], 1, 2**62),
                device_uid=_text(data["device_uid"], identity.DEVICE_UID_RE.fullmatch),
                group_id=_text(data["group_id"], identity.GROUP_ID_RE.fullmatch),
                tunnel=_tunnel(data["tunnel"]),
                tunnel_trust=_trust(data["tunnel_trust"]),
                rules=DeviceRules.from_dict(data["rules"]),
                thumbprint=_text(data["thumbprint"], _is_hex64),
                policy_version=_int(data.get("policy_version", 0), 0, 2**62),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid profile: {exc!r}") from exc


def _int(value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{value!r} is not an integer in {low}..{high}")
    return value


def _text(value: Any, valid: Any) -> str:
    if not isinstance(value, str) or not valid(value):
        raise ValueError(f"invalid value {value!r}")
    return value


def _is_hex64(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _tunnel(data: Any) -> TunnelEndpoints:
    hosts = data["hosts"]
    if not isinstance(hosts, list) or not hosts:
        raise ValueError("tunnel.hosts must be a non-empty list of names")
    return TunnelEndpoints(
        tuple(_host(h) for h in hosts),
        _int(data["per_app_port"], 1, 65535),
        _int(data["proxy_port"], 1, 65535),
    )


def _host(value: Any) -> str:
    """A hostname or IP address to connect to and to check the tunnel certificate for."""
    if not isinstance(value, str):
        raise ValueError(f"invalid tunnel host {value!r}")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return canonical_hostname(value)


def _trust(data: Any) -> tuple[x509.Certificate, ...]:
    if not isinstance(data, list) or not data:
        raise ValueError("tunnel_trust must be a non-empty list of PEM certificates")
    return tuple(x509.load_pem_x509_certificate(str(pem).encode()) for pem in data)


@dataclass(frozen=True, slots=True)
class Delivery:
    profile: Profile
    identity: CertifiedKey
    previous_thumbprint: str | None


def load_profile(state: StateDir) -> Profile | None:
    data = state.profile_data()
    return None if data is None else Profile.from_dict(data)


def fetch_profile(state: StateDir, api: ConsoleAPI) -> Delivery:
    """Ask for the profile with a CSR for a fresh key; check everything, then store it."""
    enrollment = state.enrollment()
    previous = load_profile(state)
    key = generate_key()
    csr = build_csr(key, f"device {enrollment.device_uid}").decode()
    answer = api.call("POST", "/api/v1/device/profile", {"csr": csr})
    expected = identity.device(enrollment.device_uid, enrollment.group_id)
    issued = check_issued(answer, key, expected, state.console_ca())
    stored = {k: v for k, v in answer.items() if k not in _NOT_STORED}
    profile = Profile.from_dict(stored)
    if (profile.device_uid, profile.group_id) != (expected.device_uid, expected.group_id):
        raise ConfigError("the profile is for another device")
    if profile.thumbprint != issued.thumbprint:
        raise ConfigError("the profile names a different certificate than it delivered")
    if previous is not None and profile.version <= previous.version:
        # Our own request over the pinned channel: take it (the console revoked the old
        # cert already), but say so, since versions should only grow.
        log.warning("profile version went from %d to %d", previous.version, profile.version)
    state.save_profile(issued, stored)
    _pin_vouched_roots(state, profile.tunnel_trust)
    return Delivery(profile, issued, previous.thumbprint if previous else None)


def _pin_vouched_roots(state: StateDir, trust: tuple[x509.Certificate, ...]) -> None:
    """A Root rotation: the profile lists the console's Roots and cross certificates. A
    new Root a pinned one vouches for (``pki.verify.vouched_roots``, the nodes' and
    Access's rule) is added to ``console-ca.pem``, so that the console stays verified once
    its chain ends at the new Root (finish). An old Root is kept (the device's own pin)."""
    pinned = state.console_ca()
    anchors = [c for c in pinned if _is_self_signed(c)]
    roots = [c for c in trust if _is_self_signed(c) and c not in anchors]
    crosses = [c for c in trust if c.issuer == c.subject and not _is_self_signed(c)]
    new = []
    for root in roots:
        try:
            vouched_roots([root], crosses, anchors)
        except CertgateError:
            continue  # a Root no pinned one vouches for is not pinned
        new.append(root)
    if new:
        state.add_console_roots(new)
        log.info("console Root %s pinned beside the enrolled one", ", ".join(map(thumbprint, new)))


def _is_self_signed(cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def apply_policy(state: StateDir, answer: Any) -> Profile:
    """Validate a group policy from the console and store its rules and tunnel endpoints
    in the profile; the device identity stays as it is. Raises ``ConfigError`` and stores
    nothing for an invalid policy, one of another group, or one not newer than ours."""
    stored = state.profile_data()
    if stored is None:
        raise ConfigError("no profile to apply a policy to: run `certgate device profile`")
    current = Profile.from_dict(stored)
    policy = _policy_fields(answer, current.group_id)
    if policy["policy_version"] <= current.policy_version:
        raise ConfigError(
            f"the console sent policy v{policy['policy_version']}; "
            f"this device has v{current.policy_version} already"
        )
    updated = {**stored, **policy}
    profile = Profile.from_dict(updated)
    state.save_profile_data(updated)
    return profile


def _policy_fields(answer: Any, group_id: str) -> dict[str, Any]:
    """The profile fields of a policy answer, each checked as ``Profile`` checks it."""
    try:
        if answer["group_id"] != group_id:
            raise ValueError(f"it is for group {answer['group_id']!r}, not {group_id!r}")
        DeviceRules.from_dict(answer["rules"])
        _tunnel(answer["tunnel"])
        version = _int(answer["version"], 1, 2**62)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"invalid policy: {exc!r}") from exc
    return {"rules": answer["rules"], "tunnel": answer["tunnel"], "policy_version": version}


def check_fraction(fraction: float) -> float:
    if not 0 < fraction < 1:
        raise ConfigError(f"renewal fraction must be between 0 and 1, got {fraction}")
    return fraction


def renewal_due(cert: x509.Certificate, fraction: float, now: datetime | None = None) -> bool:
    """True when less than ``fraction`` of the certificate's lifetime remains."""
    now = now or datetime.now(UTC)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < lifetime * check_fraction(fraction)


@dataclass(frozen=True, slots=True)
class AppDue:
    bundle_id: str
    not_after: datetime


@dataclass(frozen=True, slots=True)
class Maintenance:
    """What one maintenance pass found and did."""

    status: dict[str, Any]
    delivery: Delivery | None = None
    reason: str | None = None  # why the profile was fetched again
    apps_due: tuple[AppDue, ...] = field(default=())


def maintain(
    state: StateDir, api: ConsoleAPI, fraction: float, now: datetime | None = None
) -> Maintenance:
    """Check the device with the console; renew the device certificate if it is due or
    was superseded; list app certificates that need their app to authenticate again."""
    status = api.device_status()
    if status.get("enrollment_status") != "enrolled":
        raise DeviceUnenrolled(
            f"device is {status.get('enrollment_status')}; enroll it again",
        )
    reason = _renewal_reason(state, status, fraction, now)
    delivery = fetch_profile(state, api) if reason else None
    apps_due = []
    for bundle in state.apps():
        app = state.app_identity(bundle)
        if app is not None and renewal_due(app.cert, fraction, now):
            apps_due.append(AppDue(bundle, app.cert.not_valid_after_utc))
    return Maintenance(status, delivery, reason, tuple(apps_due))


def _renewal_reason(
    state: StateDir, status: dict[str, Any], fraction: float, now: datetime | None
) -> str | None:
    profile, current = load_profile(state), state.device_identity()
    if profile is None or current is None:
        return None  # never fetched: that is `certgate device profile`, not a renewal
    console_version = status.get("profile_version")
    if isinstance(console_version, int) and console_version > profile.version:
        return (
            f"the console delivered profile v{console_version}; this device has v{profile.version}"
        )
    if renewal_due(current.cert, fraction, now):
        expiry = current.cert.not_valid_after_utc.isoformat(timespec="seconds")
        return f"device certificate expires {expiry}"
    return None
