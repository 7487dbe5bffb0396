"""SCEP enrollment (RFC 8894): the RA identity, challenge passwords, and what a
PKIOperation may be issued.

Provisioners are the existing ones. A challenge password is a one-time token, single
use, expiring and stored hashed: per profile, a group's enrollment token (``cge_...``,
``devices.create_enrollment_token``) or a SCEP profile challenge (``cgp_...``,
``create_profile_challenge``) enrolls a new device of that group; per device, a SCEP
challenge (``cgs_...``, ``create_device_challenge``) issues for that device. A RenewalReq
is signed with the certificate it renews.

The challenge, never the CSR, decides the profile (the same Device Root profiles the
agent gets): without an application it is the Per-App Tunnel delivery
(``devices.deliver_profile``, the device certificate); a challenge made for an
application's bundle id issues that app's Proxy-mode app+device certificate
(``devices.deliver_app_cert``). A renewal keeps the kind and app of the certificate that
signs it. Either way the identity URI is the enrollment's, the certificate enters the feed
and supersedes the previous one of its kind. A group answers SCEP once its settings say
``"enrollment": {"scep": true}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import AttributeOID
from sqlalchemy import select
from sqlalchemy.orm import Session

from certgate.console.services import ca, compliance, devices
from certgate.console.services.groups import get_group, protocol_enabled
from certgate.console.services.secrets import IssuedSecret, new_secret
from certgate.console.store.models import Certificate, Device, OneTimeToken, ScepTransaction
from certgate.errors import AuthError, BadRequest, Conflict, NotFound, PermissionDenied
from certgate.pki import identity
from certgate.pki.authority import Names, parse_csr
from certgate.pki.keys import KeyAlgorithm, generate_key
from certgate.pki.profiles import SCEP_RA
from certgate.pki.thumbprint import thumbprint
from certgate.protocol.scep import MessageType, PKIRequest

RA_KEY = "scep-ra"
DEVICE_CHALLENGE_PREFIX = "cgs"
PROFILE_CHALLENGE_PREFIX = "cgp"
CHALLENGE_PURPOSE = "scep"
PROFILE_CHALLENGE_PURPOSE = "scep-profile"
SCEP_PLATFORM = "linux"  # SCEP clients do not say; as for EST


@dataclass(frozen=True, slots=True)
class Issued:
    device: Device
    cert: x509.Certificate
    bundle_id: str | None  # the app of a Proxy-mode certificate; None for a device cert


def ra_identity(
    session: Session, pki: ca.InstancePKI
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """The RA certificate and key, issued by the Device Root on first use and again when
    under 30 days remain. RSA whatever the instance's CAs use: SCEP clients encrypt to it
    with RSA key transport (§3.1)."""
    row = (
        session.execute(
            select(Certificate)
            .where(Certificate.kind == "scep-ra", Certificate.revoked_at.is_(None))
            .order_by(Certificate.issued_at.desc())
        )
        .scalars()
        .first()
    )
    if row is not None and row.not_after - ca.now() > timedelta(days=30):
        key = pki.unseal(session, RA_KEY)
        assert isinstance(key, rsa.RSAPrivateKey)  # sealed by this function only
        return x509.load_pem_x509_certificate(row.cert_pem.encode()), key
    if row is not None:
        ca.revoke(session, row.serial, "superseded")
    key = generate_key(KeyAlgorithm.RSA_2048)
    assert isinstance(key, rsa.RSAPrivateKey)
    ca.seal_key(session, pki.master, RA_KEY, key)
    cert, _ = pki.issue(
        session, ca.DEVICE_ROOT, SCEP_RA, Names("certgate SCEP RA"), key.public_key(),
        ca.Record(kind="scep-ra"),
    )  # fmt: skip
    return cert, key


def ca_certificates(pki: ca.InstancePKI, ra: x509.Certificate) -> list[x509.Certificate]:
    """GetCACert's answer (§4.2.1.2): the RA first, then the CAs it chains to."""
    return [ra, pki.certs[ca.DEVICE_ROOT], pki.certs[ca.ROOT]]


def create_device_challenge(
    session: Session,
    device: Device,
    created_by: str,
    ttl: timedelta,
    bundle_id: str | None = None,
) -> IssuedSecret:
    """A single-use, expiring challenge password that issues for this device over SCEP:
    its device certificate, or with ``bundle_id`` that app's Proxy-mode certificate."""
    devices.require_active(device)
    return _challenge(
        session, DEVICE_CHALLENGE_PREFIX, CHALLENGE_PURPOSE, device.group_id, device.uid,
        created_by, ttl, bundle_id,
    )  # fmt: skip


def create_profile_challenge(
    session: Session,
    group_id: str,
    owner: str,
    created_by: str,
    ttl: timedelta,
    bundle_id: str | None = None,
) -> IssuedSecret:
    """A single-use, expiring challenge password that enrolls a new device of ``owner`` (an
    enrollment user of the group) over SCEP only: the agent's and EST's enrollment take
    ``cge_`` tokens, not this one."""
    devices.require_enrollment_user(session, group_id, owner)
    return _challenge(
        session, PROFILE_CHALLENGE_PREFIX, PROFILE_CHALLENGE_PURPOSE, group_id, owner,
        created_by, ttl, bundle_id,
    )  # fmt: skip


def _challenge(
    session: Session,
    prefix: str,
    purpose: str,
    group_id: str,
    owner: str,
    created_by: str,
    ttl: timedelta,
    bundle_id: str | None,
) -> IssuedSecret:
    if bundle_id is not None and not identity.BUNDLE_ID_RE.fullmatch(bundle_id):
        raise BadRequest(f"invalid application bundle id {bundle_id!r}")
    issued = new_secret(prefix)
    session.add(
        OneTimeToken(
            id=issued.id,
            purpose=purpose,
            group_id=group_id,
            secret_hash=issued.secret_hash,
            owner=owner,
            created_by=created_by,
            created_at=ca.now(),
            expires_at=ca.now() + ttl,
            used_at=None,
            bundle_id=bundle_id,
        )
    )
    return issued


def issue(session: Session, pki: ca.InstancePKI, request: PKIRequest) -> Issued:
    """The certificate a PKCSReq, RenewalReq or GetCertInitial earns; raises a certgate
    error with the reason otherwise (the caller answers with a CertRep FAILURE)."""
    signer_tp = thumbprint(request.signer)
    if request.message_type is MessageType.CERT_POLL:
        return _poll(session, request.transaction_id, signer_tp)
    if session.get(ScepTransaction, request.transaction_id) is not None:
        raise Conflict(f"transaction id {request.transaction_id!r} was already used")
    csr_pem = _csr_pem(request.content)
    if request.message_type is MessageType.RENEWAL_REQ:
        device, bundle_id = _renewing(session, pki, request.signer)
    else:
        device, bundle_id = _device_for_challenge(session, csr_pem)
    if not protocol_enabled(get_group(session, device.group_id), "scep"):
        raise PermissionDenied(f"SCEP is not enabled for group {device.group_id!r}")
    if bundle_id is None:
        cert_pem = str(devices.deliver_profile(session, pki, device, csr_pem)["certificate"])
    else:
        cert_pem = devices.deliver_app_cert(session, pki, device, bundle_id, csr_pem).cert_pem
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    record(session, request.transaction_id, signer_tp, thumbprint(cert))
    return Issued(device, cert, bundle_id)


def record(session: Session, transaction_id: str, signer_tp: str, cert_tp: str | None) -> None:
    """Remember a transaction id (refused or not) so that it cannot be replayed."""
    if session.get(ScepTransaction, transaction_id) is not None:
        return
    serial = None
    if cert_tp is not None:
        serial = session.execute(
            select(Certificate.serial).where(Certificate.thumbprint == cert_tp)
        ).scalar_one()
    session.add(
        ScepTransaction(
            transaction_id=transaction_id,
            signer_thumbprint=signer_tp,
            cert_serial=serial,
            created_at=ca.now(),
        )
    )


def _csr_pem(content: bytes) -> bytes:
    """The envelope's CSR, checked by the authority's rules before any token is used."""
    try:
        csr = x509.load_der_x509_csr(content)
    except ValueError as exc:
        raise BadRequest(f"the envelope does not hold a DER PKCS#10 request: {exc}") from exc
    pem = csr.public_bytes(Encoding.PEM)
    parse_csr(pem)  # InvalidCSR: CA:TRUE, key type or size, signature
    return pem


def _renewing(
    session: Session, pki: ca.InstancePKI, signer: x509.Certificate
) -> tuple[Device, str | None]:
    """RenewalReq (§3.3.1.2): the current certificate that signs it decides the device and
    the profile (a device certificate renews as one, an app certificate for its app)."""
    kinds = (identity.IdentityKind.DEVICE, identity.IdentityKind.APP)
    device, row = compliance.client_by_cert(session, pki, signer.public_bytes(Encoding.DER), kinds)
    return device, row.bundle_id


def _device_for_challenge(session: Session, csr_pem: bytes) -> tuple[Device, str | None]:
    """The device a PKCSReq's challenge password issues for, and the app it names."""
    csr = x509.load_pem_x509_csr(csr_pem)
    try:
        value = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD).value
    except x509.AttributeNotFound as exc:
        raise AuthError("the CSR carries no challenge password") from exc
    challenge = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    try:
        return _redeem(session, challenge)
    except (AuthError, BadRequest) as exc:
        raise AuthError(f"wrong challenge password: {exc}") from exc


def _redeem(session: Session, challenge: str) -> tuple[Device, str | None]:
    if challenge.startswith(f"{DEVICE_CHALLENGE_PREFIX}_"):
        row = devices.consume_token(session, challenge, DEVICE_CHALLENGE_PREFIX, CHALLENGE_PURPOSE)
        return devices.get_device(session, row.owner or ""), row.bundle_id
    if challenge.startswith(f"{PROFILE_CHALLENGE_PREFIX}_"):
        row = devices.consume_token(
            session, challenge, PROFILE_CHALLENGE_PREFIX, PROFILE_CHALLENGE_PURPOSE
        )
        enrolled = devices.new_device(session, row.group_id, row.owner or "", SCEP_PLATFORM, "scep")
        return enrolled.device, row.bundle_id
    enrolled = devices.enroll(
        session, token=challenge, username=None, password=None, platform=SCEP_PLATFORM,
        name="scep",
    )  # fmt: skip
    return enrolled.device, None


def _poll(session: Session, transaction_id: str, signer_tp: str) -> Issued:
    """GetCertInitial (§3.3.3): requests are never left pending here, so this answers
    with the certificate a finished transaction of the same requester got."""
    row = session.get(ScepTransaction, transaction_id)
    if row is None or row.signer_thumbprint != signer_tp or row.cert_serial is None:
        raise NotFound(f"no issued certificate for transaction {transaction_id!r}")
    cert_row = session.get(Certificate, row.cert_serial)
    assert cert_row is not None and cert_row.device_uid is not None  # FK-enforced
    cert = x509.load_pem_x509_certificate(cert_row.cert_pem.encode())
    return Issued(devices.get_device(session, cert_row.device_uid), cert, cert_row.bundle_id)
