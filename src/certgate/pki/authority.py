"""The one place that signs certificates and CRLs (smallstep's "many authorize, one signs").

Callers decide *whether* to issue (provisioners, API handlers); profiles decide *what*;
this module validates the inputs, builds the certificate from the profile, and signs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certgate.errors import InvalidCSR, PKIError
from certgate.pki.identity import Identity
from certgate.pki.keys import PrivateKey, PublicKey, check_public_key
from certgate.pki.profiles import ROOT_CA, Profile

MAX_CSR_BYTES = 16 * 1024
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Issuer:
    """A CA able to sign: its certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey


@dataclass(frozen=True, slots=True)
class Names:
    """What a certificate is for: its subject CN and its subjectAltNames."""

    common_name: str
    identity: Identity | None = None
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    organization: str = "certgate"
    extra_uris: tuple[str, ...] = field(default=())

    def subject(self) -> x509.Name:
        if not 0 < len(self.common_name) <= 64:
            raise PKIError("common name must be 1-64 characters")
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.organization),
                x509.NameAttribute(NameOID.COMMON_NAME, self.common_name),
            ]
        )

    def san(self) -> x509.SubjectAlternativeName | None:
        general: list[x509.GeneralName] = [x509.DNSName(d) for d in self.dns_names]
        general += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in self.ip_addresses]
        if self.identity is not None:
            general.append(x509.UniformResourceIdentifier(self.identity.uri()))
        general += [x509.UniformResourceIdentifier(u) for u in self.extra_uris]
        return x509.SubjectAlternativeName(general) if general else None


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _not_after(profile: Profile, now: datetime, issuer: Issuer | None) -> datetime:
    not_after = now + profile.validity
    # A child never outlives its issuer (RFC 5280 §6.1.3 would reject it at that point).
    if issuer is not None and issuer.cert.not_valid_after_utc < not_after:
        return issuer.cert.not_valid_after_utc
    return not_after


def _builder(
    profile: Profile, names: Names, public_key: PublicKey, issuer: Issuer | None, now: datetime
) -> x509.CertificateBuilder:
    subject = names.subject()
    issuer_name = issuer.cert.subject if issuer else subject
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())  # 159 random bits (RFC 5280 §4.1.2.2)
        .not_valid_before(now - profile.backdate)
        .not_valid_after(_not_after(profile, now, issuer))
        .add_extension(x509.BasicConstraints(profile.is_ca, profile.path_length), critical=True)
        .add_extension(profile.key_usage.extension(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if profile.extended_key_usage:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(profile.extended_key_usage)), critical=False
        )
    issuer_public = issuer.key.public_key() if issuer else public_key
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False
    )
    san = names.san()
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder


class Authority:
    """Signs certificates from profiles. Stateless apart from the clock."""

    def __init__(self, clock: Clock = utcnow) -> None:
        self._clock = clock

    def create_root(
        self, key: PrivateKey, names: Names, profile: Profile = ROOT_CA
    ) -> x509.Certificate:
        """A self-signed root CA."""
        if not profile.is_ca:
            raise PKIError("a root needs a CA profile")
        public_key = check_public_key(key.public_key())
        builder = _builder(profile, names, public_key, None, self._clock())
        return builder.sign(key, _hash_for(key))

    def issue(
        self, issuer: Issuer, profile: Profile, names: Names, public_key: object
    ) -> x509.Certificate:
        """Sign a certificate of ``profile`` for ``public_key``, named by ``names``."""
        checked = check_public_key(public_key)
        _check_issuer_may_sign(issuer, profile)
        builder = _builder(profile, names, checked, issuer, self._clock())
        return builder.sign(issuer.key, _hash_for(issuer.key))

    def issue_from_csr(
        self, issuer: Issuer, profile: Profile, names: Names, csr_pem: bytes
    ) -> x509.Certificate:
        """Validate a CSR and sign its key. The subject and SANs come from ``names``, never
        from the CSR: the requester proves key possession, the authority decides the name."""
        csr = parse_csr(csr_pem)
        return self.issue(issuer, profile, names, csr.public_key())

    def sign_crl(
        self,
        issuer: Issuer,
        revoked: Sequence[tuple[int, datetime, x509.ReasonFlags]],
        crl_number: int,
        next_update: datetime,
    ) -> x509.CertificateRevocationList:
        """A CRL of ``issuer`` (RFC 5280 §5) listing (serial, revoked_at, reason)."""
        now = self._clock()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.cert.subject)
            .last_update(now)
            .next_update(next_update)
            .add_extension(x509.CRLNumber(crl_number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                critical=False,
            )
        )
        for serial, when, reason in revoked:
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(when)
                .add_extension(x509.CRLReason(reason), critical=False)
                .build()
            )
            builder = builder.add_revoked_certificate(entry)
        return builder.sign(issuer.key, _hash_for(issuer.key))


def _check_issuer_may_sign(issuer: Issuer, profile: Profile) -> None:
    bc = issuer.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if not bc.ca:
        raise PKIError("issuer is not a CA")
    if profile.is_ca and bc.path_length == 0:
        raise PKIError("issuer may not sign CA certificates (pathLen 0)")
    if issuer.cert.public_key() != issuer.key.public_key():
        raise PKIError("issuer key does not match issuer certificate")


def parse_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """Parse and check a PEM CSR: size, syntax, self-signature, key type, no CA request."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise InvalidCSR(f"CSR is {len(csr_pem)} bytes; the limit is {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidCSR(f"CSR is not a valid PEM PKCS#10 request: {exc}") from exc
    try:
        signed = csr.is_signature_valid
    except UnsupportedAlgorithm as exc:  # a key, curve or signature cryptography cannot use
        raise InvalidCSR(f"CSR uses an unsupported algorithm: {exc}") from exc
    if not signed:
        raise InvalidCSR("CSR self-signature does not verify (no proof of key possession)")
    try:
        check_public_key(csr.public_key())
    except PKIError as exc:
        raise InvalidCSR(f"CSR key rejected: {exc}") from exc
    _reject_ca_request(csr)
    return csr


def _reject_ca_request(csr: x509.CertificateSigningRequest) -> None:
    try:
        bc = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return
    except ValueError as exc:
        raise InvalidCSR(f"CSR extensions are malformed: {exc}") from exc
    if bc.ca:
        raise InvalidCSR("CSR requests CA:TRUE; certgate issues only end-entity certificates here")
