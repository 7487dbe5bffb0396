"""The sealed SSO client secret (console/sso_secret.py): what may be a secret, the sealed
blob opening only with its master key and label, and the file shell's precise refusals.
The CLI over a real data directory: tests/console/test_cli_sso.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from certgate.console.sso_secret import MAX_BYTES, SealedSecret, checked, seal, unseal
from certgate.errors import ConfigError, KeystoreError
from certgate.pki.keystore import MasterKey

MASTER = MasterKey(os.urandom(32), "the test's master key")
SECRET = "s3cr3t-of-the-console-client"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("a" * (MAX_BYTES + 1), "over 1024 bytes"),
        ("é" * (MAX_BYTES // 2 + 1), "over 1024 bytes"),  # bytes are counted, not letters
        ("line\nbreak", "control characters"),
        ("tab\there", "control characters"),
        ("nul\x00", "control characters"),
        ("del\x7f", "control characters"),
        ("c1\x9b", "control characters"),
    ],
)
def test_what_cannot_be_a_client_secret_is_refused(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        checked(value)


def test_a_secret_up_to_1_kib_of_printable_text_is_taken() -> None:
    for value in ("x", "a" * MAX_BYTES, "with space and ünïcode ~!@#$%^&*()"):
        assert checked(value) == value


def test_a_sealed_secret_opens_only_with_its_master_key_and_label() -> None:
    blob = seal(MASTER, SECRET)
    assert SECRET.encode() not in blob
    assert unseal(MASTER, blob) == SECRET
    with pytest.raises(KeystoreError, match="wrong master key or tampered"):
        unseal(MasterKey(os.urandom(32)), blob)
    with pytest.raises(KeystoreError, match="wrong master key or tampered"):
        unseal(MASTER, MASTER.seal_bytes(SECRET.encode(), "another label"))
    with pytest.raises(KeystoreError, match=r"not a client secret: .*control"):
        unseal(MASTER, MASTER.seal_bytes(b"two\nlines", "console sso client secret"))


@given(st.binary(max_size=200))
def test_arbitrary_bytes_fail_cleanly_as_keystore_errors(blob: bytes) -> None:
    with pytest.raises(KeystoreError):
        unseal(MASTER, blob)


def test_the_file_is_written_owner_only_and_read_back(tmp_path: Path) -> None:
    sealed = SealedSecret(tmp_path / "sso-client-secret.sealed", MASTER)
    sealed.write(SECRET)
    assert (sealed.path.stat().st_mode & 0o777) == 0o600
    assert SECRET.encode() not in sealed.path.read_bytes()
    assert sealed.read() == SECRET
    sealed.write("the next one")  # replaced whole, no temporary file left
    assert sealed.read() == "the next one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sso-client-secret.sealed"]
    assert sealed.remove() and not sealed.remove()


def test_the_file_shell_says_precisely_why_there_is_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "sso-client-secret.sealed"
    sealed = SealedSecret(path, MASTER)
    with pytest.raises(ConfigError, match=r"is missing: run `certgate console sso set-secret`"):
        sealed.read()
    sealed.write(SECRET)
    with pytest.raises(ConfigError, match=r"does not open .*wrong master key or tampered"):
        SealedSecret(path, MasterKey(os.urandom(32))).read()
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(ConfigError, match=r"does not open .*wrong master key or tampered"):
        sealed.read()
    path.write_bytes(SECRET.encode())  # a secret in clear where the sealed one belongs
    with pytest.raises(ConfigError, match="not in keystore format"):
        sealed.read()
    sealed.write(SECRET)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="has mode 0644"):
        sealed.read()
