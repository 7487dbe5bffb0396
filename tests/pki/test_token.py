"""CA keys in a real PKCS#11 token (SoftHSM v2): generated inside, never extractable, and
``Authority`` signing through it; every token failure is a clear ``Unavailable``."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from certgate.errors import Unavailable
from certgate.pki import identity
from certgate.pki.authority import Authority, Issuer, Names
from certgate.pki.keys import KeyAlgorithm, generate_key
from certgate.pki.profiles import DEVICE_CLIENT, INTERMEDIATE_CA
from certgate.pki.token import Token, TokenConfig
from tests.softhsm import MODULE, PIN_ENV, SoftHSM

AUTHORITY = Authority()
DEVICE = identity.device("ab" * 16, "g1")


def hierarchy(token: Token, algorithm: KeyAlgorithm) -> tuple[Issuer, Issuer]:
    """A root and an intermediate whose keys are both in ``token``."""
    root_key = token.generate("ca:root", algorithm)
    root = Issuer(AUTHORITY.create_root(root_key, Names("token root")), root_key)
    sub_key = token.generate("ca:device-root", algorithm)
    sub_cert = AUTHORITY.issue(root, INTERMEDIATE_CA, Names("token sub"), sub_key.public_key())
    return root, Issuer(sub_cert, sub_key)


def openssl_verify(tmp_path: Path, root: x509.Certificate, *chain: x509.Certificate) -> str:
    paths = []
    for n, cert in enumerate((root, *chain)):
        paths.append(tmp_path / f"{n}.pem")
        paths[-1].write_bytes(cert.public_bytes(Encoding.PEM))
    args = ["openssl", "verify", "-CAfile", str(paths[0])]
    args += [arg for p in paths[1:-1] for arg in ("-untrusted", str(p))]
    result = subprocess.run([*args, str(paths[-1])], capture_output=True, text=True, check=False)
    return result.stdout + result.stderr


def test_a_token_key_is_sensitive_and_never_extractable(softhsm: SoftHSM) -> None:
    token = Token(softhsm.config("authority"))
    key = token.generate("ca:check", KeyAlgorithm.EC_P256)
    session = token._open()
    private = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label="ca:check")
    assert private[pkcs11.Attribute.SENSITIVE] is True
    assert private[pkcs11.Attribute.EXTRACTABLE] is False
    with pytest.raises(pkcs11.PKCS11Error):  # CKR_ATTRIBUTE_SENSITIVE: the value stays inside
        private[pkcs11.Attribute.VALUE]
    expected = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    assert private[pkcs11.Attribute.ID] == expected
    token.close()


def test_the_authority_signs_certificates_in_the_token(softhsm: SoftHSM, tmp_path: Path) -> None:
    token = Token(softhsm.config("authority"))
    root, sub = hierarchy(token, KeyAlgorithm.EC_P256)
    leaf_key = generate_key()
    leaf = AUTHORITY.issue(sub, DEVICE_CLIENT, Names("dev", DEVICE), leaf_key.public_key())
    root.cert.verify_directly_issued_by(root.cert)
    sub.cert.verify_directly_issued_by(root.cert)
    leaf.verify_directly_issued_by(sub.cert)
    assert leaf.signature_algorithm_oid == x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256
    assert identity.identity_of(leaf) == DEVICE
    assert ": OK" in openssl_verify(tmp_path, root.cert, sub.cert, leaf)
    token.close()


def test_rsa_keys_in_the_token_sign_certificates_and_crls(softhsm: SoftHSM) -> None:
    token = Token(softhsm.config("rsa"))
    root, sub = hierarchy(token, KeyAlgorithm.RSA_2048)
    assert isinstance(sub.key.public_key(), rsa.RSAPublicKey)
    sub.cert.verify_directly_issued_by(root.cert)
    now = datetime.now(UTC)
    revoked = [(12345, now, x509.ReasonFlags.key_compromise)]
    crl = AUTHORITY.sign_crl(sub, revoked, 7, now + timedelta(days=1))
    public = sub.cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    assert crl.is_signature_valid(public)
    assert crl.get_revoked_certificate_by_serial_number(12345) is not None
    assert crl.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSA_WITH_SHA256
    token.close()


def issue_with(config: TokenConfig, issuer: Issuer) -> x509.Certificate:
    key = issuer.key
    assert not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    moved = Issuer(issuer.cert, Token(config).key(key.label, key.public_key()))
    return AUTHORITY.issue(moved, DEVICE_CLIENT, Names("dev", DEVICE), generate_key().public_key())


@pytest.fixture
def token_issuer(softhsm: SoftHSM) -> Issuer:
    token = Token(softhsm.config("failures"))
    _, sub = hierarchy(token, KeyAlgorithm.EC_P256)
    token.close()
    return sub


def test_a_wrong_pin_is_named(
    softhsm: SoftHSM, token_issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PIN_ENV, "not-the-pin")
    with pytest.raises(Unavailable, match=rf"'failures'.*the PIN in \${PIN_ENV} is wrong"):
        issue_with(softhsm.config("failures"), token_issuer)


def test_a_missing_pin_is_named(
    softhsm: SoftHSM, token_issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PIN_ENV)
    with pytest.raises(Unavailable, match=rf"the PIN variable \${PIN_ENV} is not set"):
        issue_with(softhsm.config("failures"), token_issuer)


def test_a_missing_module_or_token_is_named(softhsm: SoftHSM, token_issuer: Issuer) -> None:
    with pytest.raises(Unavailable, match=r"PKCS#11 module /nowhere/libp11\.so does not exist"):
        issue_with(TokenConfig("/nowhere/libp11.so", "failures", PIN_ENV), token_issuer)
    with pytest.raises(Unavailable, match=r"'absent'.*the token is not present"):
        issue_with(TokenConfig(MODULE, "absent", PIN_ENV), token_issuer)


def test_a_key_missing_from_the_token_is_named(softhsm: SoftHSM, token_issuer: Issuer) -> None:
    # The certificate's key, under a label the token does not hold: never another key.
    key = Token(softhsm.config("failures")).key("ca:other", token_issuer.cert.public_key())
    with pytest.raises(Unavailable, match=r"sign with key 'ca:other'.*not in the token"):
        AUTHORITY.issue(
            Issuer(token_issuer.cert, key), DEVICE_CLIENT, Names("x"), generate_key().public_key()
        )


def test_a_removed_token_fails_and_a_fixed_pin_recovers(
    softhsm: SoftHSM, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = Token(softhsm.config("removed"))
    _, sub = hierarchy(token, KeyAlgorithm.EC_P256)
    leaf_key = generate_key().public_key()
    monkeypatch.setenv(PIN_ENV, "wrong")
    token.close()
    with pytest.raises(Unavailable, match="PIN"):
        AUTHORITY.issue(sub, DEVICE_CLIENT, Names("x"), leaf_key)
    monkeypatch.setenv(PIN_ENV, softhsm.pin)  # the session was dropped: the next call logs in
    AUTHORITY.issue(sub, DEVICE_CLIENT, Names("x"), leaf_key).verify_directly_issued_by(sub.cert)
    softhsm.delete("removed")  # the open session outlives its token
    with pytest.raises(Unavailable, match=r"'removed'.*not in the token"):
        AUTHORITY.issue(sub, DEVICE_CLIENT, Names("x"), leaf_key)
    with pytest.raises(Unavailable, match=r"'removed'.*the token is not present"):
        AUTHORITY.issue(sub, DEVICE_CLIENT, Names("x"), leaf_key)
