"""Signed console messages: ES256 compact JWS pinned to the group's console identity
(RFC 7515; RFC 7518 §3.4), refused on any change of signer, type, group, time or alg."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from joserfc import jws as joserfc_jws
from joserfc.jwk import ECKey

from certgate import jws
from certgate.errors import SignatureError
from certgate.pki.authority import Authority, Names
from certgate.pki.keys import KeyAlgorithm, generate_key, private_key_pem
from certgate.pki.profiles import CONSOLE_IDENTITY
from tests.pki.conftest import (
    GROUP,
    OTHER_GROUP,
    Hierarchy,
    Leaf,
    leaf_names,
    make_leaf,
    shared_hierarchy,
)

TTL_S = 300


@pytest.fixture(scope="module")
def hierarchy() -> Hierarchy:
    return shared_hierarchy()


@pytest.fixture(scope="module")
def console_a(hierarchy: Hierarchy) -> Leaf:
    return hierarchy.leaves["console"]


@pytest.fixture(scope="module")
def console_b(hierarchy: Hierarchy) -> Leaf:
    _, profile, names = leaf_names(OTHER_GROUP)["console"]
    return make_leaf(Authority(), hierarchy.secure_channel_root, profile, names)


def sign_for(leaf: Leaf, payload: dict[str, Any] | None = None, typ: str = jws.TYP_TRUST) -> str:
    body = payload if payload is not None else {"group_id": GROUP, "trust": ["a", "b"]}
    return jws.sign(body, leaf.key, leaf.chain, typ, TTL_S)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def x5t(cert: x509.Certificate) -> str:
    return b64url(hashlib.sha256(cert.public_bytes(Encoding.DER)).digest())


def segment(data: dict[str, Any]) -> str:
    return b64url(json.dumps(data).encode())


def fresh_claims(group_id: str = GROUP) -> dict[str, Any]:
    now = int(time.time())
    return {"group_id": group_id, "iat": now, "exp": now + TTL_S}


def sign_raw(leaf: Leaf, header: dict[str, Any], payload: bytes) -> str:
    """Sign arbitrary bytes with joserfc directly, bypassing ``jws.sign``'s checks."""
    key = ECKey.import_key(private_key_pem(leaf.key))
    return joserfc_jws.serialize_compact(header, payload, key, algorithms=["ES256"])


# --- the happy path ------------------------------------------------------------------


def test_round_trip(console_a: Leaf) -> None:
    before = int(time.time())
    token = sign_for(console_a)
    payload = jws.verify(token, console_a.cert, jws.TYP_TRUST, group_id=GROUP)
    assert payload["group_id"] == GROUP
    assert payload["trust"] == ["a", "b"]
    assert before <= payload["iat"] <= int(time.time())
    assert payload["exp"] == payload["iat"] + TTL_S


def test_bytes_token_verifies(console_a: Leaf) -> None:
    token = sign_for(console_a).encode()
    assert jws.verify(token, console_a.cert, jws.TYP_TRUST)["group_id"] == GROUP


def test_x5c_chain_of_two_certs_fits_the_header(hierarchy: Hierarchy, console_a: Leaf) -> None:
    token = sign_for(console_a)
    # Two DER certs in base64 are well over joserfc's default 512-byte header cap.
    assert len(token.split(".")[0]) > 512
    header = jws.unverified_header(token)
    assert header["alg"] == "ES256"
    assert header["typ"] == jws.TYP_TRUST
    chain = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in header["x5c"]]
    assert chain == [console_a.cert, hierarchy.secure_channel_root.cert]
    assert header["x5t#S256"] == x5t(console_a.cert)
    jws.verify(token, console_a.cert, jws.TYP_TRUST, group_id=GROUP)


@pytest.mark.parametrize(
    "typ",
    [jws.TYP_TRUST, jws.TYP_BATCH, jws.TYP_SNAPSHOT, jws.TYP_SNAPSHOT_V2, jws.TYP_INSTALLER],
)
def test_every_message_type_round_trips(console_a: Leaf, typ: str) -> None:
    token = sign_for(console_a, typ=typ)
    assert jws.verify(token, console_a.cert, typ)["group_id"] == GROUP


# --- refusals ------------------------------------------------------------------------


def test_other_groups_console_identity_refuses(console_a: Leaf, console_b: Leaf) -> None:
    token = sign_for(console_a)
    with pytest.raises(SignatureError, match="does not verify with the pinned console identity"):
        jws.verify(token, console_b.cert, jws.TYP_TRUST)


def test_token_for_group_a_refused_for_group_b(console_a: Leaf) -> None:
    token = sign_for(console_a)
    with pytest.raises(SignatureError, match="message is for group 'group-a', not 'group-b'"):
        jws.verify(token, console_a.cert, jws.TYP_TRUST, group_id=OTHER_GROUP)


def test_wrong_typ_refused(console_a: Leaf) -> None:
    token = sign_for(console_a, typ=jws.TYP_BATCH)
    with pytest.raises(SignatureError, match="unexpected message type 'certgate-feed-batch"):
        jws.verify(token, console_a.cert, jws.TYP_SNAPSHOT)


def test_snapshot_formats_are_not_mistaken_for_each_other(console_a: Leaf) -> None:
    old, new = (sign_for(console_a, typ=typ) for typ in (jws.TYP_SNAPSHOT, jws.TYP_SNAPSHOT_V2))
    with pytest.raises(SignatureError, match="'certgate-snapshot\\+jws', wanted 'certgate-snap"):
        jws.verify(old, console_a.cert, jws.TYP_SNAPSHOT_V2)
    with pytest.raises(SignatureError, match="'certgate-snapshot-v2\\+jws', wanted"):
        jws.verify(new, console_a.cert, jws.TYP_SNAPSHOT)


def test_expired_token_refused(console_a: Leaf) -> None:
    token = sign_for(console_a)
    with pytest.raises(SignatureError, match="signed message expired at"):
        jws.verify(token, console_a.cert, jws.TYP_TRUST, now=time.time() + 10**6)


def test_clock_skew_is_tolerated_at_expiry(console_a: Leaf) -> None:
    token = sign_for(console_a)
    exp = jws.verify(token, console_a.cert, jws.TYP_TRUST)["exp"]
    jws.verify(token, console_a.cert, jws.TYP_TRUST, now=exp + jws.CLOCK_SKEW_S)
    with pytest.raises(SignatureError, match="expired"):
        jws.verify(token, console_a.cert, jws.TYP_TRUST, now=exp + jws.CLOCK_SKEW_S + 1)


def test_future_iat_refused(console_a: Leaf) -> None:
    token = sign_for(console_a)
    with pytest.raises(SignatureError, match="signed message issued in the future"):
        jws.verify(token, console_a.cert, jws.TYP_TRUST, now=time.time() - 10**6)


def test_swapped_payload_refused(console_a: Leaf) -> None:
    token = sign_for(console_a)
    other = sign_for(console_a, {"group_id": GROUP, "trust": ["evil"]})
    head, _, signature = token.split(".")
    forged = ".".join([head, other.split(".")[1], signature])
    with pytest.raises(SignatureError, match="does not verify"):
        jws.verify(forged, console_a.cert, jws.TYP_TRUST)


def test_hand_edited_payload_refused(console_a: Leaf) -> None:
    head, _, signature = sign_for(console_a).split(".")
    forged = ".".join([head, segment({**fresh_claims(), "trust": ["evil"]}), signature])
    with pytest.raises(SignatureError, match="does not verify"):
        jws.verify(forged, console_a.cert, jws.TYP_TRUST)


def test_alg_none_refused(console_a: Leaf) -> None:
    header = {"alg": "none", "typ": jws.TYP_TRUST, "x5t#S256": x5t(console_a.cert)}
    forged = f"{segment(header)}.{segment(fresh_claims())}."
    with pytest.raises(SignatureError, match=r"does not verify.*'none'"):
        jws.verify(forged, console_a.cert, jws.TYP_TRUST)


def test_hs256_with_public_key_as_secret_refused(console_a: Leaf) -> None:
    # The classic key-confusion attack: HMAC keyed with the (public) verification key.
    header = {"alg": "HS256", "typ": jws.TYP_TRUST, "x5t#S256": x5t(console_a.cert)}
    signing_input = f"{segment(header)}.{segment(fresh_claims())}"
    public_pem = console_a.cert.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(SignatureError, match=r"does not verify.*'HS256'"):
        jws.verify(f"{signing_input}.{b64url(mac)}", console_a.cert, jws.TYP_TRUST)


def test_signer_key_reused_under_another_cert_refused(
    hierarchy: Hierarchy, console_a: Leaf
) -> None:
    # Same key, different certificate: the x5t#S256 header pins the exact certificate.
    _, _, names = leaf_names()["console"]
    reissued = Authority().issue(
        hierarchy.secure_channel_root, CONSOLE_IDENTITY, names, console_a.key.public_key()
    )
    token = sign_for(console_a)
    with pytest.raises(SignatureError, match="names a different signer certificate"):
        jws.verify(token, reissued, jws.TYP_TRUST)


def test_missing_x5t_refused(console_a: Leaf) -> None:
    token = sign_raw(
        console_a, {"alg": "ES256", "typ": jws.TYP_TRUST}, json.dumps(fresh_claims()).encode()
    )
    with pytest.raises(SignatureError, match="names a different signer certificate"):
        jws.verify(token, console_a.cert, jws.TYP_TRUST)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json", "signed payload is not JSON"),
        (b"[1, 2]", "signed payload is not a JSON object"),
        (b'{"group_id": "group-a"}', "signed payload lacks iat/exp"),
        (b'{"iat": "0", "exp": "9"}', "signed payload lacks iat/exp"),
    ],
)
def test_malformed_payload_refused(console_a: Leaf, payload: bytes, message: str) -> None:
    header = {"alg": "ES256", "typ": jws.TYP_TRUST, "x5t#S256": x5t(console_a.cert)}
    token = sign_raw(console_a, header, payload)
    with pytest.raises(SignatureError, match=message):
        jws.verify(token, console_a.cert, jws.TYP_TRUST)


@pytest.mark.parametrize("token", ["", "a.b", "a.b.c.d", "....", "not a token"])
def test_garbage_refused(console_a: Leaf, token: str) -> None:
    with pytest.raises(SignatureError, match="does not verify"):
        jws.verify(token, console_a.cert, jws.TYP_TRUST)


def test_oversize_token_refused_before_parsing(
    console_a: Leaf, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = sign_for(console_a)
    monkeypatch.setattr(jws, "MAX_TOKEN_BYTES", len(token) - 1)
    with pytest.raises(SignatureError, match=f"signed message of {len(token)} bytes exceeds"):
        jws.verify(token, console_a.cert, jws.TYP_TRUST)


# --- signing keys --------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: generate_key(KeyAlgorithm.RSA_2048),
        lambda: ec.generate_private_key(ec.SECP384R1()),
    ],
    ids=["rsa-2048", "p-384"],
)
def test_sign_needs_a_p256_key(console_a: Leaf, make_key: Any) -> None:
    with pytest.raises(SignatureError, match="ES256 needs an ECDSA P-256 signing key"):
        jws.sign({"group_id": GROUP}, make_key(), console_a.chain, jws.TYP_TRUST, TTL_S)


def test_verify_needs_an_ec_signer_cert(console_a: Leaf) -> None:
    rsa_key = generate_key(KeyAlgorithm.RSA_2048)
    rsa_cert = Authority().create_root(rsa_key, Names("RSA signer"))
    with pytest.raises(SignatureError, match="does not hold an ECDSA key"):
        jws.verify(sign_for(console_a), rsa_cert, jws.TYP_TRUST)


def test_unverified_header_refuses_garbage() -> None:
    with pytest.raises(SignatureError, match="not a compact JWS"):
        jws.unverified_header("%%%.x.y")
    with pytest.raises(SignatureError, match="JWS header is not an object"):
        jws.unverified_header(b64url(b"[1]") + ".x.y")
