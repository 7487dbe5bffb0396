"""Key generation and (de)serialisation. Nothing here signs certificates."""

from __future__ import annotations

from enum import Enum
from typing import TypeAlias

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certgate.errors import PKIError

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
MIN_RSA_BITS = 2048


class KeyAlgorithm(Enum):
    EC_P256 = "ec-p256"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"


def generate_key(algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256) -> PrivateKey:
    if algorithm is KeyAlgorithm.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    bits = 2048 if algorithm is KeyAlgorithm.RSA_2048 else 3072
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def check_public_key(key: object) -> PublicKey:
    """Accept only keys we are willing to certify: P-256/P-384 or RSA >= 2048 bits."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise PKIError(f"unsupported curve {key.curve.name}; use P-256 or P-384")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise PKIError(f"RSA key of {key.key_size} bits is too small (minimum {MIN_RSA_BITS})")
        return key
    raise PKIError(f"unsupported key type {type(key).__name__}; use ECDSA or RSA")


def private_key_pem(key: PrivateKey, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def load_private_key_pem(data: bytes, password: bytes | None = None) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"cannot load private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PKIError(f"unsupported private key type {type(key).__name__}")
    check_public_key(key.public_key())
    return key
