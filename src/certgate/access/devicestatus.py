"""Is this device enrolled and compliant? Asked of the console, cached briefly, fail closed.

Access authenticates to the console as an admin with the ``access`` role (API key AND
admin client certificate over mTLS, like every admin call; ``read-only`` serves too when
sign-ins are kept in memory) and reads:

* ``GET /api/v1/devices/{uid}``: enrollment, compliance, blocked, owner, platform, group;
* ``GET /pki/crl/<label>.crl``: the signed CRL of the Device Root that issued the
  certificate (one per trusted Device Root, ``certgate.access.trust``), for superseded,
  revoked and unenrolled certificates (the device record alone cannot tell which of a
  device's certificates is current).

Why the admin API rather than following a group's signed feed like a tunnel: Access serves
the whole organisation, and one binding on the top group covers every group
below it, while a feed is per group and needs a tunnel identity per group. Access also
only needs the few devices that sign in, on demand, not a mirror of the fleet, and the
role grants no write permission beyond sign-in transactions (``certgate.access.signins``).

Answers are fresh for ``ttl_s``. When the console cannot be reached, an answer is used for
at most ``budget_s`` more; past that, or without any answer, Access fails closed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

import httpx
from cryptography import x509

from certgate.access.oidc import DeviceGrant
from certgate.access.trust import DeviceRoot
from certgate.errors import CertgateError, PermissionDenied
from certgate.pki import identity
from certgate.pki.identity import Identity, IdentityKind
from certgate.pki.thumbprint import thumbprint

__all__ = [
    "ConsoleStatus",
    "ConsoleUnavailable",
    "DeviceDenied",
    "DeviceRecord",
    "TTLCache",
    "admit",
]

log = logging.getLogger("certgate.access.status")
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
Clock = Callable[[], float]
T = TypeVar("T")


class DeviceDenied(PermissionDenied):
    """The device may not sign in; the message says why (shown to the user and logged)."""

    def __init__(self, reason: str, device_uid: str | None = None) -> None:
        super().__init__(reason)
        self.device_uid = device_uid


class ConsoleUnavailable(CertgateError):
    """The console did not answer usefully and no recent enough answer is cached."""


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """The console's view of a device (``DeviceOut`` of the admin API)."""

    uid: str
    group_id: str
    platform: str
    owner: str
    enrollment_status: str
    compliance_status: str
    blocked: bool

    @classmethod
    def from_json(cls, data: object) -> DeviceRecord:
        if not isinstance(data, dict):
            raise ConsoleUnavailable("console device record is not a JSON object")
        try:
            return cls(
                uid=str(data["uid"]),
                group_id=str(data["group_id"]),
                platform=str(data["platform"]),
                owner=str(data["owner"]),
                enrollment_status=str(data["enrollment_status"]),
                compliance_status=str(data["compliance_status"]),
                blocked=data["blocked"] is True,
            )
        except KeyError as exc:
            raise ConsoleUnavailable(f"console device record lacks {exc}") from exc


def device_identity(cert: x509.Certificate) -> Identity:
    """The per-device identity in the certificate's URI SAN (docs/CONVENTIONS.md)."""
    ident = identity.identity_of(cert)
    if ident.kind is not IdentityKind.DEVICE:
        raise DeviceDenied(f"a device certificate is required, not a {ident.kind.value} one")
    return ident


def admit(
    cert: x509.Certificate, ident: Identity, record: DeviceRecord, revoked: bool, now: int
) -> DeviceGrant:
    """Admission, as pure as the tunnel's: every refusal raises DeviceDenied with a reason."""
    if record.uid != ident.device_uid:
        raise DeviceDenied("the console returned a different device")  # pragma: no cover
    if record.group_id != ident.group_id:
        raise DeviceDenied(
            f"certificate names group {ident.group_id!r} but the device is in {record.group_id!r}"
        )
    if record.enrollment_status != "enrolled":
        raise DeviceDenied(f"device is {record.enrollment_status}, not enrolled")
    if record.blocked:
        raise DeviceDenied("device is blocked")
    if record.compliance_status != "compliant":
        raise DeviceDenied(f"device is not compliant (status: {record.compliance_status})")
    if revoked:
        raise DeviceDenied("device certificate is revoked (superseded, revoked or unenrolled)")
    return DeviceGrant(
        device_uid=record.uid,
        group_id=record.group_id,
        platform=record.platform,
        owner=record.owner,
        compliance=record.compliance_status,
        cert_thumbprint=thumbprint(cert),
        auth_time=now,
    )


@dataclass
class _Entry(Generic[T]):
    value: T
    fetched_at: float


class TTLCache(Generic[T]):
    """Answers fresh for ``ttl_s``; on a failed refresh, reused for ``budget_s`` more."""

    def __init__(self, ttl_s: float, budget_s: float, clock: Clock = time.monotonic) -> None:
        self.ttl_s, self.budget_s, self._clock = ttl_s, budget_s, clock
        self._entries: dict[str, _Entry[T]] = {}

    async def get(self, key: str, fetch: Callable[[], Awaitable[T]]) -> T:
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and now - entry.fetched_at <= self.ttl_s:
            return entry.value
        try:
            value = await fetch()
        except ConsoleUnavailable as exc:
            if entry is not None and now - entry.fetched_at <= self.ttl_s + self.budget_s:
                age = now - entry.fetched_at
                log.warning("console unavailable (%s); using an answer %.0f s old", exc, age)
                return entry.value
            raise ConsoleUnavailable(f"{exc}; failing closed") from exc
        self._entries[key] = _Entry(value, now)
        if len(self._entries) > 10_000:  # bound memory: drop the oldest answers
            for old in sorted(self._entries, key=lambda k: self._entries[k].fetched_at)[:1000]:
                del self._entries[old]
        return value

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)


class ConsoleStatus:
    """Device records and the Device Roots' CRLs from the console, through TTL caches."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        ttl_s: float,
        budget_s: float,
        clock: Clock = time.monotonic,
    ) -> None:
        self._client = client
        self._devices: TTLCache[DeviceRecord | None] = TTLCache(ttl_s, budget_s, clock)
        self._crl: TTLCache[x509.CertificateRevocationList] = TTLCache(ttl_s, budget_s, clock)

    async def device(self, uid: str) -> DeviceRecord:
        record = await self._devices.get(uid, lambda: self._fetch_device(uid))
        if record is None:
            raise DeviceDenied(f"device {uid} is not known to the console")
        return record

    async def is_revoked(self, cert: x509.Certificate, issuer: DeviceRoot) -> bool:
        """Listed on the CRL of ``issuer``, the trusted Device Root that issued ``cert``."""
        key = thumbprint(issuer.cert)  # not the label: the install-time root has none
        crl = await self._crl.get(key, lambda: self._fetch_crl(issuer))
        return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None

    async def _get(self, path: str) -> httpx.Response:
        try:
            response = await self._client.get(path)
        except httpx.HTTPError as exc:
            raise ConsoleUnavailable(f"console unreachable: {type(exc).__name__}: {exc}") from exc
        if len(response.content) > MAX_RESPONSE_BYTES:
            raise ConsoleUnavailable(f"console answer to {path} is too large")
        return response

    async def _fetch_device(self, uid: str) -> DeviceRecord | None:
        response = await self._get(f"/api/v1/devices/{uid}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            # 401/403 mean Access's credentials were refused: an operator must act.
            log.error("console refused the device lookup: HTTP %s", response.status_code)
            raise ConsoleUnavailable(f"console answered HTTP {response.status_code}")
        try:
            record = DeviceRecord.from_json(response.json())
        except ValueError as exc:
            raise ConsoleUnavailable("console device record is not JSON") from exc
        if record.uid != uid:
            raise ConsoleUnavailable("console returned another device than asked for")
        return record

    async def _fetch_crl(self, issuer: DeviceRoot) -> x509.CertificateRevocationList:
        response = await self._get(issuer.crl_path)
        if response.status_code != 200:
            raise ConsoleUnavailable(f"console answered HTTP {response.status_code} for the CRL")
        return checked_crl(response.content, issuer.cert)


def checked_crl(der: bytes, device_root: x509.Certificate) -> x509.CertificateRevocationList:
    """RFC 5280 §6.3.3: signed by the Device Root, about it, and not past nextUpdate."""
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError as exc:
        raise ConsoleUnavailable("Device Root CRL does not parse") from exc
    if crl.issuer != device_root.subject or not crl.is_signature_valid(
        device_root.public_key()  # type: ignore[arg-type]
    ):
        raise ConsoleUnavailable("Device Root CRL is not signed by the Device Root")
    next_update = crl.next_update_utc
    if next_update is None or next_update < datetime.now(UTC):
        raise ConsoleUnavailable("Device Root CRL is stale (past nextUpdate)")
    return crl
