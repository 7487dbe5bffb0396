"""EST bodies (certgate.protocol.est): the hand-written csrattrs bytes read by openssl,
CSR bodies as EST clients send them, certs-only answers read back, and every malformed
body refused with ESTBodyError (hypothesis)."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from hypothesis import given, settings
from hypothesis import strategies as st

from certgate.protocol.est import CSRATTRS, ESTBodyError, certs_only, decode_csr
from tests.support import make_csr
from tests.tunnel.dataplane import PKI


def test_csrattrs_is_the_der_openssl_reads_as_p256_and_sha256() -> None:
    parsed = subprocess.run(
        ["openssl", "asn1parse", "-inform", "DER"],
        input=CSRATTRS,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.decode()
    lines = [" ".join(line.split(":", 1)[1].split()) for line in parsed.splitlines()]
    assert lines == [
        "d=0 hl=2 l= 33 cons: SEQUENCE",
        "d=1 hl=2 l= 8 prim: OBJECT :ecdsa-with-SHA256",
        "d=1 hl=2 l= 21 cons: SEQUENCE",
        "d=2 hl=2 l= 7 prim: OBJECT :id-ecPublicKey",
        "d=2 hl=2 l= 10 cons: SET",
        "d=3 hl=2 l= 8 prim: OBJECT :prime256v1",
    ]


def test_a_base64_der_csr_with_line_breaks_becomes_pem() -> None:
    pem, _ = make_csr()
    der = x509.load_pem_x509_csr(pem).public_bytes(Encoding.DER)
    body = base64.encodebytes(der)  # 76-column lines, as openssl base64 writes them
    assert b"\n" in body.rstrip()
    assert decode_csr(body) == pem
    assert decode_csr(body.replace(b"\n", b"\r\n")) == pem


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not a DER PKCS#10"),
        (b"%%%", "not base64"),
        (b"QUJD", "not a DER PKCS#10"),  # "ABC"
        (b"MAMCAQE=", "not a DER PKCS#10"),  # SEQUENCE { INTEGER 1 }
        (b"-----BEGIN CERTIFICATE REQUEST-----", "not base64"),
        (b"A" * (24 * 1024 + 1), "over"),
    ],
)
def test_bad_bodies_are_refused_with_the_reason(body: bytes, reason: str) -> None:
    with pytest.raises(ESTBodyError, match=reason):
        decode_csr(body)


def test_certs_only_holds_exactly_the_certificates(tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    certs = [pki.device_root, pki.root]
    read = pkcs7.load_der_pkcs7_certificates(base64.b64decode(certs_only(certs)))
    assert sorted(c.serial_number for c in read) == sorted(c.serial_number for c in certs)


@settings(deadline=None)  # no timing assertions: the machine is shared
@given(st.binary(max_size=300))
def test_any_body_decodes_or_fails_with_est_body_error(body: bytes) -> None:
    try:
        decode_csr(body)
    except ESTBodyError:
        pass


@settings(deadline=None)  # no timing assertions: the machine is shared
@given(st.binary(max_size=300))
def test_any_base64_body_decodes_or_fails_with_est_body_error(raw: bytes) -> None:
    try:
        decode_csr(base64.encodebytes(raw))
    except ESTBodyError:
        pass
