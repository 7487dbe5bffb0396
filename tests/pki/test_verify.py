"""Chain checks through cryptography's RFC 5280 path validation (``PolicyBuilder``)."""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from certgate.errors import ChainError
from certgate.pki.authority import Authority, Names
from certgate.pki.keys import generate_key
from certgate.pki.profiles import DEVICE_CLIENT
from certgate.pki.verify import has_eku, verify_client_chain, verify_server_chain
from tests.pki.conftest import LEAF_NAMES, Hierarchy

CLIENT_ONLY = ("device", "app", "admin", "console")


@pytest.mark.parametrize("name", LEAF_NAMES)
def test_every_leaf_verifies_as_client(hierarchy: Hierarchy, name: str) -> None:
    leaf = hierarchy.leaves[name]
    chain = verify_client_chain(leaf.cert, [leaf.issuer.cert], [hierarchy.root.cert])
    assert chain == [leaf.cert, leaf.issuer.cert, hierarchy.root.cert]


def test_expected_issuer_accepts_its_own_leaf(hierarchy: Hierarchy) -> None:
    device = hierarchy.leaves["device"]
    chain = verify_client_chain(
        device.cert,
        [hierarchy.device_root.cert, hierarchy.secure_channel_root.cert],
        [hierarchy.root.cert],
        expected_issuer=hierarchy.device_root.cert,
    )
    assert chain[1] == hierarchy.device_root.cert


@pytest.mark.parametrize("name", ["admin", "tunnel", "console"])
def test_expected_issuer_refuses_sibling_intermediates_leaf(
    hierarchy: Hierarchy, name: str
) -> None:
    leaf = hierarchy.leaves[name]
    # The chain itself is valid (same root): only the issuer pin refuses it.
    verify_client_chain(leaf.cert, [leaf.issuer.cert], [hierarchy.root.cert])
    with pytest.raises(ChainError, match="is not issued by CN=test device-root,O=certgate"):
        verify_client_chain(
            leaf.cert,
            [ca.cert for ca in hierarchy.intermediates.values()],
            [hierarchy.root.cert],
            expected_issuer=hierarchy.device_root.cert,
        )


def test_missing_intermediate_is_refused(hierarchy: Hierarchy) -> None:
    device = hierarchy.leaves["device"]
    with pytest.raises(ChainError, match=r"^client certificate rejected: "):
        verify_client_chain(device.cert, [], [hierarchy.root.cert])


def test_wrong_intermediate_is_refused(hierarchy: Hierarchy) -> None:
    device = hierarchy.leaves["device"]
    with pytest.raises(ChainError, match=r"^client certificate rejected: "):
        verify_client_chain(device.cert, [hierarchy.admin_ca.cert], [hierarchy.root.cert])


def test_unknown_root_is_refused(hierarchy: Hierarchy, rsa_hierarchy: Hierarchy) -> None:
    device = hierarchy.leaves["device"]
    with pytest.raises(ChainError, match=r"^client certificate rejected: "):
        verify_client_chain(device.cert, [device.issuer.cert], [rsa_hierarchy.root.cert])


def test_leaf_from_another_hierarchy_is_refused(
    hierarchy: Hierarchy, rsa_hierarchy: Hierarchy
) -> None:
    stranger = rsa_hierarchy.leaves["device"]
    with pytest.raises(ChainError):
        verify_client_chain(stranger.cert, [hierarchy.device_root.cert], [hierarchy.root.cert])


def test_expired_leaf_is_refused(hierarchy: Hierarchy) -> None:
    device = hierarchy.leaves["device"]
    after = device.cert.not_valid_after_utc + timedelta(seconds=1)
    with pytest.raises(ChainError, match="cert is not valid at validation time"):
        verify_client_chain(device.cert, [device.issuer.cert], [hierarchy.root.cert], at=after)


def test_not_yet_valid_leaf_is_refused_naming_the_clock(hierarchy: Hierarchy) -> None:
    device = hierarchy.leaves["device"]
    before = device.cert.not_valid_before_utc - timedelta(days=1)
    with pytest.raises(ChainError, match="cert is not valid at validation time") as refused:
        verify_client_chain(device.cert, [device.issuer.cert], [hierarchy.root.cert], at=before)
    assert str(refused.value).startswith("certificate not yet valid, check the clock: ")
    assert f"this machine's clock says {before:%Y-%m-%d %H:%M:%S} UTC" in str(refused.value)


def test_a_server_chain_checked_by_a_clock_behind_names_the_clock() -> None:
    case = json.loads((VECTORS / "underscore-dns.json").read_text())
    case["expected_peer_name"]["value"] = "example.com"  # the root's name: a valid one
    case["validation_time"] = "1969-12-31T00:00:00+00:00"  # before the root's notBefore
    with pytest.raises(ChainError, match=r"^certificate not yet valid, check the clock"):
        _limbo_server_check(case)


def test_an_expired_leaf_is_not_blamed_on_the_clock(hierarchy: Hierarchy) -> None:
    device = hierarchy.leaves["device"]
    after = device.cert.not_valid_after_utc + timedelta(days=1)
    with pytest.raises(ChainError, match=r"^client certificate rejected: "):
        verify_client_chain(device.cert, [device.issuer.cert], [hierarchy.root.cert], at=after)


def test_ca_certificate_is_not_a_client(hierarchy: Hierarchy) -> None:
    with pytest.raises(ChainError, match=r"basicConstraints\.cA must not be asserted"):
        verify_client_chain(hierarchy.device_root.cert, [], [hierarchy.root.cert])


@pytest.mark.parametrize("hostname", ["tunnel.example.test", "127.0.0.1", "::1"])
def test_tunnel_identity_verifies_as_server(hierarchy: Hierarchy, hostname: str) -> None:
    tunnel = hierarchy.leaves["tunnel"]
    chain = verify_server_chain(tunnel.cert, [tunnel.issuer.cert], [hierarchy.root.cert], hostname)
    assert chain == [tunnel.cert, tunnel.issuer.cert, hierarchy.root.cert]


@pytest.mark.parametrize("hostname", ["other.example.test", "127.0.0.2", "example.test"])
def test_server_name_must_match(hierarchy: Hierarchy, hostname: str) -> None:
    tunnel = hierarchy.leaves["tunnel"]
    with pytest.raises(ChainError, match=r"^server certificate rejected: "):
        verify_server_chain(tunnel.cert, [tunnel.issuer.cert], [hierarchy.root.cert], hostname)


@pytest.mark.parametrize("name", CLIENT_ONLY)
def test_client_only_leaf_is_not_a_server(hierarchy: Hierarchy, name: str) -> None:
    leaf = hierarchy.leaves[name]
    with pytest.raises(ChainError, match=r"^server certificate rejected: "):
        verify_server_chain(leaf.cert, [leaf.issuer.cert], [hierarchy.root.cert], "127.0.0.1")


def test_client_profile_with_matching_name_is_not_a_server(hierarchy: Hierarchy) -> None:
    # The name matches, so only the missing serverAuth EKU can refuse it.
    names = Names("client with a DNS name", dns_names=("tunnel.example.test",))
    cert = Authority().issue(
        hierarchy.device_root, DEVICE_CLIENT, names, generate_key().public_key()
    )
    with pytest.raises(ChainError, match="required EKU not found"):
        verify_server_chain(
            cert, [hierarchy.device_root.cert], [hierarchy.root.cert], "tunnel.example.test"
        )


def test_has_eku(hierarchy: Hierarchy) -> None:
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    assert has_eku(hierarchy.leaves["tunnel"].cert, server)
    assert has_eku(hierarchy.leaves["tunnel"].cert, client)
    assert has_eku(hierarchy.leaves["device"].cert, client)
    assert not has_eku(hierarchy.leaves["device"].cert, server)
    assert not has_eku(hierarchy.root.cert, client)  # no EKU extension at all


VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "x509-limbo"
LIMBO = Path("/work/shared/testdata/x509-limbo/limbo.json")


def _limbo_server_check(case: dict[str, Any]) -> None:
    def pem(text: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(text.encode())

    at = case["validation_time"]
    verify_server_chain(
        pem(case["peer_certificate"]),
        [pem(c) for c in case["untrusted_intermediates"]],
        [pem(c) for c in case["trusted_certs"]],
        case["expected_peer_name"]["value"],
        datetime.fromisoformat(at) if at else None,
    )


def test_a_name_that_is_not_a_dns_name_is_a_chain_error() -> None:
    case = json.loads((VECTORS / "underscore-dns.json").read_text())
    with pytest.raises(ChainError, match=r"foo_bar\.example\.com"):
        _limbo_server_check(case)


@pytest.mark.skipif(not LIMBO.exists(), reason=f"shared x509-limbo data absent ({LIMBO})")
@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_the_server_verifier_answers_every_limbo_case_with_a_chain_or_chain_error() -> None:
    """ChainError is the verifier's only failure, whatever the certificate or name (which
    outcome each case gets is a conformance question, not checked here)."""
    cases = json.loads(LIMBO.read_text())["testcases"]
    checked = 0
    for case in cases:
        if case["validation_kind"] != "SERVER" or not case["expected_peer_name"]:
            continue
        with contextlib.suppress(ChainError):
            _limbo_server_check(case)
        checked += 1
    assert checked > 150
