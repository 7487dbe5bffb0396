"""RFC 9440 Client-Cert / Client-Cert-Chain: vectors, strict decoding, stripping, fuzzing."""

from __future__ import annotations

import base64
import datetime
import inspect
from http import HTTPStatus

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from certgate.errors import BadRequest
from certgate.protocol import client_cert_header
from certgate.protocol.client_cert_header import (
    CLIENT_CERT,
    CLIENT_CERT_CHAIN,
    ClientCertHeaderError,
    ClientCertHeaderTooLarge,
    InvalidCertificate,
    MalformedClientCertHeader,
    TooManyCertificates,
    decode_client_cert,
    decode_client_cert_chain,
    encode_client_cert,
    encode_client_cert_chain,
    strip_client_cert_headers,
)

FUZZ = settings(max_examples=300, deadline=None)


def _certificate(
    subject: str, issuer: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    uri = f"urn:certgate:device:{'0' * 32}:group:g:app:com.example.{subject}"
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=subject != "leaf", path_length=None), True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
        .sign(signer, hashes.SHA256())
    )


def _chain() -> list[x509.Certificate]:
    """leaf <- intermediate <- root, generated fresh: no committed key material."""
    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _certificate("root", "root", root_key, root_key)
    intermediate = _certificate("intermediate", "root", mid_key, root_key)
    leaf = _certificate("leaf", "intermediate", leaf_key, mid_key)
    return [leaf, intermediate, root]


CHAIN = _chain()
DERS = [cert.public_bytes(Encoding.DER) for cert in CHAIN]
LEAF_DER = DERS[0]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- encoding -----------------------------------------------------------------------------


def test_client_cert_is_an_sf_binary_item() -> None:
    assert encode_client_cert(LEAF_DER) == f":{_b64(LEAF_DER)}:"  # RFC 9440 §2.2
    assert encode_client_cert(CHAIN[0]) == encode_client_cert(LEAF_DER)


def test_client_cert_chain_is_an_sf_list_of_sf_binary() -> None:
    value = encode_client_cert_chain(DERS[1:])  # RFC 9440 §2.3: the leaf is not in the chain
    assert value == f":{_b64(DERS[1])}:, :{_b64(DERS[2])}:"
    assert encode_client_cert_chain(CHAIN[1:]) == value


def test_encoders_refuse_empty_input() -> None:
    with pytest.raises(ValueError):
        encode_client_cert(b"")
    with pytest.raises(ValueError):
        encode_client_cert_chain([])


# --- decoding -----------------------------------------------------------------------------


def test_round_trip() -> None:
    assert decode_client_cert(encode_client_cert(LEAF_DER)) == LEAF_DER
    assert decode_client_cert(encode_client_cert(LEAF_DER).encode()) == LEAF_DER
    assert decode_client_cert_chain(encode_client_cert_chain(DERS)) == DERS
    assert decode_client_cert_chain(encode_client_cert_chain(DERS[:1])) == DERS[:1]


def test_decoding_allows_the_whitespace_rfc_8941_allows() -> None:
    leaf, mid = (f":{_b64(der)}:" for der in DERS[:2])
    assert decode_client_cert(f"  {leaf} ") == LEAF_DER  # RFC 8941 §4.2: leading/trailing SP
    assert decode_client_cert_chain(f" {leaf},{mid}") == DERS[:2]  # RFC 8941 §3.1: OWS
    assert decode_client_cert_chain(f"{leaf} ,\t{mid} ") == DERS[:2]


LEAF_B64 = _b64(LEAF_DER)
TRAILING_GARBAGE_B64 = _b64(LEAF_DER + b"\x00")
TRUNCATED_B64 = _b64(LEAF_DER[:-1])

# (value, error): everything that is not exactly one canonical sf-binary of a certificate.
CLIENT_CERT_ERRORS: list[tuple[str | bytes, type[ClientCertHeaderError]]] = [
    ("", MalformedClientCertHeader),
    ("   ", MalformedClientCertHeader),
    ("::", MalformedClientCertHeader),
    (LEAF_B64, MalformedClientCertHeader),
    (f":{LEAF_B64}", MalformedClientCertHeader),
    (f"{LEAF_B64}:", MalformedClientCertHeader),
    (f": {LEAF_B64}:", MalformedClientCertHeader),
    (f":{LEAF_B64[:40]} {LEAF_B64[40:]}:", MalformedClientCertHeader),
    (f":{LEAF_B64[:40]}\n{LEAF_B64[40:]}:", MalformedClientCertHeader),
    (f":{LEAF_B64};a=1", MalformedClientCertHeader),  # parameters are refused
    (f":{LEAF_B64}:, :{LEAF_B64}:", MalformedClientCertHeader),  # a list is not an item
    (f"\t:{LEAF_B64}:", MalformedClientCertHeader),
    (f":{LEAF_B64.replace('+', '-').replace('/', '_')}:", MalformedClientCertHeader),
    (":QQ:", MalformedClientCertHeader),  # padding missing
    (":QR==:", MalformedClientCertHeader),  # non-zero pad bits
    (":Q===:", MalformedClientCertHeader),
    (":=:", MalformedClientCertHeader),
    (":%%%%:", MalformedClientCertHeader),
    (f'"{LEAF_B64}"', MalformedClientCertHeader),
    (b":\xff\xfe:", MalformedClientCertHeader),
    (":QUJD:", InvalidCertificate),  # canonical base64 of "ABC"
    (f":{TRAILING_GARBAGE_B64}:", InvalidCertificate),  # data after the DER
    (f":{TRUNCATED_B64}:", InvalidCertificate),
]


@pytest.mark.parametrize(("value", "error"), CLIENT_CERT_ERRORS)
def test_decode_client_cert_rejects(value: str | bytes, error: type[ClientCertHeaderError]) -> None:
    with pytest.raises(error) as caught:
        decode_client_cert(value)
    assert caught.value.status == HTTPStatus.BAD_REQUEST


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("", MalformedClientCertHeader),
        (" ", MalformedClientCertHeader),
        (f":{LEAF_B64}:,", MalformedClientCertHeader),
        (f",:{LEAF_B64}:", MalformedClientCertHeader),
        (f":{LEAF_B64}:,,:{LEAF_B64}:", MalformedClientCertHeader),
        (f":{LEAF_B64}: :{LEAF_B64}:", MalformedClientCertHeader),
        (f":{LEAF_B64}:, :QQ:", MalformedClientCertHeader),
        (f":{LEAF_B64}:, :QUJD:", InvalidCertificate),
    ],
)
def test_decode_client_cert_chain_rejects(value: str, error: type[ClientCertHeaderError]) -> None:
    with pytest.raises(error):
        decode_client_cert_chain(value)


def test_size_limit_is_checked_first_and_configurable() -> None:
    value = encode_client_cert(LEAF_DER)
    assert decode_client_cert(value, max_bytes=len(value)) == LEAF_DER
    with pytest.raises(ClientCertHeaderTooLarge) as caught:
        decode_client_cert(value, max_bytes=len(value) - 1)
    assert caught.value.status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    with pytest.raises(ClientCertHeaderTooLarge):
        decode_client_cert_chain(value, max_bytes=len(value) - 1)


def test_default_size_limit_is_16_kib() -> None:
    too_big = ":" + "A" * (16 * 1024) + ":"
    with pytest.raises(ClientCertHeaderTooLarge):
        decode_client_cert(too_big)
    with pytest.raises(ClientCertHeaderTooLarge):
        decode_client_cert_chain(too_big)


def test_chain_length_limit() -> None:
    value = encode_client_cert_chain(DERS[1:2] * 3)
    assert len(decode_client_cert_chain(value, max_certificates=3)) == 3
    with pytest.raises(TooManyCertificates):
        decode_client_cert_chain(value, max_certificates=2)
    assert len(decode_client_cert_chain(encode_client_cert_chain(DERS[1:2] * 8))) == 8
    with pytest.raises(TooManyCertificates):
        decode_client_cert_chain(encode_client_cert_chain(DERS[1:2] * 9))


def test_error_family() -> None:
    for error in (
        MalformedClientCertHeader,
        ClientCertHeaderTooLarge,
        TooManyCertificates,
        InvalidCertificate,
    ):
        assert issubclass(error, ClientCertHeaderError)
    assert issubclass(ClientCertHeaderError, BadRequest)


# --- stripping client-supplied values -----------------------------------------------------


def test_strip_removes_every_spelling_and_keeps_the_rest_in_order() -> None:
    headers = [
        ("Host", "a"),
        ("Client-Cert", ":AAAA:"),
        ("X-Keep", "1"),
        ("client-cert-chain", ":AAAA:"),
        ("CLIENT-CERT", ":AAAA:"),
        ("Client_Cert", ":AAAA:"),  # CGI/WSGI map "_" and "-" to the same variable
        ("Client-Cert ", ":AAAA:"),
        ("X-Client-Cert", "kept"),
        ("Client-Cert-Foo", "kept"),
    ]
    assert strip_client_cert_headers(headers) == [
        ("Host", "a"),
        ("X-Keep", "1"),
        ("X-Client-Cert", "kept"),
        ("Client-Cert-Foo", "kept"),
    ]


def test_strip_works_on_raw_byte_headers() -> None:
    headers = [(b"client-cert", b":AAAA:"), (b"Client-Cert-Chain", b"x"), (b"accept", b"*/*")]
    assert strip_client_cert_headers(headers) == [(b"accept", b"*/*")]


def test_strip_does_not_fold_unicode_lookalikes() -> None:
    # "\u0130".lower() is two characters; ASCII-only folding must not match anything new.
    assert strip_client_cert_headers([("Cl\u0130ent-Cert", "v")]) == [("Cl\u0130ent-Cert", "v")]


def test_header_names() -> None:
    assert (CLIENT_CERT, CLIENT_CERT_CHAIN) == ("Client-Cert", "Client-Cert-Chain")


# --- properties ---------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_fuzz_decoders_fail_only_with_their_errors(value: str | bytes) -> None:
    for decode in (decode_client_cert, decode_client_cert_chain):
        try:
            decode(value)
        except ClientCertHeaderError:
            pass


@FUZZ
@given(st.binary(min_size=1, max_size=600))
def test_fuzz_canonical_base64_of_garbage_is_an_invalid_certificate(der: bytes) -> None:
    with pytest.raises(InvalidCertificate):
        decode_client_cert(f":{_b64(der)}:")


@FUZZ
@given(st.integers(0, len(LEAF_DER) - 1), st.integers(0, 255))
def test_fuzz_corrupted_certificates(position: int, byte: int) -> None:
    der = bytearray(LEAF_DER)
    der[position] = byte
    try:
        assert decode_client_cert(encode_client_cert(bytes(der))) == bytes(der)
    except InvalidCertificate:
        pass


@FUZZ
@given(st.lists(st.sampled_from(DERS), min_size=1, max_size=8))
def test_chain_round_trip(ders: list[bytes]) -> None:
    assert decode_client_cert_chain(encode_client_cert_chain(ders)) == ders


_NAMES = st.sampled_from(["Client-Cert", "client-cert-chain", "CLIENT_CERT", "Accept"]) | st.text(
    max_size=20
)


@FUZZ
@given(st.lists(st.tuples(_NAMES, st.text(max_size=5)), max_size=10))
def test_strip_property(headers: list[tuple[str, str]]) -> None:
    def forbidden(name: str) -> bool:  # the two names, ASCII case-folded, "_" as "-"
        folded = name.strip(" \t").lower().replace("_", "-")
        return name.isascii() and folded in {"client-cert", "client-cert-chain"}

    assert strip_client_cert_headers(headers) == [h for h in headers if not forbidden(h[0])]


def test_public_surface() -> None:
    module = client_cert_header
    for name in module.__all__:
        assert hasattr(module, name), name
    defined = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == module.__name__
    }
    assert defined <= set(module.__all__)
