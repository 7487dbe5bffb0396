"""The state directory: private modes, atomic writes, identities that cannot mismatch."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import pkcs12

from certgate.device.state import CertifiedKey, Enrollment, NotEnrolled, StateDir, write_atomic
from certgate.errors import ConfigError, PKIError
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
    assert len(files) == 9
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
    (state.path / "device.pem").chmod(0o644)
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
    stored = (state.path / "device.pem").read_bytes()
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


@pytest.mark.parametrize("bundle", ["../escape", ".hidden", "a/b", "", "x" * 300])
def test_bundle_ids_cannot_escape_the_directory(state: StateDir, bundle: str) -> None:
    with pytest.raises(ConfigError, match="bundle id"):
        state.app_files(bundle)


def test_wipe_removes_only_what_the_agent_wrote(state: StateDir, pki: PKI) -> None:
    state.save_enrollment(ENROLLMENT, "cgd", b"root")
    state.save_app("com.example.browser", identity(pki, "app", "com.example.browser"))
    (state.path / "notes.txt").write_text("mine")
    state.wipe()
    assert sorted(p.name for p in state.path.iterdir()) == ["notes.txt"]


def test_runtime_is_cleared_only_by_its_own_process(state: StateDir) -> None:
    state.save_runtime({"pid": 4242, "http": None})
    state.clear_runtime(1)
    assert state.runtime() == {"pid": 4242, "http": None}
    state.clear_runtime(4242)
    assert state.runtime() is None
