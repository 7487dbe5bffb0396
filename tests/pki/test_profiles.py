"""Every certificate the authority issues, checked field by field (in the style of trustme's
tests): version, BasicConstraints, all nine KeyUsage bits, EKU, key identifiers, serial,
SAN, validity window and signature hash (RFC 5280 §4.1, §4.2.1)."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import timedelta
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from certgate.pki.authority import Authority, Issuer, Names, utcnow
from certgate.pki.keys import generate_key
from certgate.pki.profiles import (
    ACCESS_TLS,
    CA_USAGE,
    CONSOLE_TLS,
    DAY,
    DEVICE_CLIENT,
    INTERMEDIATE_CA,
    LEAF_USAGE,
    MAX_SERVER_TLS_LIFETIME,
    SERVICE_TLS,
    TUNNEL_IDENTITY,
    KeyUsageFlags,
    Profile,
)
from tests.pki.conftest import (
    ADMIN_ID,
    BUNDLE_ID,
    DEVICE_UID,
    GROUP,
    LEAF_NAMES,
    TUNNEL_DNS,
    TUNNEL_IPS,
    Hierarchy,
)

SERVER = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH
CA_PATH_LENGTH = {"root": 1, "secure-channel-root": 0, "device-root": 0, "admin-ca": 0}
LEAF_EKU = {
    "device": [CLIENT],
    "app": [CLIENT],
    "admin": [CLIENT],
    "tunnel": [SERVER, CLIENT],
    "console": [CLIENT],
}
LEAF_URI = {
    "device": f"urn:certgate:device:{DEVICE_UID}:group:{GROUP}",
    "app": f"urn:certgate:device:{DEVICE_UID}:group:{GROUP}:app:{BUNDLE_ID}",
    "admin": f"urn:certgate:admin:{ADMIN_ID}",
    "tunnel": f"urn:certgate:tunnel:group:{GROUP}",
    "console": f"urn:certgate:console:group:{GROUP}",
}
# The DER of the KeyUsage BIT STRING pins all nine bits at once (RFC 5280 §4.2.1.3):
# CA: digitalSignature(0), keyCertSign(5), cRLSign(6) -> 1000 0110, 1 unused bit.
# Leaf: digitalSignature(0) only -> 1000 0000, 7 unused bits.
CA_KEY_USAGE_DER = bytes.fromhex("03020186")
LEAF_KEY_USAGE_DER = bytes.fromhex("03020780")
ALL_CERTS = (*CA_PATH_LENGTH, *LEAF_NAMES)
E = TypeVar("E", bound=x509.ExtensionType)


def issuer_of(hierarchy: Hierarchy, name: str) -> Issuer:
    if name in CA_PATH_LENGTH:  # the root signs itself and the intermediates
        return hierarchy.root
    return hierarchy.leaves[name].issuer


def cert_of(hierarchy: Hierarchy, name: str) -> x509.Certificate:
    if name == "root":
        return hierarchy.root.cert
    if name in CA_PATH_LENGTH:
        return hierarchy.intermediates[name].cert
    return hierarchy.leaves[name].cert


def extension(cert: x509.Certificate, kind: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(kind)


@pytest.mark.parametrize("name", ALL_CERTS)
def test_version_is_v3(hierarchy: Hierarchy, name: str) -> None:
    assert cert_of(hierarchy, name).version is x509.Version.v3


@pytest.mark.parametrize("name", ALL_CERTS)
def test_subject_and_issuer_names(hierarchy: Hierarchy, name: str) -> None:
    cert = cert_of(hierarchy, name)
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "certgate"
    assert len(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)) == 1
    assert cert.issuer == issuer_of(hierarchy, name).cert.subject


@pytest.mark.parametrize(("name", "path_length"), CA_PATH_LENGTH.items())
def test_ca_basic_constraints(hierarchy: Hierarchy, name: str, path_length: int) -> None:
    ext = extension(cert_of(hierarchy, name), x509.BasicConstraints)
    assert ext.critical is True
    assert ext.value.ca is True
    assert ext.value.path_length == path_length


@pytest.mark.parametrize("name", LEAF_NAMES)
def test_leaf_basic_constraints(hierarchy: Hierarchy, name: str) -> None:
    ext = extension(cert_of(hierarchy, name), x509.BasicConstraints)
    assert ext.critical is True
    assert ext.value.ca is False
    assert ext.value.path_length is None


@pytest.mark.parametrize("name", CA_PATH_LENGTH)
def test_ca_key_usage(hierarchy: Hierarchy, name: str) -> None:
    ext = extension(cert_of(hierarchy, name), x509.KeyUsage)
    usage = ext.value
    assert ext.critical is True
    assert usage.digital_signature is True
    assert usage.content_commitment is False
    assert usage.key_encipherment is False
    assert usage.data_encipherment is False
    assert usage.key_agreement is False
    assert usage.key_cert_sign is True
    assert usage.crl_sign is True
    assert_no_encipher_decipher_only(usage)
    assert usage.public_bytes() == CA_KEY_USAGE_DER


@pytest.mark.parametrize("name", LEAF_NAMES)
def test_leaf_key_usage(hierarchy: Hierarchy, name: str) -> None:
    ext = extension(cert_of(hierarchy, name), x509.KeyUsage)
    usage = ext.value
    assert ext.critical is True
    assert usage.digital_signature is True
    assert usage.content_commitment is False
    assert usage.key_encipherment is False
    assert usage.data_encipherment is False
    assert usage.key_agreement is False
    assert usage.key_cert_sign is False
    assert usage.crl_sign is False
    assert_no_encipher_decipher_only(usage)
    assert usage.public_bytes() == LEAF_KEY_USAGE_DER


def assert_no_encipher_decipher_only(usage: x509.KeyUsage) -> None:
    # cryptography refuses to read these bits unless keyAgreement is set: both are absent.
    with pytest.raises(ValueError, match="encipher_only is undefined"):
        _ = usage.encipher_only
    with pytest.raises(ValueError, match="decipher_only is undefined"):
        _ = usage.decipher_only


@pytest.mark.parametrize(("name", "ekus"), LEAF_EKU.items())
def test_leaf_extended_key_usage(hierarchy: Hierarchy, name: str, ekus: list[object]) -> None:
    ext = extension(cert_of(hierarchy, name), x509.ExtendedKeyUsage)
    assert ext.critical is False
    assert list(ext.value) == ekus


@pytest.mark.parametrize("name", CA_PATH_LENGTH)
def test_cas_carry_no_eku(hierarchy: Hierarchy, name: str) -> None:
    with pytest.raises(x509.ExtensionNotFound):
        extension(cert_of(hierarchy, name), x509.ExtendedKeyUsage)


def sha1_key_id(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """RFC 5280 §4.2.1.2 method (1): SHA-1 of the subjectPublicKey BIT STRING contents."""
    point = public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return hashlib.sha1(point).digest()


@pytest.mark.parametrize("name", ALL_CERTS)
def test_subject_key_identifier_is_the_keys(hierarchy: Hierarchy, name: str) -> None:
    cert = cert_of(hierarchy, name)
    ext = extension(cert, x509.SubjectKeyIdentifier)
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert ext.critical is False
    assert ext.value.digest == sha1_key_id(public_key)
    if name in LEAF_NAMES:
        assert cert.public_key() == hierarchy.leaves[name].key.public_key()


@pytest.mark.parametrize("name", ALL_CERTS)
def test_authority_key_identifier_is_issuers_ski(hierarchy: Hierarchy, name: str) -> None:
    cert = cert_of(hierarchy, name)
    issuer_ski = extension(issuer_of(hierarchy, name).cert, x509.SubjectKeyIdentifier).value
    ext = extension(cert, x509.AuthorityKeyIdentifier)
    assert ext.critical is False
    assert ext.value.key_identifier == issuer_ski.digest
    assert ext.value.authority_cert_issuer is None
    assert ext.value.authority_cert_serial_number is None


@pytest.mark.parametrize("name", ALL_CERTS)
def test_serial_is_large_and_positive(hierarchy: Hierarchy, name: str) -> None:
    # RFC 5280 §4.1.2.2: positive, at most 20 octets; CA/B BR: at least 64 random bits.
    assert 2**63 <= cert_of(hierarchy, name).serial_number < 2**159


def test_serials_are_distinct_across_1000_issues(hierarchy: Hierarchy) -> None:
    authority, public_key = Authority(), generate_key().public_key()
    names = Names("serial test")
    serials = {
        authority.issue(hierarchy.device_root, DEVICE_CLIENT, names, public_key).serial_number
        for _ in range(1000)
    }
    assert len(serials) == 1000
    assert all(2**63 <= s < 2**159 for s in serials)


@pytest.mark.parametrize(("name", "uri"), LEAF_URI.items())
def test_leaf_san_carries_identity_uri(hierarchy: Hierarchy, name: str, uri: str) -> None:
    ext = extension(cert_of(hierarchy, name), x509.SubjectAlternativeName)
    assert ext.critical is False
    assert ext.value.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    if name != "tunnel":
        assert list(ext.value) == [x509.UniformResourceIdentifier(uri)]


def test_tunnel_san_carries_dns_and_ip(hierarchy: Hierarchy) -> None:
    san = extension(cert_of(hierarchy, "tunnel"), x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == list(TUNNEL_DNS)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert ips == list(TUNNEL_IPS)


@pytest.mark.parametrize("name", CA_PATH_LENGTH)
def test_cas_carry_no_san(hierarchy: Hierarchy, name: str) -> None:
    with pytest.raises(x509.ExtensionNotFound):
        extension(cert_of(hierarchy, name), x509.SubjectAlternativeName)


@pytest.mark.parametrize("name", LEAF_NAMES)
def test_leaf_validity_is_the_profiles(hierarchy: Hierarchy, name: str) -> None:
    leaf = hierarchy.leaves[name]
    lifetime = leaf.cert.not_valid_after_utc - leaf.cert.not_valid_before_utc
    assert lifetime == leaf.profile.validity + leaf.profile.backdate


NOW = utcnow().replace(microsecond=0)


def at_now() -> Authority:
    return Authority(clock=lambda: NOW)


def test_not_before_is_backdated_and_not_after_follows_profile(hierarchy: Hierarchy) -> None:
    cert = at_now().issue(
        hierarchy.device_root, DEVICE_CLIENT, Names("window"), generate_key().public_key()
    )
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + 365 * DAY


def test_not_after_is_capped_at_issuers() -> None:
    short_root = Profile("short-root", 30 * DAY, True, CA_USAGE, path_length=1)
    key = generate_key()
    root = Issuer(at_now().create_root(key, Names("short root"), short_root), key)
    intermediate_key = generate_key()
    intermediate = Issuer(
        at_now().issue(root, INTERMEDIATE_CA, Names("capped CA"), intermediate_key.public_key()),
        intermediate_key,
    )
    leaf = at_now().issue(intermediate, DEVICE_CLIENT, Names("leaf"), generate_key().public_key())
    assert root.cert.not_valid_after_utc == NOW + 30 * DAY
    assert intermediate.cert.not_valid_after_utc == root.cert.not_valid_after_utc
    assert leaf.not_valid_after_utc == root.cert.not_valid_after_utc


def test_p384_issuer_signs_with_sha384() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    root = Issuer(Authority().create_root(key, Names("P-384 root")), key)
    leaf = Authority().issue(root, DEVICE_CLIENT, Names("leaf"), generate_key().public_key())
    for cert in (root.cert, leaf):
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA384)
        assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA384
    leaf.verify_directly_issued_by(root.cert)  # raises on a bad signature


@pytest.mark.parametrize("name", ALL_CERTS)
def test_p256_issuers_sign_with_sha256(hierarchy: Hierarchy, name: str) -> None:
    cert = cert_of(hierarchy, name)
    assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    cert.verify_directly_issued_by(issuer_of(hierarchy, name).cert)


def test_profile_refuses_ca_with_eku() -> None:
    with pytest.raises(ValueError, match="profile bad: CA profiles carry no EKU"):
        Profile("bad", DAY, True, CA_USAGE, (SERVER,))


def test_profile_refuses_leaf_with_path_length() -> None:
    with pytest.raises(ValueError, match="profile bad: a leaf cannot sign certificates"):
        Profile("bad", DAY, False, LEAF_USAGE, (CLIENT,), path_length=0)


def test_profile_refuses_leaf_with_key_cert_sign() -> None:
    with pytest.raises(ValueError, match="profile bad: a leaf cannot sign certificates"):
        Profile("bad", DAY, False, CA_USAGE, (CLIENT,))


def test_profile_refuses_leaf_without_eku() -> None:
    with pytest.raises(ValueError, match="profile bad: a leaf needs an EKU"):
        Profile("bad", DAY, False, LEAF_USAGE)


def test_key_usage_flags_spell_out_nine_bits_all_off_by_default() -> None:
    flags = KeyUsageFlags()
    assert len(dataclasses.fields(flags)) == 9
    assert not any(getattr(flags, f.name) for f in dataclasses.fields(flags))
    assert flags.extension() == x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


@pytest.mark.parametrize(
    "profile", [TUNNEL_IDENTITY, CONSOLE_TLS, SERVICE_TLS, ACCESS_TLS], ids=lambda p: p.name
)
def test_tls_server_certificates_live_at_most_398_days(
    hierarchy: Hierarchy, profile: Profile
) -> None:
    # Mozilla's limit, notBefore to notAfter, the backdate included.
    cert = Authority().issue(
        hierarchy.secure_channel_root,
        profile,
        Names("server", dns_names=TUNNEL_DNS),
        generate_key().public_key(),
    )
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= MAX_SERVER_TLS_LIFETIME
    assert (
        ExtendedKeyUsageOID.SERVER_AUTH
        in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
