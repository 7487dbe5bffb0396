"""Planning from real certificates: loading, classification, coverage, validity warnings.

``make_certificate`` and ``write_pem`` are reused by the HAProxy and CLI tests.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from cryptography.x509.oid import NameOID

from certgate.errors import BadRequest
from certgate.planner.certcheck import (
    CertificateMismatch,
    UnreadableCertificate,
    certificate_names,
    classify,
    decide_from_cert,
    load_certificate,
    parse_certificate,
)
from certgate.planner.matrix import CertType, InvalidName, LBMode, Namespace

NOW = datetime(2030, 6, 1, tzinfo=UTC)
VIP = "access.example.com"
SHARED_NODES = ("node1.example.com", "node2.example.com")
DMZ_NODES = ("node1.example.dmz", "node2.example.dmz")


def make_certificate(
    dns_names: Sequence[str] | None,
    *,
    common_name: str = "certgate test",
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    ip_addresses: Sequence[str] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed P-256 certificate; ``dns_names=None`` leaves out the SAN extension."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = not_before or datetime.now(UTC) - timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after or start + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    general: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names or ()]
    general += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    if dns_names is not None or ip_addresses:
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    return builder.sign(key, hashes.SHA256()), key


def write_pem(
    path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None
) -> Path:
    """Write the certificate (then the key, when given) as PEM; returns ``path``."""
    data = cert.public_bytes(Encoding.PEM)
    if key is not None:
        data += key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path.write_bytes(data)
    return path


def _cert(
    dns_names: Sequence[str] | None,
    *,
    common_name: str = "certgate test",
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    ip_addresses: Sequence[str] = (),
) -> x509.Certificate:
    """Just the certificate of :func:`make_certificate`."""
    cert, _key = make_certificate(
        dns_names,
        common_name=common_name,
        not_before=not_before,
        not_after=not_after,
        ip_addresses=ip_addresses,
    )
    return cert


# Loading ---------------------------------------------------------------------------------


def test_load_pem_der_and_chain_take_the_first_certificate(tmp_path: Path) -> None:
    leaf, key = make_certificate([VIP])
    issuer = _cert(["ca.example.com"])
    pem = write_pem(tmp_path / "leaf.pem", leaf)
    der = tmp_path / "leaf.der"
    der.write_bytes(leaf.public_bytes(Encoding.DER))
    chain = tmp_path / "chain.pem"
    chain.write_bytes(leaf.public_bytes(Encoding.PEM) + issuer.public_bytes(Encoding.PEM))
    key_first = tmp_path / "combined.pem"
    key_first.write_bytes(
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        + leaf.public_bytes(Encoding.PEM)
    )
    for path in (pem, der, chain, key_first):
        assert load_certificate(path) == leaf


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a certificate", "neither a PEM nor a DER"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "is PEM but"),
        (b"", "neither a PEM nor a DER"),
    ],
)
def test_unparseable_files_raise(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(UnreadableCertificate, match=message):
        load_certificate(path)


def test_pem_with_only_a_key_raises(tmp_path: Path) -> None:
    _leaf, key = make_certificate([VIP])
    path = tmp_path / "key.pem"
    path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    with pytest.raises(UnreadableCertificate, match="no readable CERTIFICATE"):
        load_certificate(path)


def test_missing_file_and_directory_raise_bad_request(tmp_path: Path) -> None:
    with pytest.raises(UnreadableCertificate, match=r"missing\.pem"):
        load_certificate(tmp_path / "missing.pem")
    with pytest.raises(BadRequest, match="cannot read certificate file"):
        load_certificate(tmp_path)
    assert issubclass(UnreadableCertificate, BadRequest)


def test_parse_certificate_accepts_bytes() -> None:
    cert = _cert([VIP])
    assert parse_certificate(cert.public_bytes(Encoding.DER)) == cert


# Classification --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dns_names", "expected"),
    [
        (["*.example.com"], CertType.WILDCARD),
        (["*.example.com", "example.com"], CertType.WILDCARD),
        ([VIP, *DMZ_NODES], CertType.SAN),
        ([VIP], CertType.SINGLE_HOST_CN),
    ],
)
def test_classify_from_san(dns_names: list[str], expected: CertType) -> None:
    names = certificate_names(_cert(dns_names, common_name="ignored.example.org"))
    assert names.from_common_name is False
    assert names.dns_names == tuple(dns_names)
    assert classify(names) is expected


def test_common_name_is_used_only_without_san() -> None:
    names = certificate_names(_cert(None, common_name=VIP))
    assert names.dns_names == (VIP,) and names.from_common_name is True
    with_ip_san = certificate_names(_cert(None, common_name=VIP, ip_addresses=["192.0.2.1"]))
    assert with_ip_san.dns_names == () and with_ip_san.from_common_name is False


# Decisions -------------------------------------------------------------------------------


def test_wildcard_shared_namespace_reencrypt_is_row_1() -> None:
    plan = decide_from_cert(_cert(["*.example.com"]), VIP, SHARED_NODES, LBMode.REENCRYPT, now=NOW)
    assert plan.port_5263_required is False
    assert (plan.from_table, plan.table_row) == (True, 1)
    assert plan.cert_type is CertType.WILDCARD and plan.namespace is Namespace.SHARED
    assert "node node1.example.com covered by *.example.com" in plan.reason
    assert plan.uncovered_names == () and plan.warnings == ()


def test_wildcard_disjoint_namespace_reencrypt_is_row_4() -> None:
    plan = decide_from_cert(_cert(["*.example.com"]), VIP, DMZ_NODES, LBMode.REENCRYPT, now=NOW)
    assert plan.port_5263_required is True
    assert (plan.from_table, plan.table_row) == (True, 4)
    assert plan.ports == (443, 5262, 5263)
    assert plan.uncovered_names == DMZ_NODES
    assert "node node1.example.dmz NOT covered" in plan.reason
    assert f"VIP {VIP} covered by *.example.com" in plan.reason


def test_san_with_vip_and_every_node_is_row_5() -> None:
    cert = _cert([VIP, *DMZ_NODES])
    plan = decide_from_cert(cert, VIP, DMZ_NODES, LBMode.REENCRYPT, now=NOW)
    assert plan.port_5263_required is False
    assert (plan.from_table, plan.table_row, plan.cert_type) == (True, 5, CertType.SAN)


def test_san_missing_a_node_needs_5263_despite_row_5() -> None:
    cert = _cert([VIP, DMZ_NODES[0]])
    plan = decide_from_cert(cert, VIP, DMZ_NODES, LBMode.REENCRYPT, now=NOW)
    assert plan.port_5263_required is True
    assert (plan.from_table, plan.table_row) == (False, None)
    assert plan.uncovered_names == (DMZ_NODES[1],)
    assert "Derived from the certificate, not from Table 1: row 5" in plan.reason
    assert f"node {DMZ_NODES[1]} NOT covered" in plan.reason


def test_single_host_reencrypt_is_row_2() -> None:
    plan = decide_from_cert(_cert([VIP]), VIP, SHARED_NODES, LBMode.REENCRYPT, now=NOW)
    assert plan.port_5263_required is True
    assert (plan.from_table, plan.table_row, plan.cert_type) == (True, 2, CertType.SINGLE_HOST_CN)


@pytest.mark.parametrize(
    ("dns_names", "nodes", "row"),
    [
        ([VIP, *DMZ_NODES], DMZ_NODES, 6),
        (["*.example.com"], SHARED_NODES, 3),
        ([VIP], SHARED_NODES, None),
        (["*.example.com"], DMZ_NODES, None),
        ([VIP], DMZ_NODES, None),
    ],
)
def test_passthrough_never_needs_5263(
    dns_names: list[str], nodes: tuple[str, ...], row: int | None
) -> None:
    plan = decide_from_cert(_cert(dns_names), VIP, nodes, LBMode.PASSTHROUGH, now=NOW)
    assert plan.port_5263_required is False
    assert plan.table_row == row and plan.from_table is (row is not None)
    if row is None:
        assert "Derived, not from Table 1" in plan.reason


def test_wildcard_covering_both_namespaces_departs_from_row_4() -> None:
    cert = _cert(["*.example.com", "*.example.dmz"])
    plan = decide_from_cert(cert, VIP, DMZ_NODES, LBMode.REENCRYPT, now=NOW)
    assert plan.port_5263_required is False
    assert plan.from_table is False and "row 4" in plan.reason


def test_nodes_nested_below_the_wildcard_are_not_covered() -> None:
    nodes = ("node1.site.example.com",)
    plan = decide_from_cert(_cert(["*.example.com"]), VIP, nodes, LBMode.REENCRYPT, now=NOW)
    assert plan.port_5263_required is True
    assert plan.namespace is Namespace.DISJOINT and plan.table_row == 4


@pytest.mark.parametrize("lb", list(LBMode))
def test_certificate_not_covering_vip_is_an_error(lb: LBMode) -> None:
    with pytest.raises(CertificateMismatch, match="does not cover the VIP FQDN"):
        decide_from_cert(_cert(["*.example.dmz"]), VIP, DMZ_NODES, lb, now=NOW)
    no_dns = _cert(None, ip_addresses=["192.0.2.1"])
    with pytest.raises(CertificateMismatch, match="no DNS names"):
        decide_from_cert(no_dns, VIP, DMZ_NODES, lb, now=NOW)


def test_common_name_fallback_is_reported() -> None:
    plan = decide_from_cert(_cert(None, common_name=VIP), VIP, SHARED_NODES, LBMode.REENCRYPT)
    assert "no subjectAltName" in plan.reason and "RFC 6125" in plan.reason
    assert any("subject CN" in warning for warning in plan.warnings)
    assert plan.port_5263_required is True


def test_validity_warnings() -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    cert = _cert(["*.example.com"], not_before=start, not_after=start + timedelta(days=90))
    expired = decide_from_cert(
        cert, VIP, SHARED_NODES, LBMode.PASSTHROUGH, now=start + timedelta(days=91)
    )
    assert len(expired.warnings) == 1 and "expired" in expired.warnings[0]
    early = decide_from_cert(
        cert, VIP, SHARED_NODES, LBMode.PASSTHROUGH, now=start - timedelta(days=1)
    )
    assert len(early.warnings) == 1 and "not yet valid" in early.warnings[0]
    valid = decide_from_cert(cert, VIP, SHARED_NODES, LBMode.PASSTHROUGH, now=start)
    assert valid.warnings == ()


def test_inputs_are_validated() -> None:
    cert = _cert(["*.example.com"])
    with pytest.raises(InvalidName, match="VIP FQDN"):
        decide_from_cert(cert, "access example.com", SHARED_NODES, LBMode.REENCRYPT)
    with pytest.raises(InvalidName, match="node FQDN"):
        decide_from_cert(cert, VIP, ["node1"], LBMode.REENCRYPT)
    with pytest.raises(BadRequest, match="at least one node FQDN"):
        decide_from_cert(cert, VIP, [], LBMode.REENCRYPT)


def test_names_are_compared_case_insensitively_and_deduplicated() -> None:
    cert = _cert(["*.Example.COM"])
    nodes = ["NODE1.example.com", "node1.example.com."]
    plan = decide_from_cert(cert, "Access.Example.com.", nodes, LBMode.REENCRYPT, now=NOW)
    assert plan.port_5263_required is False
    assert plan.reason.count("node1.example.com covered") == 1
