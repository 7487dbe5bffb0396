"""SCEP messages (certgate.protocol.scep): a PKCSReq built as RFC 8894 §3.2 says, opened
by the RA; every broken part refused with SCEPError and its reason; the CertRep read back
as a client reads it; the constructed (BER) encryptedContent Go clients write; and
hypothesis: arbitrary and mutated messages fail only with SCEPError."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import pytest
from asn1crypto import cms, core
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import AttributeOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certgate.protocol.scep import (
    MESSAGE_TYPE,
    PKI_STATUS,
    RECIPIENT_NONCE,
    SENDER_NONCE,
    TRANSACTION_ID,
    FailInfo,
    MessageType,
    SCEPError,
    cert_rep,
    envelope_for,
    open_envelope,
    parse_request,
    signed_message,
)

KEYS = {name: rsa.generate_private_key(public_exponent=65537, key_size=2048) for name in "rc"}


def self_signed(key: rsa.RSAPrivateKey, name: str) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


RA_KEY, CLIENT_KEY = KEYS["r"], KEYS["c"]
RA, CLIENT = self_signed(RA_KEY, "test RA"), self_signed(CLIENT_KEY, "SCEP SIGNER")
NONCE = bytes(range(16))


def csr_der(challenge: str = "cge_x_y") -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d")]))
        .add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
        .sign(CLIENT_KEY, hashes.SHA256())
        .public_bytes(Encoding.DER)
    )


def request(
    content: bytes | None = None,
    message_type: str = "19",
    transaction_id: str = "tx-1",
    nonce: bytes = NONCE,
    signer: tuple[x509.Certificate, rsa.RSAPrivateKey] = (CLIENT, CLIENT_KEY),
) -> bytes:
    envelope = envelope_for(RA, csr_der() if content is None else content)
    fields = [
        (MESSAGE_TYPE, core.PrintableString(message_type)),
        (TRANSACTION_ID, core.PrintableString(transaction_id)),
        (SENDER_NONCE, core.OctetString(nonce)),
    ]
    return signed_message(envelope, fields, *signer)


def test_a_pkcsreq_is_opened_with_its_fields() -> None:
    parsed = parse_request(request(), RA, RA_KEY)
    assert parsed.message_type is MessageType.PKCS_REQ
    assert (parsed.transaction_id, parsed.sender_nonce) == ("tx-1", NONCE)
    assert parsed.signer == CLIENT and parsed.content == csr_der()


def _attrs_of(message: bytes) -> dict[str, bytes]:
    info = cms.ContentInfo.load(message)
    signer_info = info["content"]["signer_infos"][0]
    return {a["type"].dotted: a["values"][0].contents for a in signer_info["signed_attrs"]}


def test_a_cert_rep_is_what_a_client_reads() -> None:
    parsed = parse_request(request(), RA, RA_KEY)
    issued = self_signed(CLIENT_KEY, "issued")
    answer = cert_rep(parsed, RA, RA_KEY, [issued])
    attrs = _attrs_of(answer)
    assert (attrs[MESSAGE_TYPE], attrs[PKI_STATUS]) == (b"3", b"0")
    assert attrs[TRANSACTION_ID] == b"tx-1" and attrs[RECIPIENT_NONCE] == NONCE
    assert len(attrs[SENDER_NONCE]) == 16 and attrs[SENDER_NONCE] != NONCE
    # The answer verifies as a message signed by the RA, and its envelope opens with the
    # requester's key to the issued certificate.
    reread = parse_request_as_client(answer)
    assert pkcs7.load_der_pkcs7_certificates(reread) == [issued]
    failure = _attrs_of(cert_rep(parsed, RA, RA_KEY, None, FailInfo.BAD_REQUEST))
    assert (failure[PKI_STATUS], failure["2.16.840.1.113733.1.9.4"]) == (b"2", b"2")


def parse_request_as_client(answer: bytes) -> bytes:
    """Open a CertRep with the requester's key (the RA's checks, mirrored)."""
    info = cms.ContentInfo.load(answer)
    envelope = info["content"]["encap_content_info"]["content"].native
    return open_envelope(envelope, CLIENT, CLIENT_KEY)


def _resign_without(message: bytes, oid: str) -> bytes:
    """``message``'s envelope with the same fields but ``oid`` left out."""
    info = cms.ContentInfo.load(message)
    envelope = info["content"]["encap_content_info"]["content"].native
    fields = [
        (o, core.Any.load(v))
        for o, v in (
            (a["type"].dotted, a["values"][0].dump())
            for a in info["content"]["signer_infos"][0]["signed_attrs"]
        )
        if o not in (oid, "1.2.840.113549.1.9.3", "1.2.840.113549.1.9.4")
    ]
    return signed_message(envelope, fields, CLIENT, CLIENT_KEY)


OTHER_RA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
BAD = [
    (b"", "malformed PKCS#7"),
    (b"\x30\x03\x02\x01\x01", "malformed PKCS#7"),
    (b"A" * (64 * 1024 + 1), "over"),
    (pkcs7.serialize_certificates([RA], Encoding.DER), "no signed attributes|exactly one signer"),
    (request(message_type="3"), "a CertRep is an answer"),
    (request(message_type="99"), "not a request this CA answers"),
    (request(nonce=b"short"), "a nonce is 16 octets"),
    (request(transaction_id=""), "PrintableString of 1-128"),
    (_resign_without(request(), TRANSACTION_ID), f"attribute {TRANSACTION_ID} is missing"),
    (_resign_without(request(), SENDER_NONCE), f"attribute {SENDER_NONCE} is missing"),
]


@pytest.mark.parametrize(("message", "reason"), BAD)
def test_broken_messages_are_refused_with_the_reason(message: bytes, reason: str) -> None:
    with pytest.raises(SCEPError, match=reason):
        parse_request(message, RA, RA_KEY)


def test_a_tampered_signature_or_content_is_refused() -> None:
    message = bytearray(request())
    message[-5] ^= 0x01  # inside the signature, the last field
    with pytest.raises(SCEPError, match="signature over the signed attributes"):
        parse_request(bytes(message), RA, RA_KEY)
    info = cms.ContentInfo.load(request())
    signed = info["content"]
    signed["encap_content_info"]["content"] = envelope_for(RA, csr_der("cge_other_x"))
    with pytest.raises(SCEPError, match="messageDigest does not match"):
        parse_request(info.dump(force=True), RA, RA_KEY)


def test_an_envelope_for_another_ra_is_refused() -> None:
    other = self_signed(OTHER_RA_KEY, "other RA")
    fields = [
        (MESSAGE_TYPE, core.PrintableString("19")),
        (TRANSACTION_ID, core.PrintableString("t")),
        (SENDER_NONCE, core.OctetString(NONCE)),
    ]
    message = signed_message(envelope_for(other, csr_der()), fields, CLIENT, CLIENT_KEY)
    with pytest.raises(SCEPError, match="not encrypted to this RA"):
        parse_request(message, RA, RA_KEY)


def tlv(tag: int, body: bytes) -> bytes:
    """A DER tag-length-value with a definite length (X.690 §8.1.3)."""
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + body


def test_a_constructed_encrypted_content_is_read_as_go_clients_write_it() -> None:
    """go.mozilla.org/pkcs7 writes encryptedContent as [0] constructed holding OCTET
    STRING segments (X.690 §8.7.3), which cryptography refuses: re-encode an envelope
    that way, field by field, and open it."""
    envelope = cms.ContentInfo.load(envelope_for(RA, b"payload"))["content"]
    encrypted = envelope["encrypted_content_info"]
    ciphertext = encrypted["encrypted_content"].native
    half = len(ciphertext) // 2
    segments = (
        core.OctetString(ciphertext[:half]).dump() + core.OctetString(ciphertext[half:]).dump()
    )
    go_encrypted = tlv(
        0x30,
        encrypted["content_type"].dump()
        + encrypted["content_encryption_algorithm"].dump()
        + tlv(0xA0, segments),  # [0], constructed
    )
    go_enveloped = tlv(
        0x30, envelope["version"].dump() + envelope["recipient_infos"].dump() + go_encrypted
    )
    go_style = tlv(0x30, cms.ContentType("enveloped_data").dump() + tlv(0xA0, go_enveloped))
    with pytest.raises(ValueError):
        pkcs7.pkcs7_decrypt_der(go_style, RA, RA_KEY, [])  # why it is read by hand
    assert open_envelope(go_style, RA, RA_KEY) == b"payload"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_any_bytes_fail_only_with_scep_error(data: bytes) -> None:
    try:
        parse_request(data, RA, RA_KEY)
    except SCEPError:
        pass


VALID = request()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(VALID) - 1), st.integers(1, 255))
def test_a_mutated_message_fails_only_with_scep_error(index: int, flip: int) -> None:
    mutated = bytearray(VALID)
    mutated[index] ^= flip
    try:
        parse_request(bytes(mutated), RA, RA_KEY)
    except SCEPError:
        pass


def test_transaction_ids_and_nonces_are_fresh_per_answer() -> None:
    parsed = parse_request(request(transaction_id=secrets.token_hex(8)), RA, RA_KEY)
    one = _attrs_of(cert_rep(parsed, RA, RA_KEY, None, FailInfo.BAD_CERT_ID))
    two = _attrs_of(cert_rep(parsed, RA, RA_KEY, None, FailInfo.BAD_CERT_ID))
    assert one[SENDER_NONCE] != two[SENDER_NONCE]
    assert one[TRANSACTION_ID] == two[TRANSACTION_ID] == parsed.transaction_id.encode()
