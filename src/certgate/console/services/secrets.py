"""High-entropy secrets shown once and stored only as hashes; passwords as scrypt hashes.

A secret has the shape ``<prefix>_<id>_<secret>``: the id finds the row, the secret is
compared as SHA-256 in constant time. SHA-256 is enough for 256-bit random values (no
dictionary to attack); human passwords get scrypt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from certgate.errors import AuthError

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


@dataclass(frozen=True, slots=True)
class IssuedSecret:
    """A new secret: ``token`` is shown once; only ``secret_hash`` is stored."""

    id: str
    token: str
    secret_hash: str

    def __repr__(self) -> str:
        return f"IssuedSecret(id={self.id!r}, token=<redacted>)"


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def new_secret(prefix: str) -> IssuedSecret:
    ident = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)  # 256 bits
    return IssuedSecret(ident, f"{prefix}_{ident}_{secret}", sha256_hex(secret))


def split_secret(token: str, prefix: str) -> tuple[str, str]:
    """(id, secret) of a token, or AuthError for anything not of our shape."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != prefix or len(parts[1]) != 16 or not parts[2]:
        raise AuthError(f"malformed {prefix} credential")
    return parts[1], parts[2]


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(sha256_hex(secret), stored_hash)


def hash_password(password: str) -> str:
    if not 8 <= len(password) <= 1024:
        raise ValueError("password must be 8-1024 characters")
    salt = os.urandom(16)
    digest = Scrypt(salt=salt, length=32, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P).derive(
        password.encode()
    )
    return "scrypt$" + base64.b64encode(salt).decode() + "$" + base64.b64encode(digest).decode()


def password_matches(password: str, stored: str) -> bool:
    try:
        scheme, salt_b64, digest_b64 = stored.split("$")
        salt, digest = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
    except ValueError:
        return False
    if scheme != "scrypt" or len(password) > 1024:
        return False
    candidate = Scrypt(salt=salt, length=32, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P).derive(
        password.encode()
    )
    return hmac.compare_digest(candidate, digest)
