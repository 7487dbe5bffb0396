"""CertThumbprint: SHA-256 over the certificate's DER, lower-case hex (docs/CONVENTIONS.md).

This is the only implementation; ``openssl x509 -outform DER | sha256sum`` prints the same.
"""

from __future__ import annotations

import hashlib
import re

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

THUMBPRINT_RE = re.compile(r"^[0-9a-f]{64}$")


def thumbprint_der(der: bytes) -> str:
    """Thumbprint of a DER-encoded certificate."""
    return hashlib.sha256(der).hexdigest()


def thumbprint(cert: x509.Certificate) -> str:
    """Thumbprint of a parsed certificate."""
    return thumbprint_der(cert.public_bytes(Encoding.DER))


# Said wherever a pinned instance Root does not match: a pin names the Root itself, so
# after a Root rotation (docs/CONVENTIONS.md "Root") the pin must be given again.
ROOT_PIN_HINT = (
    "a pin is the SHA-256 thumbprint of the instance Root (as 'certgate console init'"
    " printed it); after a Root rotation pin the new Root"
    " ('certgate console rotate status global' shows its thumbprint)"
)


def is_thumbprint(value: str) -> bool:
    """True when ``value`` is in canonical thumbprint form (64 lower-case hex digits)."""
    return bool(THUMBPRINT_RE.fullmatch(value))
