"""Keys at rest: AES-256-GCM sealing, master key loading and file modes, backups."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certgate.errors import ConfigError, KeystoreError
from certgate.pki.keys import PrivateKey, generate_key, private_key_pem
from certgate.pki.keystore import (
    ENV_VAR,
    MIN_PASSPHRASE,
    MasterKey,
    decrypt_backup,
    encrypt_backup,
    load_master_key,
    new_master_key_file,
)
from tests.pki.conftest import Hierarchy

PASSPHRASE = "correct horse battery staple"


@pytest.fixture(autouse=True)
def no_master_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(ENV_VAR, raising=False)
    yield


@pytest.fixture
def master() -> MasterKey:
    return MasterKey(os.urandom(32))


def same_key(a: PrivateKey, b: PrivateKey) -> bool:
    return private_key_pem(a) == private_key_pem(b)


# --- sealing -------------------------------------------------------------------------


def test_seal_unseal_round_trip_ec(master: MasterKey) -> None:
    key = generate_key()
    opened = master.unseal(master.seal(key, "ca:root"), "ca:root")
    assert isinstance(opened, ec.EllipticCurvePrivateKey)
    assert same_key(opened, key)


def test_seal_unseal_round_trip_rsa(master: MasterKey, rsa_hierarchy: Hierarchy) -> None:
    key = rsa_hierarchy.root.key
    opened = master.unseal(master.seal(key, "ca:root"), "ca:root")
    assert isinstance(opened, rsa.RSAPrivateKey)
    assert same_key(opened, key)


def test_sealed_blob_is_not_plaintext(master: MasterKey) -> None:
    blob = master.seal(generate_key(), "ca:root")
    assert blob.startswith(b"CGK1")
    assert b"PRIVATE KEY" not in blob
    assert b"-----BEGIN" not in blob


def test_sealing_twice_uses_fresh_nonces(master: MasterKey) -> None:
    key = generate_key()
    assert master.seal(key, "x") != master.seal(key, "x")


def test_wrong_label_does_not_open(master: MasterKey) -> None:
    blob = master.seal(generate_key(), "ca:device-root")
    with pytest.raises(KeystoreError, match="sealed key 'ca:root' does not open"):
        master.unseal(blob, "ca:root")


def test_wrong_master_key_does_not_open(master: MasterKey) -> None:
    blob = master.seal(generate_key(), "ca:root")
    with pytest.raises(KeystoreError, match="wrong master key or tampered data"):
        MasterKey(os.urandom(32)).unseal(blob, "ca:root")


@pytest.mark.parametrize("where", [4, 10, 20, -1], ids=["nonce", "nonce-end", "body", "tag"])
def test_flipped_byte_does_not_open(master: MasterKey, where: int) -> None:
    blob = bytearray(master.seal(generate_key(), "ca:root"))
    blob[where] ^= 0x40
    with pytest.raises(KeystoreError, match="wrong master key or tampered data"):
        master.unseal(bytes(blob), "ca:root")


@pytest.mark.parametrize(
    "blob",
    [b"", b"-----BEGIN PRIVATE KEY-----", b"CGK0" + bytes(64), b"CGK1" + bytes(27)],
    ids=["empty", "pem", "bad-magic", "too-short"],
)
def test_blob_not_in_keystore_format(master: MasterKey, blob: bytes) -> None:
    with pytest.raises(KeystoreError, match="sealed key 'k' is not in keystore format"):
        master.unseal(blob, "k")


def test_master_key_must_be_32_bytes() -> None:
    with pytest.raises(ConfigError, match="exactly 32 bytes"):
        MasterKey(bytes(31))


def test_master_key_repr_hides_the_secret() -> None:
    secret = bytes(range(32))
    key = MasterKey(secret)
    for text in (repr(key), str(key), f"{key!r}"):
        assert text == "MasterKey(<redacted>)"
        assert secret.hex() not in text
        assert base64.urlsafe_b64encode(secret).decode() not in text
        assert repr(secret) not in text


# --- master key files and environment ------------------------------------------------


def write_key_file(path: Path, mode: int, secret: bytes | None = None) -> bytes:
    secret = secret if secret is not None else os.urandom(32)
    path.write_bytes(base64.urlsafe_b64encode(secret) + b"\n")
    path.chmod(mode)
    return secret


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_group_or_world_readable_file(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    write_key_file(path, mode)
    with pytest.raises(ConfigError, match=f"has mode {mode:04o}; refusing to start"):
        load_master_key(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_accepts_owner_only_file(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    secret = write_key_file(path, mode)
    assert load_master_key(path).secret == secret


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_master_key(tmp_path / "absent.key")


def test_load_without_any_source() -> None:
    with pytest.raises(ConfigError, match=f"no master key: set \\${ENV_VAR}"):
        load_master_key(None)


def test_environment_variable_wins_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "master.key"
    write_key_file(path, 0o600)
    secret = os.urandom(32)
    monkeypatch.setenv(ENV_VAR, base64.urlsafe_b64encode(secret).decode())
    assert load_master_key(path).secret == secret
    assert load_master_key(None).secret == secret


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "is not urlsafe base64"),
        (base64.urlsafe_b64encode(bytes(16)).decode(), "must decode to 32 bytes"),
        (base64.urlsafe_b64encode(bytes(33)).decode(), "must decode to 32 bytes"),
        ("%%%%", "is not urlsafe base64"),
    ],
    ids=["bad-padding", "short", "long", "not-alphabet"],
)
def test_environment_variable_is_validated(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(ConfigError, match=f"master key from \\${ENV_VAR} {message}"):
        load_master_key(None)


def test_file_content_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    write_key_file(path, 0o600, bytes(20))
    with pytest.raises(ConfigError, match="must decode to 32 bytes"):
        load_master_key(path)


def test_new_master_key_file_is_owner_only_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    created = new_master_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_master_key(path).secret == created.secret


def test_new_master_key_file_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    new_master_key_file(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        new_master_key_file(path)
    assert path.read_bytes() == before


# --- passphrase backups --------------------------------------------------------------


def test_backup_round_trip() -> None:
    plain = b'{"ca": "everything"}' * 100
    blob = encrypt_backup(plain, PASSPHRASE)
    assert plain not in blob
    assert decrypt_backup(blob, PASSPHRASE) == plain


def test_backup_wrong_passphrase() -> None:
    blob = encrypt_backup(b"secret", PASSPHRASE)
    with pytest.raises(KeystoreError, match="wrong passphrase or damaged file"):
        decrypt_backup(blob, PASSPHRASE + "!")


def test_backup_damaged_file() -> None:
    blob = bytearray(encrypt_backup(b"secret", PASSPHRASE))
    blob[-3] ^= 0x01
    with pytest.raises(KeystoreError, match="wrong passphrase or damaged file"):
        decrypt_backup(bytes(blob), PASSPHRASE)


def test_backup_short_passphrase_rejected() -> None:
    with pytest.raises(KeystoreError, match=f"at least {MIN_PASSPHRASE} characters"):
        encrypt_backup(b"secret", "x" * (MIN_PASSPHRASE - 1))


def test_not_a_backup() -> None:
    with pytest.raises(KeystoreError, match="not a certgate backup file"):
        decrypt_backup(b"PK\x03\x04 a zip file", PASSPHRASE)
