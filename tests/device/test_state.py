"""The state directory: private modes, atomic writes, identities that cannot mismatch."""

from __future__ import annotations

import base64
import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key, pkcs12

from certgate.device.state import (
    NODE_KEY_ENV,
    CertifiedKey,
    Enrollment,
    NotEnrolled,
    StateDir,
    write_atomic,
)
from certgate.errors import ConfigError, KeystoreError, PKIError
from certgate.pki.keys import generate_key
from tests.tunnel.dataplane import PKI

ENROLLMENT = Enrollment("https://c.test", "ab" * 16, "g1", "linux", "laptop", "2025-01-01")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    state = StateDir(tmp_path / "nested" / "state")
    state.create()
    return state


def identity(pki: PKI, name: str = "device", app: str | None = None) -> CertifiedKey:
    from certgate.pki.keys import load_private_key_pem

    client = pki.client_cert(name, app=app)
    key = load_private_key_pem(client.key_path.read_bytes())
    return CertifiedKey(key, client.cert, (pki.device_root, pki.root))


def test_directory_is_0700_and_every_file_0600(state: StateDir, pki: PKI) -> None:
    state.save_enrollment(ENROLLMENT, "cgd_secret", b"root")
    state.save_profile(identity(pki), {"version": 1})
    state.save_app("com.example.browser", identity(pki, "app", "com.example.browser"))
    assert mode(state.path) == 0o700
    files = [p for p in state.path.rglob("*") if p.is_file()]
    # node.key, enrollment.json, credential, console-ca.pem, device.sealed, profile.json,
    # and the app's identity.sealed and cert.pem: no key export without a password.
    assert len(files) == 8
    assert {mode(p) for p in files} == {0o600}
    assert {mode(p) for p in state.path.rglob("*") if p.is_dir()} == {0o700}


def test_a_directory_open_to_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "open"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    with pytest.raises(ConfigError, match="chmod 700"):
        StateDir(path).create()


def test_a_key_file_open_to_others_is_refused(state: StateDir, pki: PKI) -> None:
    state.save_profile(identity(pki), {"version": 1})
    (state.path / "device.sealed").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        state.device_identity()


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o600
    assert os.listdir(tmp_path) == ["f"]


def test_enrollment_round_trip_and_absence(state: StateDir) -> None:
    with pytest.raises(NotEnrolled):
        state.enrollment()
    state.save_enrollment(ENROLLMENT, "cgd_secret\n", b"root")
    assert state.enrollment() == ENROLLMENT
    assert state.credential() == "cgd_secret"
    with pytest.raises(NotEnrolled):
        StateDir(state.path / "missing").enrollment()


def test_identity_pem_round_trip_in_any_block_order(pki: PKI) -> None:
    device = identity(pki)
    assert CertifiedKey.from_pem(device.to_pem()).to_pem() == device.to_pem()
    reordered = device.to_pem().split(b"-----BEGIN PRIVATE KEY-----")
    swapped = b"-----BEGIN PRIVATE KEY-----" + reordered[1] + reordered[0]
    assert CertifiedKey.from_pem(swapped).thumbprint == device.thumbprint


def test_a_certificate_for_another_key_is_refused(pki: PKI) -> None:
    device = identity(pki)
    with pytest.raises(PKIError, match="does not certify"):
        CertifiedKey(generate_key(), device.cert).check_pair()
    with pytest.raises(PKIError, match="exactly one private key"):
        CertifiedKey.from_pem(device.cert_pem())


def test_a_new_profile_overwrites_the_old_key(state: StateDir, pki: PKI) -> None:
    old, new = identity(pki, "old"), identity(pki, "new")
    state.save_profile(old, {"version": 1})
    state.save_profile(new, {"version": 2})
    stored = state.node_key().unseal_bytes(
        (state.path / "device.sealed").read_bytes(), "device.sealed"
    )
    assert stored == new.to_pem()
    assert old.cert_pem()[:200] not in stored
    assert state.profile_data() == {"version": 2}


def test_app_exports_work_for_other_tools(state: StateDir, pki: PKI) -> None:
    app = identity(pki, "app", "com.example.browser")
    files = state.save_app("com.example.browser", app, b"p12-secret")
    stored = state.app_identity("com.example.browser")
    assert stored is not None and stored.to_pem() == app.to_pem()
    assert state.apps() == ["com.example.browser"]
    key, cert, cas = pkcs12.load_key_and_certificates(files.pkcs12.read_bytes(), b"p12-secret")
    assert cert == app.cert and key is not None and len(cas) == 2
    assert files.cert.read_bytes() == app.cert_pem()
    assert files.key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    exported = load_pem_private_key(files.key.read_bytes(), b"p12-secret")
    assert exported.public_key() == app.key.public_key()
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(files.pkcs12.read_bytes(), None)


def test_without_an_export_password_no_key_is_exported(state: StateDir, pki: PKI) -> None:
    app = identity(pki, "app", "com.example.browser")
    files = state.save_app("com.example.browser", app, b"p12-secret")
    files = state.save_app("com.example.browser", app)
    assert not files.key.exists() and not files.pkcs12.exists()
    assert files.cert.read_bytes() == app.cert_pem()


def test_secrets_are_sealed_under_the_node_key(state: StateDir, pki: PKI) -> None:
    state.save_enrollment(ENROLLMENT, "cgd_secret", b"root")
    state.save_profile(identity(pki), {"version": 1})
    state.save_app("com.example.browser", identity(pki, "app", "com.example.browser"))
    on_disk = b"".join(p.read_bytes() for p in state.path.rglob("*") if p.is_file())
    assert b"PRIVATE KEY" not in on_disk and b"cgd_secret" not in on_disk
    assert mode(state.path / "node.key") == 0o600
    fresh = StateDir(state.path)  # as another process would open it
    assert fresh.credential() == "cgd_secret"
    assert fresh.device_identity() is not None


def test_a_missing_or_wrong_node_key_is_named(
    state: StateDir, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    state.save_profile(identity(pki), {"version": 1})
    monkeypatch.setenv(NODE_KEY_ENV, base64.urlsafe_b64encode(os.urandom(32)).decode())
    with pytest.raises(KeystoreError, match=r"'device.sealed' .* \$CERTGATE_DEVICE_NODE_KEY"):
        StateDir(state.path).device_identity()
    monkeypatch.delenv(NODE_KEY_ENV)
    (state.path / "node.key").unlink()
    with pytest.raises(ConfigError, match=r"node.key does not exist"):
        StateDir(state.path).device_identity()


def test_a_sealed_identity_moved_to_another_file_does_not_open(state: StateDir, pki: PKI) -> None:
    state.save_profile(identity(pki), {"version": 1})
    app = state.app_files("com.example.browser")
    app.directory.mkdir(parents=True, mode=0o700)
    shutil.copy(state.path / "device.sealed", app.identity)
    with pytest.raises(KeystoreError, match="does not open"):
        state.app_identity("com.example.browser")


@pytest.mark.parametrize("bundle", ["../escape", ".hidden", "a/b", "", "x" * 300])
def test_bundle_ids_cannot_escape_the_directory(state: StateDir, bundle: str) -> None:
    with pytest.raises(ConfigError, match="bundle id"):
        state.app_files(bundle)


def test_wipe_removes_only_what_the_agent_wrote(state: StateDir, pki: PKI) -> None:
    state.save_enrollment(ENROLLMENT, "cgd", b"root")
    state.save_app("com.example.browser", identity(pki, "app", "com.example.browser"))
    (state.path / "notes.txt").write_text("mine")
    state.wipe()
    # The node key is the device's, not the enrollment's: a new enrollment seals under it.
    assert sorted(p.name for p in state.path.iterdir()) == ["node.key", "notes.txt"]


def test_runtime_is_cleared_only_by_its_own_process(state: StateDir) -> None:
    state.save_runtime({"pid": 4242, "http": None})
    state.clear_runtime(1)
    assert state.runtime() == {"pid": 4242, "http": None}
    state.clear_runtime(4242)
    assert state.runtime() is None
