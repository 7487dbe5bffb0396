"""The one place that signs certificates and CRLs (smallstep's "many authorize, one signs").

Callers decide *whether* to issue (provisioners, API handlers); profiles decide *what*;
this module validates the inputs, builds the certificate from the profile, and signs.

An issuer's key is either a private key in memory or a :class:`~certgate.pki.token.TokenKey`
in a PKCS#11 token. cryptography's builders sign only with their own key objects, so for a
token key this module builds the certificate (or CRL) with a stand-in key of the same type,
has the token sign the exact to-be-signed bytes, puts that signature in place of the
stand-in's (RFC 5280 §4.1.1.3, §5.1.1.3), and verifies the result before returning it.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from certgate.errors import InvalidCSR, PKIError
from certgate.pki.identity import Identity
from certgate.pki.keys import PrivateKey, PublicKey, check_public_key
from certgate.pki.profiles import ROOT_CA, Profile
from certgate.pki.token import TokenKey

MAX_CSR_BYTES = 16 * 1024
Clock = Callable[[], datetime]
Signer: TypeAlias = PrivateKey | TokenKey
Hash: TypeAlias = hashes.SHA256 | hashes.SHA384


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Issuer:
    """A CA able to sign: its certificate and its private key (in memory or in a token)."""

    cert: x509.Certificate
    key: Signer


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


def _hash_for(key: Signer) -> Hash:
    # The curve from the key itself: public_key() would cost every issuance an object.
    holder = key.public if isinstance(key, TokenKey) else key
    curves = (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)
    if isinstance(holder, curves) and holder.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _sign_certificate(builder: x509.CertificateBuilder, key: Signer) -> x509.Certificate:
    algorithm = _hash_for(key)
    if not isinstance(key, TokenKey):
        return builder.sign(key, algorithm)
    draft = builder.sign(_stand_in(key.public), algorithm)
    der = _in_token(draft.public_bytes(Encoding.DER), draft.tbs_certificate_bytes, key, algorithm)
    return x509.load_der_x509_certificate(der)


def _sign_crl(
    builder: x509.CertificateRevocationListBuilder, key: Signer
) -> x509.CertificateRevocationList:
    algorithm = _hash_for(key)
    if not isinstance(key, TokenKey):
        return builder.sign(key, algorithm)
    draft = builder.sign(_stand_in(key.public), algorithm)
    der = _in_token(draft.public_bytes(Encoding.DER), draft.tbs_certlist_bytes, key, algorithm)
    return x509.load_der_x509_crl(der)


@functools.cache
def _stand_in_for(kind: str) -> PrivateKey:
    # Its signature is always replaced: only its algorithm identifier stays, which depends
    # on the key type and the hash, not on the key. So one per type and process will do.
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP384R1() if kind == "p384" else ec.SECP256R1())


def _stand_in(public: PublicKey) -> PrivateKey:
    if isinstance(public, rsa.RSAPublicKey):
        return _stand_in_for("rsa")
    return _stand_in_for("p384" if public.curve.key_size > 256 else "p256")


def _in_token(draft: bytes, tbs: bytes, key: TokenKey, algorithm: Hash) -> bytes:
    """``draft`` (SEQUENCE {tbs, signatureAlgorithm, signatureValue}) signed by the token."""
    signature = key.sign(tbs, algorithm)
    _verify(key.public, signature, tbs, algorithm)
    body = draft[_header_length(draft) :]
    if not body.startswith(tbs):
        raise PKIError("draft does not start with its to-be-signed part")
    rest = body[len(tbs) :]
    signature_algorithm = rest[: _header_length(rest) + _content_length(rest)]
    return _der(0x30, tbs + signature_algorithm + _der(0x03, b"\x00" + signature))


def _verify(public: PublicKey, signature: bytes, data: bytes, algorithm: Hash) -> None:
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, data, padding.PKCS1v15(), algorithm)
        else:
            public.verify(signature, data, ec.ECDSA(algorithm))
    except InvalidSignature as exc:
        raise PKIError("the token's signature does not verify with the CA's public key") from exc


PROBE = b"certgate signer health probe"


def probe_signer(key: Signer) -> None:
    """Sign a fixed probe with ``key`` and verify it: raises if the key cannot sign now (a
    PKCS#11 token removed or logged out). For ``/healthz``; the signature is thrown away."""
    algorithm = _hash_for(key)
    if isinstance(key, TokenKey):
        _verify(key.public, key.sign(PROBE, algorithm), PROBE, algorithm)
    elif isinstance(key, rsa.RSAPrivateKey):
        _verify(key.public_key(), key.sign(PROBE, padding.PKCS1v15(), algorithm), PROBE, algorithm)
    else:
        _verify(key.public_key(), key.sign(PROBE, ec.ECDSA(algorithm)), PROBE, algorithm)


def _header_length(der: bytes) -> int:
    """Tag and length octets of the DER element at the start of ``der`` (X.690 §8.1.3)."""
    return 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)


def _content_length(der: bytes) -> int:
    if der[1] < 0x80:
        return der[1]
    return int.from_bytes(der[2 : _header_length(der)], "big")


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + content


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
        self, key: Signer, names: Names, profile: Profile = ROOT_CA
    ) -> x509.Certificate:
        """A self-signed root CA."""
        if not profile.is_ca:
            raise PKIError("a root needs a CA profile")
        public_key = check_public_key(key.public_key())
        builder = _builder(profile, names, public_key, None, self._clock())
        return _sign_certificate(builder, key)

    def self_signed_leaf(self, key: Signer, names: Names, profile: Profile) -> x509.Certificate:
        """A self-signed end-entity certificate: a local endpoint that is its own trust
        anchor (the device agent's loopback KDC proxy, named in krb5.conf's http_anchors)."""
        if profile.is_ca:
            raise PKIError("a self-signed leaf needs an end-entity profile")
        public_key = check_public_key(key.public_key())
        builder = _builder(profile, names, public_key, None, self._clock())
        return _sign_certificate(builder, key)

    def issue(
        self, issuer: Issuer, profile: Profile, names: Names, public_key: object
    ) -> x509.Certificate:
        """Sign a certificate of ``profile`` for ``public_key``, named by ``names``."""
        checked = check_public_key(public_key)
        _check_issuer_may_sign(issuer, profile)
        builder = _builder(profile, names, checked, issuer, self._clock())
        return _sign_certificate(builder, issuer.key)

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
        return _sign_crl(builder, issuer.key)


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
