"""EST (RFC 7030) message bodies, sans-IO: what comes in and goes out of the console's
``/.well-known/est/`` routes. No HTTP, no database here.

- Requests to ``simpleenroll`` / ``simplereenroll`` carry a PKCS#10 CSR, DER, base64
  (``application/pkcs10``, RFC 7030 §4.2.1; base64 per §4 "Content-Transfer-Encoding").
- Answers carrying certificates are a certs-only CMS SignedData (``application/pkcs7-mime;
  smime-type=certs-only``, §4.1.3 and §4.2.3), DER, base64; cryptography's ``pkcs7``
  module writes it.
- ``csrattrs`` (§4.5.2) is ``CsrAttrs ::= SEQUENCE OF AttrOrOID``, DER, base64. No library
  writes it, so its few bytes are spelled out below (tests/protocol/test_est.py checks
  them with ``openssl asn1parse``).
"""

from __future__ import annotations

import base64
import binascii
import re

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

__all__ = [
    "CERTS_ONLY",
    "CSRATTRS",
    "CSRATTRS_TYPE",
    "ESTBodyError",
    "certs_only",
    "decode_csr",
]

CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
CSRATTRS_TYPE = "application/csrattrs"
MAX_BODY = 24 * 1024  # a base64 CSR under the authority's 16 KiB limit, with line breaks
_WHITESPACE = re.compile(rb"\s+")

# CsrAttrs: SEQUENCE {
#   OID ecdsa-with-SHA256 (1.2.840.10045.4.3.2)      -- sign the CSR with SHA-256 ECDSA
#   Attribute { OID id-ecPublicKey (1.2.840.10045.2.1),
#               SET { OID secp256r1 (1.2.840.10045.3.1.7) } } }  -- a P-256 key
# (RFC 7030 §4.5.2 gives the same shape in its example.)
CSRATTRS = bytes.fromhex(
    "3021"
    "06082a8648ce3d040302"
    "3015" "06072a8648ce3d0201" "310a" "06082a8648ce3d030107"
)  # fmt: skip


class ESTBodyError(ValueError):
    """A request body that is not what RFC 7030 asks for (the reason says what)."""


def decode_csr(body: bytes) -> bytes:
    """The PEM CSR in a base64 DER ``application/pkcs10`` body. Raises ESTBodyError;
    the CSR's own checks (signature, key, CA request) are the authority's."""
    if len(body) > MAX_BODY:
        raise ESTBodyError(f"body of {len(body)} bytes is over {MAX_BODY}")
    try:
        der = base64.b64decode(_WHITESPACE.sub(b"", body), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ESTBodyError(f"body is not base64: {exc}") from exc
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError as exc:
        raise ESTBodyError(f"body is not a DER PKCS#10 request: {exc}") from exc
    return csr.public_bytes(Encoding.PEM)


def certs_only(certs: list[x509.Certificate]) -> bytes:
    """A base64 certs-only CMS SignedData holding ``certs`` (76-column lines)."""
    der = pkcs7.serialize_certificates(certs, Encoding.DER)
    return base64.encodebytes(der)
