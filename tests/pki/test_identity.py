"""Identity URIs (docs/CONVENTIONS.md): exact round trips, strict parsing, one per cert."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from certgate.errors import ChainError
from certgate.pki import identity
from certgate.pki.authority import Authority, Names
from certgate.pki.identity import Identity, IdentityKind, identity_of, parse_uri
from certgate.pki.keys import generate_key
from certgate.pki.profiles import DEVICE_CLIENT
from tests.pki.conftest import ADMIN_ID, BUNDLE_ID, DEVICE_UID, GROUP, Hierarchy

EXAMPLES = [
    (identity.device(DEVICE_UID, GROUP), f"urn:certgate:device:{DEVICE_UID}:group:{GROUP}"),
    (
        identity.app(DEVICE_UID, GROUP, BUNDLE_ID),
        f"urn:certgate:device:{DEVICE_UID}:group:{GROUP}:app:{BUNDLE_ID}",
    ),
    (identity.admin(ADMIN_ID), f"urn:certgate:admin:{ADMIN_ID}"),
    (identity.tunnel(GROUP), f"urn:certgate:tunnel:group:{GROUP}"),
    (identity.console(GROUP), f"urn:certgate:console:group:{GROUP}"),
]
UPPER_UID = DEVICE_UID.upper()
REJECTED = {
    "uppercase-uid": f"urn:certgate:device:{UPPER_UID}:group:{GROUP}",
    "short-uid": f"urn:certgate:device:{DEVICE_UID[:-1]}:group:{GROUP}",
    "extra-segment": f"urn:certgate:device:{DEVICE_UID}:group:{GROUP}:extra",
    "extra-app-segment": f"urn:certgate:device:{DEVICE_UID}:group:{GROUP}:app:{BUNDLE_ID}:x",
    "trailing-colon": f"urn:certgate:tunnel:group:{GROUP}:",
    "uppercase-group": f"urn:certgate:tunnel:group:{GROUP.upper()}",
    "group-leading-hyphen": "urn:certgate:tunnel:group:-abc",
    "group-too-long": "urn:certgate:tunnel:group:" + "a" * 64,
    "group-underscore": "urn:certgate:console:group:a_b",
    "empty-group": "urn:certgate:console:group:",
    "colon-in-bundle": f"urn:certgate:device:{DEVICE_UID}:group:{GROUP}:app:com.example:mail",
    "bundle-leading-dot": f"urn:certgate:device:{DEVICE_UID}:group:{GROUP}:app:.com.example",
    "admin-not-hex": "urn:certgate:admin:alice",
    "admin-uppercase": f"urn:certgate:admin:{ADMIN_ID.upper()}",
    "unknown-kind": f"urn:certgate:printer:group:{GROUP}",
    "uppercase-prefix": f"URN:certgate:tunnel:group:{GROUP}",
    "other-namespace": f"urn:example:tunnel:group:{GROUP}",
    "leading-space": f" urn:certgate:tunnel:group:{GROUP}",
    "trailing-newline": f"urn:certgate:tunnel:group:{GROUP}\n",
    "empty": "",
}


@pytest.mark.parametrize(("ident", "uri"), EXAMPLES, ids=[k.value for k in IdentityKind])
def test_uri_is_the_documented_form(ident: Identity, uri: str) -> None:
    assert ident.uri() == uri


@pytest.mark.parametrize(("ident", "uri"), EXAMPLES, ids=[k.value for k in IdentityKind])
def test_parse_round_trips_every_kind(ident: Identity, uri: str) -> None:
    parsed = parse_uri(uri)
    assert parsed == ident
    assert parsed.kind is ident.kind


def test_parsed_fields() -> None:
    parsed = parse_uri(EXAMPLES[1][1])
    assert parsed.kind is IdentityKind.APP
    assert (parsed.device_uid, parsed.group_id, parsed.bundle_id) == (DEVICE_UID, GROUP, BUNDLE_ID)
    assert parsed.admin_id is None
    admin = parse_uri(EXAMPLES[2][1])
    assert (admin.admin_id, admin.group_id, admin.device_uid) == (ADMIN_ID, None, None)


@pytest.mark.parametrize("uri", REJECTED.values(), ids=REJECTED.keys())
def test_malformed_or_non_canonical_uris_are_rejected(uri: str) -> None:
    with pytest.raises(ChainError):
        parse_uri(uri)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: identity.device(UPPER_UID, GROUP), "invalid device uid"),
        (lambda: identity.device(DEVICE_UID, "Group"), "invalid group id"),
        (lambda: identity.app(DEVICE_UID, GROUP, "a:b"), "invalid bundle id"),
        (lambda: identity.admin("x" * 32), "invalid admin id"),
        (lambda: identity.tunnel(""), "invalid group id"),
        (lambda: Identity(IdentityKind.CONSOLE), "invalid group id"),
    ],
)
def test_constructors_validate_fields(build: Callable[[], Identity], message: str) -> None:
    with pytest.raises(ChainError, match=message):
        build()


def test_group_id_limits() -> None:
    assert identity.tunnel("a" * 63).group_id == "a" * 63
    assert identity.tunnel("0-a").group_id == "0-a"
    with pytest.raises(ChainError):
        identity.tunnel("a" * 64)


# --- identity_of ---------------------------------------------------------------------


def cert_with(hierarchy: Hierarchy, names: Names) -> x509.Certificate:
    return Authority().issue(
        hierarchy.device_root, DEVICE_CLIENT, names, generate_key().public_key()
    )


@pytest.mark.parametrize("name", ["device", "app", "admin", "tunnel", "console"])
def test_identity_of_hierarchy_leaves(hierarchy: Hierarchy, name: str) -> None:
    kind = IdentityKind.DEVICE if name == "device" else IdentityKind(name)
    assert identity_of(hierarchy.leaves[name].cert).kind is kind


def test_identity_of_ignores_foreign_uris(hierarchy: Hierarchy) -> None:
    ident = identity.device(DEVICE_UID, GROUP)
    names = Names("x", ident, extra_uris=("https://example.com/device", "spiffe://td/x"))
    assert identity_of(cert_with(hierarchy, names)) == ident


def test_identity_of_without_san(hierarchy: Hierarchy) -> None:
    with pytest.raises(ChainError, match="certificate has no subjectAltName"):
        identity_of(cert_with(hierarchy, Names("no san")))


def test_identity_of_with_zero_certgate_uris(hierarchy: Hierarchy) -> None:
    names = Names("x", dns_names=("a.example",), extra_uris=("https://example.com/",))
    with pytest.raises(ChainError, match="expected exactly one certgate URI SAN, found 0"):
        identity_of(cert_with(hierarchy, names))


def test_identity_of_with_two_certgate_uris(hierarchy: Hierarchy) -> None:
    names = Names(
        "x", identity.device(DEVICE_UID, GROUP), extra_uris=(f"urn:certgate:admin:{ADMIN_ID}",)
    )
    with pytest.raises(ChainError, match="expected exactly one certgate URI SAN, found 2"):
        identity_of(cert_with(hierarchy, names))


def test_identity_of_with_malformed_certgate_uri(hierarchy: Hierarchy) -> None:
    names = Names("x", extra_uris=(REJECTED["uppercase-uid"],))
    with pytest.raises(ChainError, match="invalid device uid"):
        identity_of(cert_with(hierarchy, names))


# --- properties ----------------------------------------------------------------------

SEGMENT = st.one_of(
    st.sampled_from(["device", "group", "app", "admin", "tunnel", "console", DEVICE_UID, GROUP]),
    st.text(alphabet="abcdefABCDEF0123456789-._:", max_size=40),
    st.text(max_size=8),
)


def check_parse(uri: str) -> None:
    """``parse_uri`` either refuses with ChainError or returns an exact round trip."""
    try:
        parsed = parse_uri(uri)
    except ChainError:
        return
    assert parsed.uri() == uri


@settings(max_examples=300)
@given(st.text())
def test_parse_arbitrary_text(uri: str) -> None:
    check_parse(uri)


@settings(max_examples=300)
@given(st.lists(SEGMENT, min_size=1, max_size=7))
def test_parse_certgate_shaped_text(segments: list[str]) -> None:
    check_parse("urn:certgate:" + ":".join(segments))


@settings(max_examples=200)
@given(
    uid=st.from_regex(identity.DEVICE_UID_RE, fullmatch=True),
    group=st.from_regex(identity.GROUP_ID_RE, fullmatch=True),
    bundle=st.from_regex(identity.BUNDLE_ID_RE, fullmatch=True),
)
def test_valid_components_round_trip(uid: str, group: str, bundle: str) -> None:
    for ident in (
        identity.device(uid, group),
        identity.app(uid, group, bundle),
        identity.tunnel(group),
        identity.console(group),
        identity.admin(uid),
    ):
        assert parse_uri(ident.uri()) == ident
