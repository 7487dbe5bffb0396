"""RFC 9440 ``Client-Cert`` / ``Client-Cert-Chain`` header fields, encoded and decoded.

The cert proxy terminates TLS and passes the client certificate on to the access service
in these fields. ``Client-Cert`` is an RFC 8941 Item holding a Byte Sequence
(``:base64(DER):``); ``Client-Cert-Chain`` is a List of them, leaf excluded
(RFC 9440 §2.2, §2.3).

Decoding is stricter than RFC 8941 §4.2.7 asks of a general parser: padding must be
present and pad bits zero (one canonical spelling per certificate), and parameters are
refused. Only our own proxy produces these fields, so anything else is forged or broken.
Every decoded value must also parse as an X.509 certificate.

A proxy must never pass on values a client supplied itself (RFC 9440 §3):
:func:`strip_client_cert_headers` removes them before the proxy adds its own.
"""

from __future__ import annotations

import base64
import binascii
import re
import warnings
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning

from certgate.errors import BadRequest

__all__ = [
    "CLIENT_CERT",
    "CLIENT_CERT_CHAIN",
    "DEFAULT_MAX_CHAIN_CERTIFICATES",
    "DEFAULT_MAX_HEADER_BYTES",
    "ClientCertHeaderError",
    "ClientCertHeaderTooLarge",
    "InvalidCertificate",
    "MalformedClientCertHeader",
    "TooManyCertificates",
    "decode_client_cert",
    "decode_client_cert_chain",
    "encode_client_cert",
    "encode_client_cert_chain",
    "strip_client_cert_headers",
]

CLIENT_CERT = "Client-Cert"
CLIENT_CERT_CHAIN = "Client-Cert-Chain"
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
DEFAULT_MAX_CHAIN_CERTIFICATES = 8

# RFC 8941 §3.3.5: ":" base64 ":" with the RFC 4648 §4 alphabet; no spaces inside.
_BYTE_SEQUENCE_RE = re.compile(r":([A-Za-z0-9+/]*={0,2}):")
# Names are compared as ASCII, with "_" folded to "-": CGI/WSGI servers map both to the
# same variable (HTTP_CLIENT_CERT), so "Client_Cert" would smuggle a value through.
_STRIPPED_NAMES = frozenset((b"client-cert", b"client-cert-chain"))

_Text = TypeVar("_Text", str, bytes)

# What cryptography raises for bytes that are not a well-formed certificate.
_PARSE_ERRORS = (
    ValueError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    CryptographyDeprecationWarning,
)


class ClientCertHeaderError(BadRequest):
    """A Client-Cert or Client-Cert-Chain value is unacceptable; ``status`` says how."""

    status = HTTPStatus.BAD_REQUEST


class MalformedClientCertHeader(ClientCertHeaderError):
    """Not an RFC 8941 Byte Sequence (or List of them) in canonical base64."""


class ClientCertHeaderTooLarge(ClientCertHeaderError):
    """The field value exceeds the configured size limit."""

    status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE


class TooManyCertificates(ClientCertHeaderError):
    """Client-Cert-Chain lists more certificates than allowed."""


class InvalidCertificate(ClientCertHeaderError):
    """The bytes are canonical base64 but not a DER X.509 certificate."""


def encode_client_cert(cert: bytes | x509.Certificate) -> str:
    """The ``Client-Cert`` value for ``cert`` (DER bytes or a loaded certificate)."""
    return _encode_byte_sequence(_der_of(cert))


def encode_client_cert_chain(chain: Sequence[bytes | x509.Certificate]) -> str:
    """The ``Client-Cert-Chain`` value; omit the field instead of passing an empty chain."""
    if not chain:
        raise ValueError("an empty chain is sent by omitting Client-Cert-Chain")
    return ", ".join(_encode_byte_sequence(_der_of(cert)) for cert in chain)


def decode_client_cert(value: str | bytes, *, max_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> bytes:
    """DER bytes from a ``Client-Cert`` value, checked to be an X.509 certificate."""
    text = _field_text(value, max_bytes)
    return _decode_certificate(text.strip(" "))


def decode_client_cert_chain(
    value: str | bytes,
    *,
    max_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_certificates: int = DEFAULT_MAX_CHAIN_CERTIFICATES,
) -> list[bytes]:
    """DER bytes of each certificate in a ``Client-Cert-Chain`` value, in order.

    Pass the field's lines already combined with ", " (RFC 9110 §5.3) if it was split.
    """
    text = _field_text(value, max_bytes).strip(" ")
    if not text:
        raise MalformedClientCertHeader(f"empty {CLIENT_CERT_CHAIN}")
    # RFC 8941 §4.2.1: members are separated by OWS "," OWS; none may be empty.
    members = [member.strip(" \t") for member in text.split(",")]
    if len(members) > max_certificates:
        raise TooManyCertificates(f"more than {max_certificates} certificates in the chain")
    return [_decode_certificate(member) for member in members]


def strip_client_cert_headers(headers: Iterable[tuple[_Text, _Text]]) -> list[tuple[_Text, _Text]]:
    """``headers`` without any Client-Cert or Client-Cert-Chain field, however spelled."""
    return [(name, value) for name, value in headers if not _is_client_cert_name(name)]


def _is_client_cert_name(name: str | bytes) -> bool:
    raw = name if isinstance(name, bytes) else name.encode("utf-8", "surrogatepass")
    # bytes.lower() folds ASCII only, so no Unicode case mapping can forge a match.
    return raw.strip(b" \t").lower().replace(b"_", b"-") in _STRIPPED_NAMES


def _der_of(cert: bytes | x509.Certificate) -> bytes:
    der = cert.public_bytes(Encoding.DER) if isinstance(cert, x509.Certificate) else cert
    if not der:
        raise ValueError("empty certificate")
    return der


def _encode_byte_sequence(data: bytes) -> str:
    return ":" + base64.b64encode(data).decode("ascii") + ":"


def _field_text(value: str | bytes, max_bytes: int) -> str:
    if len(value) > max_bytes:
        raise ClientCertHeaderTooLarge(f"field value longer than {max_bytes} bytes")
    if isinstance(value, str):
        return value
    try:
        return value.decode("ascii")
    except UnicodeDecodeError as exc:
        raise MalformedClientCertHeader("non-ASCII bytes in field value") from exc


def _decode_certificate(member: str) -> bytes:
    der = _decode_byte_sequence(member)
    try:
        with warnings.catch_warnings():
            # cryptography only warns about some RFC 5280 violations it still tolerates
            # (a non-positive serial number, for one); strict decoding refuses them.
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            cert = x509.load_der_x509_certificate(der)
            _ = cert.extensions  # parsed lazily: force it so bad extensions fail here
    except _PARSE_ERRORS as exc:
        raise InvalidCertificate("field value is not a DER X.509 certificate") from exc
    return der


def _decode_byte_sequence(member: str) -> bytes:
    """RFC 8941 §4.2.7, strictly: canonical padded base64, non-empty, no parameters."""
    match = _BYTE_SEQUENCE_RE.fullmatch(member)
    if match is None:
        raise MalformedClientCertHeader("expected one :base64: byte sequence, nothing else")
    encoded = match.group(1)
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise MalformedClientCertHeader("invalid base64") from exc
    if not data:
        raise MalformedClientCertHeader("empty byte sequence")
    if base64.b64encode(data).decode("ascii") != encoded:
        raise MalformedClientCertHeader("non-canonical base64 (padding or pad bits)")
    return data
