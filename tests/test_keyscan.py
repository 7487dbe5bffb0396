"""The disk scanner finds every clear form of a private key and nothing protected."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12

from certgate.pki.authority import Authority, Names
from certgate.pki.keys import KeyAlgorithm, generate_key, private_key_pem
from certgate.pki.keystore import MasterKey
from tests.keyscan import clear_keys, scan

EC = generate_key()
RSA = generate_key(KeyAlgorithm.RSA_2048)
CERT = Authority().create_root(EC, Names("scan test"))
Enc, Fmt = serialization.Encoding, serialization.PrivateFormat


def der(key: object, fmt: serialization.PrivateFormat) -> bytes:
    assert hasattr(key, "private_bytes")
    return bytes(key.private_bytes(Enc.DER, fmt, serialization.NoEncryption()))


CLEAR = {
    "pkcs8 pem": private_key_pem(EC),
    "sec1 pem": EC.private_bytes(Enc.PEM, Fmt.TraditionalOpenSSL, serialization.NoEncryption()),
    "pkcs1 pem": RSA.private_bytes(Enc.PEM, Fmt.TraditionalOpenSSL, serialization.NoEncryption()),
    "pkcs8 der inside other bytes": os.urandom(100) + der(EC, Fmt.PKCS8) + os.urandom(50),
    "sec1 der": der(EC, Fmt.TraditionalOpenSSL),
    "rsa pkcs8 der": der(RSA, Fmt.PKCS8),
    "base64 der in json": json.dumps({"k": base64.b64encode(der(EC, Fmt.PKCS8)).decode()}).encode(),
    "pem in json": json.dumps({"tunnel_key": private_key_pem(EC).decode()}).encode(),
    "pkcs12 without password": pkcs12.serialize_key_and_certificates(
        b"x", EC, CERT, None, serialization.NoEncryption()
    ),
}
PROTECTED = {
    "encrypted pem": private_key_pem(EC, b"passphrase"),
    "pkcs12 with password": pkcs12.serialize_key_and_certificates(
        b"x", EC, CERT, None, BestAvailableEncryption(b"passphrase")
    ),
    "sealed": MasterKey(os.urandom(32)).seal(EC, "label"),
    "certificate": CERT.public_bytes(Enc.PEM) + CERT.public_bytes(Enc.DER),
    "random": os.urandom(4096),
}


@pytest.mark.parametrize("name", sorted(CLEAR))
def test_a_clear_key_is_found(name: str) -> None:
    assert clear_keys(CLEAR[name]), name


@pytest.mark.parametrize("name", sorted(PROTECTED))
def test_a_protected_key_is_not_a_finding(name: str) -> None:
    assert clear_keys(PROTECTED[name]) == []


def test_scan_names_the_file_and_lists_key_files_apart(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "leak.db").write_bytes(CLEAR["pkcs8 der inside other bytes"])
    (tmp_path / "a" / "ok.pem").write_bytes(PROTECTED["encrypted pem"])
    (tmp_path / "node.key").write_bytes(b"c2VjcmV0")
    (tmp_path / "node.key").chmod(0o600)
    findings, key_files = scan(tmp_path)
    assert list(findings) == [tmp_path / "a" / "b" / "leak.db"]
    assert key_files == {tmp_path / "node.key": 0o600}
