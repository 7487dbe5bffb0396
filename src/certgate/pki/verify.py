"""Chain checks with cryptography's RFC 5280 path validation (``PolicyBuilder``).

Raises ``ChainError`` with the validator's reason; never returns False.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.x509.verification import (
    PolicyBuilder,
    Store,
    Subject,
    VerificationError,
)

from certgate.errors import ChainError
from certgate.pki.authority import utcnow


def verify_client_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    expected_issuer: x509.Certificate | None = None,
    at: datetime | None = None,
) -> list[x509.Certificate]:
    """Validate ``leaf`` as a TLS client certificate (clientAuth EKU) up to ``roots``.

    ``expected_issuer`` pins the direct issuer (e.g. the Device Root) so that a leaf from a
    sibling intermediate of the same root is refused.
    """
    builder = PolicyBuilder().store(Store(list(roots))).time(at or utcnow()).max_chain_depth(3)
    try:
        verified = builder.build_client_verifier().verify(leaf, list(intermediates))
    except VerificationError as exc:
        raise ChainError(f"client certificate rejected: {exc}") from exc
    chain = list(verified.chain)
    if expected_issuer is not None and (len(chain) < 2 or chain[1] != expected_issuer):
        raise ChainError(
            f"client certificate is not issued by {expected_issuer.subject.rfc4514_string()}"
        )
    return chain


def verify_server_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    hostname: str,
    at: datetime | None = None,
) -> list[x509.Certificate]:
    """Validate ``leaf`` as a TLS server certificate for ``hostname`` (DNS name or IP)."""
    subject: Subject
    try:
        subject = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        subject = x509.DNSName(hostname)
    builder = PolicyBuilder().store(Store(list(roots))).time(at or utcnow()).max_chain_depth(3)
    try:
        verifier = builder.build_server_verifier(subject)
    except ValueError as exc:  # not a valid DNS name, e.g. "foo_bar.example.com"
        raise ChainError(f"server name {hostname!r} cannot be verified: {exc}") from exc
    try:
        return list(verifier.verify(leaf, list(intermediates)))
    except VerificationError as exc:
        raise ChainError(f"server certificate rejected: {exc}") from exc


def has_eku(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return oid in eku
