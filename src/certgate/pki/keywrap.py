"""A private key sealed to a recipient's public key (ECIES), for keys that travel.

The console hands a group's next tunnel identity key to the group's nodes inside the
feed; the feed is signed, not secret (it is persisted by nodes and may be logged), so the
key travels sealed to the group's current tunnel identity, which only the nodes of the
group hold. The construction is ECIES on P-256/P-384: an ephemeral ECDH key agreement,
HKDF-SHA256 over the shared secret (SEC 1 v2 §5.1 with a standard KDF), AES-256-GCM over
the PKCS#8 DER of the key; ``context`` (what the key is for) is both HKDF info and AEAD
associated data, so a sealed key cannot be replayed as another one. No I/O.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from certgate.errors import PKIError
from certgate.pki.keys import PrivateKey, PublicKey

__all__ = ["SEALED_KEYS", "seal_key", "unseal_key"]

SEALED_KEYS = frozenset({"alg", "epk", "nonce", "ciphertext"})
ALG = "ECDH-ES+HKDF-SHA256+A256GCM"
_INFO = b"certgate key transport v1:"


def _derive(secret: bytes, context: bytes) -> AESGCM:
    hkdf = HKDF(hashes.SHA256(), 32, salt=None, info=_INFO + context)
    return AESGCM(hkdf.derive(secret))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise PKIError(f"sealed key: {what} is not a string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise PKIError(f"sealed key: {what} is not base64url") from exc


def seal_key(key: PrivateKey, recipient: PublicKey, context: bytes) -> dict[str, str]:
    """``key`` readable only by the holder of ``recipient``'s private key."""
    if not isinstance(recipient, ec.EllipticCurvePublicKey):
        raise PKIError("a key can only be sealed to an EC public key")
    ephemeral = ec.generate_private_key(recipient.curve)
    aead = _derive(ephemeral.exchange(ec.ECDH(), recipient), context)
    nonce = os.urandom(12)
    plain = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    epk = ephemeral.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "alg": ALG,
        "epk": _b64(epk),
        "nonce": _b64(nonce),
        "ciphertext": _b64(aead.encrypt(nonce, plain, context)),
    }


def unseal_key(sealed: Mapping[str, object], recipient: PrivateKey, context: bytes) -> PrivateKey:
    """The key ``seal_key`` sealed to ``recipient``; raises PKIError if anything is off."""
    if sealed.keys() != SEALED_KEYS or sealed["alg"] != ALG:
        raise PKIError(f"sealed key: expected keys {sorted(SEALED_KEYS)} and alg {ALG}")
    if not isinstance(recipient, ec.EllipticCurvePrivateKey):
        raise PKIError("a sealed key can only be opened with an EC private key")
    try:
        epk = serialization.load_der_public_key(_unb64(sealed["epk"], "epk"))
    except ValueError as exc:
        raise PKIError("sealed key: epk is not a public key") from exc
    if not isinstance(epk, ec.EllipticCurvePublicKey) or epk.curve.name != recipient.curve.name:
        raise PKIError("sealed key: epk is not a key on the recipient's curve")
    aead = _derive(recipient.exchange(ec.ECDH(), epk), context)
    try:
        plain = aead.decrypt(
            _unb64(sealed["nonce"], "nonce"), _unb64(sealed["ciphertext"], "ciphertext"), context
        )
    except (InvalidTag, ValueError) as exc:
        raise PKIError(
            "sealed key does not open with this key (wrong recipient or context)"
        ) from exc
    key = serialization.load_der_private_key(plain, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PKIError(f"sealed key holds an unsupported key type {type(key).__name__}")
    return key
