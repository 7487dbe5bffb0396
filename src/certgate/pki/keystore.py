"""Private keys and secrets at rest: sealed with AES-256-GCM under a master key.

The one sealing primitive of certgate. The console seals its CA and identity keys under
its master key; every other component seals its keys under its own "node key", the same
kind of key: a tunnel node (``CERTGATE_TUNNEL_NODE_KEY`` or ``node.key`` in its state
directory), the device agent (``CERTGATE_DEVICE_NODE_KEY`` or ``node.key``) and Access
(``CERTGATE_MASTER_KEY`` or ``master.key`` in its data directory).

A key comes from a file readable by its owner only (mode 0600 or stricter) or from an
environment variable (urlsafe base64 of 32 bytes), the variable winning. A wider file mode
is refused at startup, like ssh refuses a world-readable identity file.

A sealed blob is ``b"CGK1" || nonce(12) || AES-GCM(ciphertext+tag)`` with the key's label
as associated data, so a blob copied onto another key's row fails to open.
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from certgate.errors import ConfigError, KeystoreError
from certgate.pki.keys import PrivateKey, load_private_key_pem, private_key_pem

ENV_VAR = "CERTGATE_MASTER_KEY"
_MAGIC = b"CGK1"
_BACKUP_MAGIC = b"CGBACKUP1"
_NONCE = 12
_SALT = 16
MIN_PASSPHRASE = 12


@dataclass(frozen=True, slots=True)
class MasterKey:
    """32 secret bytes and where they came from (a path or ``$VARIABLE``, for errors).
    ``repr`` never shows the secret."""

    secret: bytes
    origin: str = "the master key"

    def __post_init__(self) -> None:
        if len(self.secret) != 32:
            raise ConfigError("master key must be exactly 32 bytes")

    def __repr__(self) -> str:
        return "MasterKey(<redacted>)"

    def derive(self, purpose: bytes) -> bytes:
        """A 32-byte key for one purpose (HKDF-SHA256, the purpose as ``info``): the raw
        master key is never used directly, and keys of two purposes are unrelated."""
        return HKDF(hashes.SHA256(), 32, salt=None, info=purpose).derive(self.secret)

    def _aead(self) -> AESGCM:
        return AESGCM(self.derive(b"certgate keystore v1"))

    def seal(self, key: PrivateKey, label: str) -> bytes:
        return self.seal_bytes(private_key_pem(key), label)

    def unseal(self, blob: bytes, label: str) -> PrivateKey:
        return load_private_key_pem(self.unseal_bytes(blob, label))

    def seal_bytes(self, plain: bytes, label: str) -> bytes:
        """Seal any secret (an API key, a credential) the way keys are sealed."""
        nonce = os.urandom(_NONCE)
        return _MAGIC + nonce + self._aead().encrypt(nonce, plain, label.encode())

    def unseal_bytes(self, blob: bytes, label: str) -> bytes:
        if not is_sealed(blob):
            raise KeystoreError(f"sealed key {label!r} is not in keystore format")
        nonce = blob[len(_MAGIC) : len(_MAGIC) + _NONCE]
        try:
            return self._aead().decrypt(nonce, blob[len(_MAGIC) + _NONCE :], label.encode())
        except InvalidTag as exc:
            raise KeystoreError(
                f"sealed key {label!r} does not open with the key from {self.origin}: "
                "wrong master key or tampered data"
            ) from exc


def is_sealed(blob: bytes) -> bool:
    """Whether ``blob`` has the keystore's framing (it may still fail to open)."""
    return blob.startswith(_MAGIC) and len(blob) >= len(_MAGIC) + _NONCE + 16


def new_master_key_file(path: Path) -> MasterKey:
    """Create a fresh master key file with mode 0600; refuse to overwrite one."""
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(base64.urlsafe_b64encode(secret) + b"\n")
    return MasterKey(secret, str(path))


def _decode(text: bytes, origin: str) -> MasterKey:
    try:
        # validate=True: urlsafe_b64decode alone silently drops foreign characters.
        secret = base64.b64decode(text.strip(), altchars=b"-_", validate=True)
    except ValueError as exc:
        raise ConfigError(f"master key from {origin} is not urlsafe base64") from exc
    if len(secret) != 32:
        raise ConfigError(f"master key from {origin} must decode to 32 bytes")
    return MasterKey(secret, origin)


def load_master_key(path: Path | None, env_var: str = ENV_VAR) -> MasterKey:
    """The environment variable wins; otherwise the file, whose mode must be 0600 or less."""
    env = os.environ.get(env_var)
    if env:
        return _decode(env.encode(), f"${env_var}")
    if path is None:
        raise ConfigError(f"no master key: set ${env_var} or give a master key file")
    what = "master key file" if env_var == ENV_VAR else "node key file"
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {path} does not exist and ${env_var} is not set") from exc
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
            "refusing to start: make it 0600 (chmod 600)"
        )
    return _decode(path.read_bytes(), str(path))


def open_or_create_key(path: Path, env_var: str = ENV_VAR) -> MasterKey:
    """At setup, install or enrollment: the variable's key, else the file's, else a new file."""
    if os.environ.get(env_var) or path.exists():
        return load_master_key(path, env_var)
    return new_master_key_file(path)


def _passphrase_key(passphrase: str, salt: bytes) -> AESGCM:
    if len(passphrase) < MIN_PASSPHRASE:
        raise KeystoreError(f"backup passphrase must be at least {MIN_PASSPHRASE} characters")
    kdf = Scrypt(salt=salt, length=32, n=2**15, r=8, p=1)
    return AESGCM(kdf.derive(passphrase.encode()))


def encrypt_backup(plain: bytes, passphrase: str) -> bytes:
    """Encrypt a backup document under a passphrase (scrypt + AES-256-GCM)."""
    salt, nonce = os.urandom(_SALT), os.urandom(_NONCE)
    sealed = _passphrase_key(passphrase, salt).encrypt(nonce, plain, _BACKUP_MAGIC)
    return _BACKUP_MAGIC + salt + nonce + sealed


def decrypt_backup(blob: bytes, passphrase: str) -> bytes:
    if not blob.startswith(_BACKUP_MAGIC):
        raise KeystoreError("not a certgate backup file")
    body = blob[len(_BACKUP_MAGIC) :]
    salt, nonce, sealed = body[:_SALT], body[_SALT : _SALT + _NONCE], body[_SALT + _NONCE :]
    try:
        return _passphrase_key(passphrase, salt).decrypt(nonce, sealed, _BACKUP_MAGIC)
    except InvalidTag as exc:
        raise KeystoreError("backup does not open: wrong passphrase or damaged file") from exc
