"""The signing authority: chains that real verifiers accept, CSR checks, CRLs.

Chains are checked by the real ``openssl verify`` (the same code HAProxy and most TLS
stacks run), so a profile mistake that our own code would not notice still fails here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from certgate.errors import InvalidCSR, PKIError
from certgate.pki import identity
from certgate.pki.authority import MAX_CSR_BYTES, Authority, Issuer, Names, parse_csr, utcnow
from certgate.pki.keys import KeyAlgorithm, generate_key
from certgate.pki.profiles import DEVICE_CLIENT, INTERMEDIATE_CA
from certgate.pki.verify import verify_client_chain, verify_server_chain
from tests.pki.conftest import (
    DEVICE_UID,
    GROUP,
    Hierarchy,
    openssl_verify,
    write_hierarchy,
    write_pem,
)

ISSUING_CA = {
    "device": "device-root",
    "app": "device-root",
    "admin": "admin-ca",
    "tunnel": "secure-channel-root",
    "console": "secure-channel-root",
}
CLIENT_ONLY = ("device", "app", "admin", "console")
DEVICE_NAMES = Names(f"device {DEVICE_UID}", identity.device(DEVICE_UID, GROUP))


# --- chains checked by openssl -------------------------------------------------------


@pytest.mark.parametrize(("leaf", "ca"), ISSUING_CA.items())
def test_openssl_accepts_every_leaf_as_tls_client(pem_dir: Path, leaf: str, ca: str) -> None:
    result = openssl_verify(
        pem_dir / "root.pem", pem_dir / f"{ca}.pem", pem_dir / f"{leaf}.pem", "sslclient"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{pem_dir / leaf}.pem: OK"


def test_openssl_accepts_tunnel_identity_as_tls_server(pem_dir: Path) -> None:
    result = openssl_verify(
        pem_dir / "root.pem",
        pem_dir / "secure-channel-root.pem",
        pem_dir / "tunnel.pem",
        "sslserver",
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("leaf", CLIENT_ONLY)
def test_openssl_refuses_client_only_leaf_as_tls_server(pem_dir: Path, leaf: str) -> None:
    ca = ISSUING_CA[leaf]
    result = openssl_verify(
        pem_dir / "root.pem", pem_dir / f"{ca}.pem", pem_dir / f"{leaf}.pem", "sslserver"
    )
    assert result.returncode != 0
    assert "unsuitable certificate purpose" in result.stdout + result.stderr


def test_openssl_refuses_leaf_with_sibling_intermediate(pem_dir: Path) -> None:
    result = openssl_verify(
        pem_dir / "root.pem",
        pem_dir / "secure-channel-root.pem",
        pem_dir / "device.pem",
        "sslclient",
    )
    assert result.returncode != 0
    assert "unable to get local issuer certificate" in result.stdout + result.stderr


def test_openssl_refuses_leaf_under_another_root(pem_dir: Path, rsa_hierarchy: Hierarchy) -> None:
    other_root = write_pem(pem_dir.parent / "other-root.pem", [rsa_hierarchy.root.cert])
    result = openssl_verify(
        other_root, pem_dir / "device-root.pem", pem_dir / "device.pem", "sslclient"
    )
    assert result.returncode != 0


# --- RSA hierarchies -----------------------------------------------------------------


def test_rsa_hierarchy_has_requested_key_sizes(rsa_hierarchy: Hierarchy) -> None:
    assert isinstance(rsa_hierarchy.root.key, rsa.RSAPrivateKey)
    assert rsa_hierarchy.root.key.key_size == 3072
    for issuer in rsa_hierarchy.intermediates.values():
        assert isinstance(issuer.key, rsa.RSAPrivateKey)
        assert issuer.key.key_size == 2048
    for leaf in rsa_hierarchy.leaves.values():
        assert isinstance(leaf.cert.public_key(), rsa.RSAPublicKey)
        assert isinstance(leaf.cert.signature_hash_algorithm, hashes.SHA256)


@pytest.mark.parametrize(("leaf", "purpose"), [("device", "sslclient"), ("tunnel", "sslserver")])
def test_rsa_hierarchy_verifies_with_openssl(
    tmp_path: Path, rsa_hierarchy: Hierarchy, leaf: str, purpose: str
) -> None:
    pems = write_hierarchy(tmp_path, rsa_hierarchy)
    ca = ISSUING_CA[leaf]
    result = openssl_verify(pems / "root.pem", pems / f"{ca}.pem", pems / f"{leaf}.pem", purpose)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rsa_hierarchy_verifies_with_policy_builder(rsa_hierarchy: Hierarchy) -> None:
    device = rsa_hierarchy.leaves["device"]
    root = rsa_hierarchy.root.cert
    chain = verify_client_chain(device.cert, [device.issuer.cert], [root])
    assert chain == [device.cert, device.issuer.cert, root]
    tunnel = rsa_hierarchy.leaves["tunnel"]
    verify_server_chain(tunnel.cert, [tunnel.issuer.cert], [root], "tunnel.example.test")


@pytest.mark.parametrize(
    ("algorithm", "kind", "bits"),
    [
        (KeyAlgorithm.EC_P256, ec.EllipticCurvePrivateKey, 256),
        (KeyAlgorithm.RSA_2048, rsa.RSAPrivateKey, 2048),
    ],
)
def test_generate_key_follows_algorithm(algorithm: KeyAlgorithm, kind: type, bits: int) -> None:
    key = generate_key(algorithm)
    assert isinstance(key, kind)
    assert key.key_size == bits


# --- issuing: refusals ---------------------------------------------------------------


def test_leaf_cannot_act_as_issuer(hierarchy: Hierarchy) -> None:
    leaf = hierarchy.leaves["tunnel"]
    with pytest.raises(PKIError, match=r"^issuer is not a CA$"):
        Authority().issue(
            Issuer(leaf.cert, leaf.key), DEVICE_CLIENT, DEVICE_NAMES, leaf.key.public_key()
        )


def test_intermediate_cannot_sign_a_ca(hierarchy: Hierarchy) -> None:
    key = generate_key()
    with pytest.raises(PKIError, match=r"pathLen 0"):
        Authority().issue(hierarchy.device_root, INTERMEDIATE_CA, Names("sub CA"), key.public_key())


def test_issuer_key_must_match_issuer_cert(hierarchy: Hierarchy) -> None:
    wrong = Issuer(hierarchy.device_root.cert, hierarchy.admin_ca.key)
    with pytest.raises(PKIError, match="issuer key does not match issuer certificate"):
        Authority().issue(wrong, DEVICE_CLIENT, DEVICE_NAMES, generate_key().public_key())


def test_root_needs_a_ca_profile() -> None:
    with pytest.raises(PKIError, match="a root needs a CA profile"):
        Authority().create_root(generate_key(), Names("root"), DEVICE_CLIENT)


@pytest.mark.parametrize("common_name", ["", "x" * 65])
def test_common_name_length_is_bounded(hierarchy: Hierarchy, common_name: str) -> None:
    with pytest.raises(PKIError, match="common name must be 1-64 characters"):
        Authority().issue(
            hierarchy.device_root, DEVICE_CLIENT, Names(common_name), generate_key().public_key()
        )


@pytest.mark.parametrize(
    ("make_key", "message"),
    [
        (ed25519.Ed25519PrivateKey.generate, "unsupported key type Ed25519PublicKey"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), "unsupported curve secp521r1"),
        (lambda: rsa.generate_private_key(65537, 1024), "RSA key of 1024 bits is too small"),
    ],
    ids=["ed25519", "p-521", "rsa-1024"],
)
def test_issue_refuses_unsupported_keys(
    hierarchy: Hierarchy, make_key: Callable[[], PrivateKeyTypes], message: str
) -> None:
    public_key = make_key().public_key()
    with pytest.raises(PKIError, match=f"^{re.escape(message)}"):
        Authority().issue(hierarchy.device_root, DEVICE_CLIENT, DEVICE_NAMES, public_key)


# --- CSR validation ------------------------------------------------------------------


def make_csr(
    key: CertificateIssuerPrivateKeyTypes,
    *,
    common_name: str = "requester",
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    for extension, critical in extensions or []:
        builder = builder.add_extension(extension, critical=critical)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, algorithm)
    return csr.public_bytes(Encoding.PEM)


def test_valid_csr_parses() -> None:
    key = generate_key()
    csr = parse_csr(make_csr(key))
    assert csr.public_key() == key.public_key()


@pytest.mark.parametrize(
    "data", [b"", b"not a CSR at all", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"]
)
def test_malformed_pem_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidCSR, match=r"^CSR is not a valid PEM PKCS#10 request"):
        parse_csr(data)


def test_der_instead_of_pem_is_refused() -> None:
    der = x509.load_pem_x509_csr(make_csr(generate_key())).public_bytes(Encoding.DER)
    with pytest.raises(InvalidCSR, match=r"^CSR is not a valid PEM PKCS#10 request"):
        parse_csr(der)


def test_tampered_self_signature_is_refused() -> None:
    der = bytearray(x509.load_pem_x509_csr(make_csr(generate_key())).public_bytes(Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's ``s``: still valid DER
    pem = x509.load_der_x509_csr(bytes(der)).public_bytes(Encoding.PEM)
    with pytest.raises(InvalidCSR, match=r"^CSR self-signature does not verify \(no proof"):
        parse_csr(pem)


# DER of the prime256v1 curve OID and of ecdsa-with-SHA256, and same-length unknown OIDs.
P256_OID, UNKNOWN_CURVE_OID = (
    bytes.fromhex("06082a8648ce3d030107"),
    bytes.fromhex("06082a8648ce3d03017f"),
)
ES256_OID, UNKNOWN_SIG_OID = (
    bytes.fromhex("06082a8648ce3d040302"),
    bytes.fromhex("06082a8648ce3d04037f"),
)


def csr_with_oid_replaced(old: bytes, new: bytes) -> bytes:
    der = x509.load_pem_x509_csr(make_csr(generate_key())).public_bytes(Encoding.DER)
    assert der.count(old) == 1
    return x509.load_der_x509_csr(der.replace(old, new)).public_bytes(Encoding.PEM)


def test_csr_with_unknown_curve_is_refused() -> None:
    # cryptography raises UnsupportedAlgorithm for such keys (as for SM2): it must not leak.
    csr = csr_with_oid_replaced(P256_OID, UNKNOWN_CURVE_OID)
    message = "CSR uses an unsupported algorithm: Curve 1.2.840.10045.3.1.127 is not supported"
    with pytest.raises(InvalidCSR, match=f"^{re.escape(message)}$"):
        parse_csr(csr)


def test_csr_with_unknown_signature_algorithm_is_refused() -> None:
    csr = csr_with_oid_replaced(ES256_OID, UNKNOWN_SIG_OID)
    with pytest.raises(InvalidCSR, match=r"^CSR self-signature does not verify"):
        parse_csr(csr)


def test_csr_requesting_ca_is_refused() -> None:
    csr = make_csr(generate_key(), extensions=[(x509.BasicConstraints(True, None), True)])
    with pytest.raises(InvalidCSR, match=r"^CSR requests CA:TRUE; certgate issues only end-entity"):
        parse_csr(csr)


def test_csr_with_ca_false_is_accepted() -> None:
    parse_csr(make_csr(generate_key(), extensions=[(x509.BasicConstraints(False, None), True)]))


@pytest.mark.parametrize(
    ("make_key", "message"),
    [
        (
            lambda: rsa.generate_private_key(65537, 1024),
            "CSR key rejected: RSA key of 1024 bits is too small (minimum 2048)",
        ),
        (
            lambda: ec.generate_private_key(ec.SECP192R1()),
            "CSR key rejected: unsupported curve secp192r1; use P-256 or P-384",
        ),
        (
            lambda: ec.generate_private_key(ec.SECP521R1()),
            "CSR key rejected: unsupported curve secp521r1; use P-256 or P-384",
        ),
        (
            ed25519.Ed25519PrivateKey.generate,
            "CSR key rejected: unsupported key type Ed25519PublicKey; use ECDSA or RSA",
        ),
    ],
    ids=["rsa-1024", "p-192", "p-521", "ed25519"],
)
def test_weak_or_unsupported_csr_keys_are_refused(
    make_key: Callable[[], CertificateIssuerPrivateKeyTypes], message: str
) -> None:
    with pytest.raises(InvalidCSR, match=f"^{re.escape(message)}$"):
        parse_csr(make_csr(make_key()))


def test_oversize_csr_is_refused_before_parsing() -> None:
    names = [x509.DNSName(f"host-{i:04d}.a-rather-long-domain.example") for i in range(500)]
    csr = make_csr(generate_key(), extensions=[(x509.SubjectAlternativeName(names), False)])
    assert len(csr) > MAX_CSR_BYTES
    expected = f"CSR is {len(csr)} bytes; the limit is {MAX_CSR_BYTES}"
    with pytest.raises(InvalidCSR, match=f"^{re.escape(expected)}$"):
        parse_csr(csr)


def test_csr_at_the_limit_is_parsed() -> None:
    csr = make_csr(generate_key())
    padded = csr + b"\n" * (MAX_CSR_BYTES - len(csr))
    assert len(padded) == MAX_CSR_BYTES
    parse_csr(padded)


def test_issue_from_csr_refuses_invalid_csr(hierarchy: Hierarchy) -> None:
    with pytest.raises(InvalidCSR):
        Authority().issue_from_csr(hierarchy.device_root, DEVICE_CLIENT, DEVICE_NAMES, b"junk")


def test_issue_from_csr_ignores_requested_subject_and_sans(hierarchy: Hierarchy) -> None:
    key = generate_key()
    requested = x509.SubjectAlternativeName(
        [
            x509.DNSName("evil.example"),
            x509.UniformResourceIdentifier(identity.admin("0" * 32).uri()),
        ]
    )
    csr = make_csr(key, common_name="certgate Root CA", extensions=[(requested, False)])
    cert = Authority().issue_from_csr(hierarchy.device_root, DEVICE_CLIENT, DEVICE_NAMES, csr)
    assert cert.public_key() == key.public_key()
    assert cert.subject == DEVICE_NAMES.subject()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(DEVICE_NAMES.identity.uri())]  # type: ignore[union-attr]
    assert cert.issuer == hierarchy.device_root.cert.subject


# --- CRLs ----------------------------------------------------------------------------

NOW = utcnow().replace(microsecond=0)


def fixed_authority(at: datetime = NOW) -> Authority:
    return Authority(clock=lambda: at)


def test_crl_is_signed_by_the_issuer_and_lists_revocations(hierarchy: Hierarchy) -> None:
    issuer = hierarchy.device_root
    revoked = [
        (2**100 + 1, NOW - timedelta(days=2), x509.ReasonFlags.key_compromise),
        (2**120 + 7, NOW - timedelta(hours=1), x509.ReasonFlags.superseded),
    ]
    crl = fixed_authority().sign_crl(issuer, revoked, 42, NOW + timedelta(days=7))
    assert crl.is_signature_valid(issuer.key.public_key())
    assert not crl.is_signature_valid(hierarchy.admin_ca.key.public_key())
    assert crl.issuer == issuer.cert.subject
    assert crl.last_update_utc == NOW
    assert crl.next_update_utc == NOW + timedelta(days=7)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 42
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert len(crl) == 2
    for serial, when, reason in revoked:
        entry = crl.get_revoked_certificate_by_serial_number(serial)
        assert entry is not None
        assert entry.revocation_date_utc == when
        assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is reason


def test_empty_crl_is_valid(hierarchy: Hierarchy) -> None:
    crl = fixed_authority().sign_crl(hierarchy.device_root, [], 1, NOW + timedelta(days=1))
    assert len(crl) == 0
    assert crl.is_signature_valid(hierarchy.device_root.key.public_key())
    assert (
        crl.get_revoked_certificate_by_serial_number(hierarchy.leaves["device"].cert.serial_number)
        is None
    )


def test_crl_of_p384_issuer_uses_sha384() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    root = Issuer(Authority().create_root(key, Names("P-384 root")), key)
    crl = fixed_authority().sign_crl(root, [], 1, NOW + timedelta(days=1))
    assert isinstance(crl.signature_hash_algorithm, hashes.SHA384)
