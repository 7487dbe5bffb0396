"""SCEP (RFC 8894) messages, sans-IO: parse a PKIOperation request, build the CertRep.

A request (§3.2) is a CMS SignedData (signed by the requester's key: a self-signed
certificate for PKCSReq and GetCertInitial, its current certificate for RenewalReq) whose
content is an EnvelopedData encrypted to the RA certificate, and whose signed attributes
carry the SCEP fields (§3.2.1). asn1crypto reads and writes the CMS structures;
cryptography verifies the signature and decrypts the envelope (``pkcs7_decrypt_der``)
and builds the answer's envelope (``PKCS7EnvelopeBuilder``). What no library does is the
SignedData of the CertRep with SCEP's own signed attributes; it is assembled here from
asn1crypto's types and signed with the RA key given by the caller.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import Enum
from typing import Any

from asn1crypto import algos, cms, core, parser
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

__all__ = [
    "CACAPS",
    "FailInfo",
    "MessageType",
    "PKIRequest",
    "SCEPError",
    "cert_rep",
    "envelope_for",
    "open_envelope",
    "parse_request",
    "signed_message",
]

MAX_MESSAGE = 64 * 1024
# GetCACaps (§3.5.2): POST, SHA-256, AES, renewal, and the RFC 8894 profile.
CACAPS = b"POSTPKIOperation\nSHA-256\nAES\nRenewal\nSCEPStandard\n"
# SCEP attribute OIDs (§3.2.1.x), under id-VeriSign 2.16.840.1.113733.1.9.
MESSAGE_TYPE = "2.16.840.1.113733.1.9.2"
PKI_STATUS = "2.16.840.1.113733.1.9.3"
FAIL_INFO = "2.16.840.1.113733.1.9.4"
SENDER_NONCE = "2.16.840.1.113733.1.9.5"
RECIPIENT_NONCE = "2.16.840.1.113733.1.9.6"
TRANSACTION_ID = "2.16.840.1.113733.1.9.7"
# SHA-1 is accepted for the request's CMS signature only because deployed clients
# (Debian's scepclient, go.mozilla.org/pkcs7) sign with it whatever GetCACaps says. It
# proves no more than possession of the requester's transport key; what authorizes the
# request is the challenge inside the envelope, and the CSR's own signature is checked by
# the authority's rules. Answers are always signed with SHA-256.
_DIGESTS: dict[str, type[hashes.SHA1 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


class MessageType(Enum):  # §3.2.1.2
    CERT_REP = "3"
    RENEWAL_REQ = "17"
    PKCS_REQ = "19"
    CERT_POLL = "20"  # GetCertInitial


class FailInfo(Enum):  # §3.2.1.4
    BAD_ALG = "0"
    BAD_MESSAGE_CHECK = "1"
    BAD_REQUEST = "2"
    BAD_TIME = "3"
    BAD_CERT_ID = "4"


class SCEPError(ValueError):
    """A request that cannot be answered with a CertRep (no signer, nonce or transaction
    to answer to): malformed CMS, wrong signature, an envelope not for us."""


@dataclass(frozen=True, slots=True)
class PKIRequest:
    message_type: MessageType
    transaction_id: str
    sender_nonce: bytes
    signer: x509.Certificate  # the requester's certificate: the answer is encrypted to it
    content: bytes  # decrypted: a DER CSR, or IssuerAndSubject for GetCertInitial


def parse_request(
    message: bytes, ra_cert: x509.Certificate, ra_key: rsa.RSAPrivateKey
) -> PKIRequest:
    """Check and open a PKIOperation message. Raises SCEPError with the reason."""
    if len(message) > MAX_MESSAGE:
        raise SCEPError(f"message of {len(message)} bytes is over {MAX_MESSAGE}")
    try:
        return _parse(message, ra_cert, ra_key)
    except SCEPError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise SCEPError(f"malformed PKCS#7: {exc}"[:300]) from exc
    except UnsupportedAlgorithm as exc:  # a signer key or cipher nothing here can use
        raise SCEPError(f"unsupported algorithm: {exc}"[:300]) from exc
    except x509.InvalidVersion as exc:  # a signer certificate of an unknown X.509 version
        raise SCEPError(f"malformed certificate: {exc}"[:300]) from exc


def _parse(message: bytes, ra_cert: x509.Certificate, ra_key: rsa.RSAPrivateKey) -> PKIRequest:
    info = cms.ContentInfo.load(message, strict=True)
    if info["content_type"].native != "signed_data":
        raise SCEPError("not a CMS SignedData")
    signed = info["content"]
    if len(signed["signer_infos"]) != 1:
        raise SCEPError("a SCEP request has exactly one signer")
    signer_info = signed["signer_infos"][0]
    signer = _signer_cert(signed, signer_info)
    envelope = _envelope(signed["encap_content_info"])
    attrs = _attributes(signer_info)
    _verify(signer, signer_info, attrs, envelope)
    content = open_envelope(envelope, ra_cert, ra_key)
    return PKIRequest(
        _message_type(attrs),
        _printable(attrs, TRANSACTION_ID),
        _nonce(attrs, SENDER_NONCE),
        signer,
        content,
    )


def _envelope(encap: Any) -> bytes:
    """The pkcsPKIEnvelope: the DER of an EnvelopedData ContentInfo, carried as ``data``."""
    if encap["content_type"].native != "data":
        raise SCEPError("the signed content must be of type data")
    envelope = encap["content"].native
    if not isinstance(envelope, bytes) or not envelope:
        raise SCEPError("the SignedData carries no envelope")
    return envelope


def open_envelope(der: bytes, ra_cert: x509.Certificate, ra_key: rsa.RSAPrivateKey) -> bytes:
    """The plaintext of an EnvelopedData for the RA (RFC 5652 §6): cryptography's
    ``pkcs7_decrypt_der`` first; by hand when it cannot read the encoding, as with the
    constructed (BER) encryptedContent go.mozilla.org/pkcs7 writes, or the cipher, as
    with the single DES that Debian's scepclient uses for PKCSReq whatever GetCACaps
    offers (the transport here is TLS either way)."""
    try:
        return pkcs7.pkcs7_decrypt_der(der, ra_cert, ra_key, [])
    except ValueError:
        pass  # read it by hand below; a wrong key fails there with the reason
    except UnsupportedAlgorithm:
        pass
    info = cms.ContentInfo.load(der)
    if info["content_type"].native != "enveloped_data":
        raise SCEPError("the signed content is not an EnvelopedData")
    enveloped = info["content"]
    key = ra_key.decrypt(_encrypted_key(enveloped, ra_cert), padding.PKCS1v15())
    encrypted = enveloped["encrypted_content_info"]
    algorithm = encrypted["content_encryption_algorithm"]
    return _decrypt(algorithm["algorithm"].native, key, algorithm, _ber_octets(encrypted))


def _encrypted_key(enveloped: Any, ra_cert: x509.Certificate) -> bytes:
    ra = asn1_x509.Certificate.load(ra_cert.public_bytes(Encoding.DER))
    for recipient in enveloped["recipient_infos"]:
        if recipient.name != "ktri":
            continue
        rid = recipient.chosen["rid"]
        if rid.name == "issuer_and_serial_number" and (
            rid.chosen["issuer"].dump() == ra.issuer.dump()
            and rid.chosen["serial_number"].native == ra.serial_number
        ):
            return bytes(recipient.chosen["encrypted_key"].native)
    raise SCEPError("the envelope is not encrypted to this RA's certificate")


def _ber_octets(encrypted: Any) -> bytes:
    """encryptedContent, primitive or constructed of OCTET STRING segments (X.690
    §8.7.3), which asn1crypto's OctetString refuses: read from the raw child."""
    encrypted["content_type"]  # parses the children, leaving raw tuples
    raw = encrypted.children[2] if len(encrypted.children) > 2 else None
    if raw is None or not isinstance(raw, tuple):
        raise SCEPError("the envelope has no encrypted content")
    method, contents = raw[1], raw[4]  # asn1crypto's (class, method, tag, header, contents, ...)
    if method == 0:
        return bytes(contents)
    chunks, pointer = [], 0
    while pointer < len(contents):
        part = parser.parse(contents[pointer:], strict=False)
        if part[2] != 4:
            raise SCEPError("a constructed encryptedContent holds only OCTET STRINGs")
        chunks.append(part[4])
        pointer += len(part[3]) + len(part[4]) + len(part[5])
    return b"".join(chunks)


def _decrypt(name: str, key: bytes, algorithm: Any, ciphertext: bytes) -> bytes:
    iv = algorithm["parameters"].native
    if name in ("aes128_cbc", "aes192_cbc", "aes256_cbc"):
        cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
        block = 128
    elif name in ("des", "tripledes_3key"):
        # Single DES is TripleDES with K1 = K2 = K3.
        cipher = Cipher(TripleDES(key * 3 if len(key) == 8 else key), modes.CBC(iv))
        block = 64
    else:
        raise SCEPError(f"content encryption {name} is not supported; use AES")
    decryptor = cipher.decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = sym_padding.PKCS7(block).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError as exc:
        raise SCEPError("the envelope does not decrypt with the RA key") from exc


def _signer_cert(signed: Any, signer_info: Any) -> x509.Certificate:
    sid = signer_info["sid"]
    if sid.name != "issuer_and_serial_number":
        raise SCEPError("the signer must be named by issuer and serial number")
    wanted = (sid.chosen["issuer"].dump(), sid.chosen["serial_number"].native)
    for choice in signed["certificates"] or []:
        if choice.name != "certificate":
            continue
        cert = choice.chosen
        if (cert.issuer.dump(), cert.serial_number) == wanted:
            return x509.load_der_x509_certificate(cert.dump())
    raise SCEPError("the signer's certificate is not in the message")


def _attributes(signer_info: Any) -> dict[str, Any]:
    attrs = signer_info["signed_attrs"]
    if not attrs:
        raise SCEPError("the signer info has no signed attributes")
    found: dict[str, Any] = {}
    for attr in attrs:
        oid = attr["type"].dotted
        if oid in found or len(attr["values"]) != 1:
            raise SCEPError(f"attribute {oid} must appear once with one value")
        found[oid] = attr["values"][0]
    return found


def _verify(signer: x509.Certificate, signer_info: Any, attrs: dict[str, Any], body: bytes) -> None:
    """The signed attributes' signature (RFC 5652 §5.4: DER as a SET OF) and the
    messageDigest of the content."""
    digest_name = signer_info["digest_algorithm"]["algorithm"].native
    if digest_name not in _DIGESTS:
        raise SCEPError(f"digest {digest_name} is not accepted; use SHA-256")
    algorithm = _DIGESTS[digest_name]()
    digest = hashes.Hash(algorithm)
    digest.update(body)
    declared = attrs.get("1.2.840.113549.1.9.4")  # messageDigest
    if declared is None or bytes(_octets(declared)) != digest.finalize():
        raise SCEPError("messageDigest does not match the content")
    key = signer.public_key()
    signature = bytes(signer_info["signature"].native)
    for signed_bytes in _signed_encodings(signer_info["signed_attrs"]):
        if _signature_holds(key, signature, signed_bytes, algorithm):
            return
    raise SCEPError("the signature over the signed attributes does not verify")


def _signed_encodings(attrs: Any) -> list[bytes]:
    """What the signature covers (RFC 5652 §5.4): the attributes' DER, as a SET OF, which
    sorts them (X.690 §11.6); go.mozilla.org/pkcs7 signs them sorted but sends them in
    its own order. Then the encoding as sent, for signers that send them sorted."""
    sorted_set = _tlv(0x31, b"".join(sorted(bytes(a.dump()) for a in attrs)))
    as_sent = b"\x31" + bytes(attrs.dump())[1:]  # [0] IMPLICIT -> SET
    return [sorted_set] if sorted_set == as_sent else [sorted_set, as_sent]


def _signature_holds(key: Any, signature: bytes, data: bytes, algorithm: Any) -> bool:
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(algorithm))
        else:
            raise SCEPError("the signer's key is neither RSA nor ECDSA")
    except InvalidSignature:
        return False
    return True


def _tlv(tag: int, body: bytes) -> bytes:
    """DER tag, definite length (X.690 §8.1.3), value."""
    if len(body) < 0x80:
        return bytes([tag, len(body)]) + body
    length = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + body


def _octets(value: Any) -> bytes:
    return bytes(core.OctetString.load(value.dump()).native)


def _printable(attrs: dict[str, Any], oid: str) -> str:
    if oid not in attrs:
        raise SCEPError(f"attribute {oid} is missing")
    text = core.PrintableString.load(attrs[oid].dump()).native
    if not isinstance(text, str) or not 0 < len(text) <= 128:
        raise SCEPError(f"attribute {oid} must be a PrintableString of 1-128 characters")
    return text


def _nonce(attrs: dict[str, Any], oid: str) -> bytes:
    if oid not in attrs:
        raise SCEPError(f"attribute {oid} is missing")
    nonce = _octets(attrs[oid])
    if len(nonce) != 16:  # §3.2.1.5: 16 octets
        raise SCEPError("a nonce is 16 octets")
    return nonce


def _message_type(attrs: dict[str, Any]) -> MessageType:
    value = _printable(attrs, MESSAGE_TYPE)
    try:
        kind = MessageType(value)
    except ValueError as exc:
        raise SCEPError(f"messageType {value!r} is not a request this CA answers") from exc
    if kind is MessageType.CERT_REP:
        raise SCEPError("a CertRep is an answer, not a request")
    return kind


# -- the answer ------------------------------------------------------------------------------


def cert_rep(
    request: PKIRequest,
    ra_cert: x509.Certificate,
    ra_key: rsa.RSAPrivateKey,
    issued: list[x509.Certificate] | None,
    fail: FailInfo | None = None,
) -> bytes:
    """A CertRep (§3.3.2): SUCCESS with ``issued`` in an envelope for the requester, or
    FAILURE with ``fail``. Signed with the RA key."""
    if (issued is None) == (fail is None):
        raise ValueError("a CertRep carries either certificates or a failInfo")
    content = b""
    if issued is not None:
        certs = pkcs7.serialize_certificates(issued, Encoding.DER)
        content = envelope_for(request.signer, certs)
    fields: list[tuple[str, Any]] = [
        (MESSAGE_TYPE, core.PrintableString(MessageType.CERT_REP.value)),
        (PKI_STATUS, core.PrintableString("2" if fail else "0")),
        (TRANSACTION_ID, core.PrintableString(request.transaction_id)),
        (SENDER_NONCE, core.OctetString(secrets.token_bytes(16))),
        (RECIPIENT_NONCE, core.OctetString(request.sender_nonce)),
    ]
    if fail is not None:
        fields.append((FAIL_INFO, core.PrintableString(fail.value)))
    return signed_message(content, fields, ra_cert, ra_key)


def envelope_for(recipient: x509.Certificate, data: bytes) -> bytes:
    """An EnvelopedData of ``data`` for ``recipient``'s RSA key (AES-128-CBC)."""
    return (
        pkcs7.PKCS7EnvelopeBuilder()
        .set_data(data)
        .add_recipient(recipient)
        .encrypt(Encoding.DER, [pkcs7.PKCS7Options.Binary])
    )


def signed_message(
    content: bytes,
    fields: list[tuple[str, Any]],
    cert: x509.Certificate,
    key: rsa.RSAPrivateKey,
) -> bytes:
    """A SCEP message (§3.2): a SignedData of ``content`` (omitted when empty) whose
    signed attributes are contentType, messageDigest (SHA-256) and the SCEP ``fields``,
    signed with ``key`` (RSA PKCS#1 v1.5, SHA-256)."""
    values = [
        ("1.2.840.113549.1.9.3", cms.ContentType("data")),
        ("1.2.840.113549.1.9.4", core.OctetString(hashlib.sha256(content).digest())),
        *fields,
    ]
    # DER sorts a SET OF by encoding (X.690 §11.6); verifiers that re-encode (Go) rely on it.
    attrs = cms.CMSAttributes(sorted((_any_attribute(o, v) for o, v in values), key=_der))
    signature = key.sign(b"\x31" + attrs.dump()[1:], padding.PKCS1v15(), hashes.SHA256())
    signer = asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER))
    signer_info = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(
                {
                    "issuer_and_serial_number": cms.IssuerAndSerialNumber(
                        {"issuer": signer.issuer, "serial_number": signer.serial_number}
                    )
                }
            ),
            "digest_algorithm": algos.DigestAlgorithm({"algorithm": "sha256"}),
            "signed_attrs": attrs,
            "signature_algorithm": algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"}),
            "signature": signature,
        }
    )
    encap: dict[str, Any] = {"content_type": "data"}
    if content:
        encap["content"] = content
    signed = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [algos.DigestAlgorithm({"algorithm": "sha256"})],
            "encap_content_info": encap,
            "certificates": [signer],
            "signer_infos": [signer_info],
        }
    )
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump())


class _AnyValues(core.SetOf):  # type: ignore[misc]
    _child_spec = core.Any


class _RawAttribute(core.Sequence):  # type: ignore[misc]
    """An attribute of any type, so that asn1crypto's per-OID value types stay out of it."""

    _fields = [("type", core.ObjectIdentifier), ("values", _AnyValues)]  # noqa: RUF012


def _any_attribute(oid: str, value: Any) -> Any:
    raw = _RawAttribute({"type": oid, "values": [core.Any.load(value.dump())]})
    return cms.CMSAttribute.load(raw.dump())


def _der(value: Any) -> bytes:
    return bytes(value.dump())
