"""Chain checks with cryptography's RFC 5280 path validation (``PolicyBuilder``).

Raises ``ChainError`` with the validator's reason; never returns False.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
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
    at = at or utcnow()
    builder = PolicyBuilder().store(Store(list(roots))).time(at).max_chain_depth(3)
    try:
        verified = builder.build_client_verifier().verify(leaf, list(intermediates))
    except VerificationError as exc:
        raise _rejected("client", exc, [leaf, *intermediates, *roots], at) from exc
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
    at = at or utcnow()
    builder = PolicyBuilder().store(Store(list(roots))).time(at).max_chain_depth(3)
    try:
        verifier = builder.build_server_verifier(subject)
    except ValueError as exc:  # not a valid DNS name, e.g. "foo_bar.example.com"
        raise ChainError(f"server name {hostname!r} cannot be verified: {exc}") from exc
    try:
        return list(verifier.verify(leaf, list(intermediates)))
    except VerificationError as exc:
        raise _rejected("server", exc, [leaf, *intermediates, *roots], at) from exc


def _rejected(
    kind: str, exc: VerificationError, certs: Sequence[x509.Certificate], at: datetime
) -> ChainError:
    """The validator's reason, led by the real cause when a certificate is not valid yet:
    certificates are issued "now", so on a fresh one that is a clock behind, and saying
    so saves an operator from hunting a trust problem that is not there."""
    for cert in certs:
        if at < cert.not_valid_before_utc:
            return ChainError(
                f"certificate not yet valid, check the clock: {cert.subject.rfc4514_string()} "
                f"is valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC and this "
                f"machine's clock says {at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC "
                f"({kind} certificate rejected: {exc})"
            )
    return ChainError(f"{kind} certificate rejected: {exc}")


def has_eku(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return oid in eku


def vouched_roots(
    listed: Sequence[x509.Certificate],
    crosses: Sequence[x509.Certificate],
    pinned: Sequence[x509.Certificate],
) -> tuple[x509.Certificate, ...]:
    """``listed`` (Roots a console says to trust), when a party pinning ``pinned`` may
    trust each: one it pins, or one whose subject and key a cross certificate of
    ``crosses`` certifies, signed by a Root it trusts (pinned, or vouched for so in turn).
    A Root rotation's new Root reaches nodes and Access this way; whoever signs the list
    (a console identity) never brings an anchor alone. ChainError names one that is not."""
    trusted = list(pinned)
    for _ in listed:  # each round takes at least one more, or none will follow
        taken = [
            root
            for root in listed
            if root not in trusted and any(_vouches(c, root, trusted) for c in crosses)
        ]
        if not taken:
            break
        trusted += taken
    for root in listed:
        if root not in trusted:
            raise ChainError(
                f"instance root {root.subject.rfc4514_string()} (serial"
                f" {format(root.serial_number, 'x')}) is neither pinned nor vouched for by a"
                " cross certificate of a pinned root"
            )
    return tuple(listed)


def _vouches(
    cross: x509.Certificate, root: x509.Certificate, trusted: Sequence[x509.Certificate]
) -> bool:
    """``cross`` is a CA certificate of ``root``'s subject and key, signed by a Root of
    ``trusted``."""
    if cross.subject != root.subject or cross.public_key() != root.public_key():
        return False
    try:
        if not cross.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    for anchor in trusted:
        try:
            cross.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def crosses_of(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """The cross certificates of ``chain`` a Root of ``roots`` signed (self-issued CA
    certificates: a Root rotation's new Root, certified by an old one). cryptography's
    path builder does not go through a self-issued certificate to its issuer, so a party
    pinning the old Root takes these as anchors: what they certify, the pinned Root
    vouched for."""
    return [c for c in chain if c.issuer == c.subject and _vouches(c, c, roots) and c not in roots]
