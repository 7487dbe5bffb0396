"""Tests for certgate.pki.keywrap: a key sealed to a public key opens only with its private
key and the same context, and every tampered field is refused with PKIError."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from certgate.errors import PKIError
from certgate.pki.keys import KeyAlgorithm, generate_key, private_key_pem
from certgate.pki.keywrap import SEALED_KEYS, seal_key, unseal_key

CONTEXT = b"tunnel-identity:g1:" + b"a" * 64


def _flip(text: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    raw[-1] ^= 1
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048])
def test_a_sealed_key_opens_with_the_recipient_key(algorithm: KeyAlgorithm) -> None:
    recipient, key = generate_key(), generate_key(algorithm)
    sealed = seal_key(key, recipient.public_key(), CONTEXT)
    assert sealed.keys() == SEALED_KEYS
    assert private_key_pem(unseal_key(sealed, recipient, CONTEXT)) == private_key_pem(key)


def test_the_sealed_form_holds_no_clear_key() -> None:
    recipient, key = generate_key(), generate_key()
    sealed = seal_key(key, recipient.public_key(), CONTEXT)
    secret = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
    assert secret not in base64.urlsafe_b64decode(sealed["ciphertext"] + "==")
    assert b"PRIVATE KEY" not in repr(sealed).encode()


def test_another_recipient_cannot_open_it() -> None:
    sealed = seal_key(generate_key(), generate_key().public_key(), CONTEXT)
    with pytest.raises(PKIError, match="does not open"):
        unseal_key(sealed, generate_key(), CONTEXT)


def test_another_context_cannot_open_it() -> None:
    recipient = generate_key()
    sealed = seal_key(generate_key(), recipient.public_key(), CONTEXT)
    with pytest.raises(PKIError, match="does not open"):
        unseal_key(sealed, recipient, CONTEXT.replace(b"g1", b"g2"))


@pytest.mark.parametrize("field", ["epk", "nonce", "ciphertext"])
def test_a_tampered_field_is_refused(field: str) -> None:
    recipient = generate_key()
    sealed = seal_key(generate_key(), recipient.public_key(), CONTEXT)
    with pytest.raises(PKIError):
        unseal_key({**sealed, field: _flip(sealed[field])}, recipient, CONTEXT)


@pytest.mark.parametrize(
    "change",
    [
        {"alg": "A128KW"},
        {"extra": "x"},
        {"epk": 5},
        {"nonce": "not base64 !"},
    ],
)
def test_a_malformed_sealed_key_is_refused(change: dict[str, object]) -> None:
    recipient = generate_key()
    sealed: dict[str, object] = {**seal_key(generate_key(), recipient.public_key(), CONTEXT)}
    with pytest.raises(PKIError):
        unseal_key({**sealed, **change}, recipient, CONTEXT)


def test_an_ephemeral_key_on_another_curve_is_refused() -> None:
    recipient = generate_key()
    other_curve = ec.generate_private_key(ec.SECP384R1())
    sealed = seal_key(generate_key(), other_curve.public_key(), CONTEXT)
    with pytest.raises(PKIError, match="curve"):
        unseal_key(sealed, recipient, CONTEXT)


def test_only_ec_recipients() -> None:
    with pytest.raises(PKIError, match="EC public key"):
        seal_key(generate_key(), generate_key(KeyAlgorithm.RSA_2048).public_key(), CONTEXT)
