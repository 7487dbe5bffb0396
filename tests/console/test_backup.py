"""Encrypted CA backup and restore: same roots in a new console, new master key.

The point of a backup is continuity after a disaster: certificates issued before it must
verify against the restored instance, and the restored instance must issue certificates
the old trust anchors accept.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select

from certgate.console import backup, local
from certgate.console.services import ca, devices, rotation
from certgate.console.store.models import AuditEntry, CACert, Group
from certgate.errors import ChainError, KeystoreError
from certgate.pki.keys import KeyAlgorithm, generate_key, private_key_pem
from certgate.pki.keystore import decrypt_backup, encrypt_backup
from certgate.pki.thumbprint import thumbprint
from certgate.pki.verify import verify_client_chain
from tests.console.test_cli import PASSWORD, mode_of, refuse, succeed, transaction
from tests.console.test_rotation_secure_channel import console_tls_leaf
from tests.support import free_port, init_console, make_csr, start_console

PASSPHRASE = "correct horse battery staple"
PASSPHRASE_ENV = {"CERTGATE_BACKUP_PASSPHRASE": PASSPHRASE}


@pytest.fixture
def original(tmp_path: Path) -> Path:
    data_dir, _ = init_console(tmp_path / "original")
    return data_dir


@pytest.fixture
def backup_file(original: Path, tmp_path: Path) -> Path:
    path = tmp_path / "ca-backup.bin"
    succeed("backup", "-d", str(original), "--out", str(path), env=PASSPHRASE_ENV)
    return path


def restore(target: Path, backup_file: Path, *extra: str) -> None:
    succeed("restore", "-d", str(target), "--from", str(backup_file), *extra, env=PASSPHRASE_ENV)


def thumbprints(data_dir: Path) -> dict[str, str]:
    with transaction(data_dir) as (_, pki):
        return {label: thumbprint(cert) for label, cert in pki.certs.items()}


def device_cert(data_dir: Path, owner: str) -> x509.Certificate:
    """A Per-App Tunnel device certificate issued by ``data_dir``'s Device Root."""
    with transaction(data_dir) as (session, pki):
        devices.create_enrollment_user(session, local.TOP_GROUP, owner, PASSWORD)
        enrollment = devices.enroll(
            session, token=None, username=owner, password=PASSWORD, platform="linux", name="pc"
        )
        profile = devices.deliver_profile(session, pki, enrollment.device, make_csr()[0])
    return x509.load_pem_x509_certificate(profile["certificate"].encode())


def verify_device_cert(cert: x509.Certificate, data_dir: Path) -> None:
    with transaction(data_dir) as (_, pki):
        device_root = pki.certs[ca.DEVICE_ROOT]
        verify_client_chain(cert, [device_root], [pki.certs[ca.ROOT]], expected_issuer=device_root)


def test_backup_file_is_encrypted_and_private(original: Path, backup_file: Path) -> None:
    data = backup_file.read_bytes()
    assert mode_of(backup_file) == 0o600
    assert b"PRIVATE KEY" not in data
    assert b"CERTIFICATE" not in data  # the whole document is encrypted, not just the keys
    with transaction(original) as (session, _):
        entry = session.execute(
            select(AuditEntry).where(AuditEntry.action == "pki.backup")
        ).scalar_one()
    assert entry.detail["labels"] == sorted([ca.ROOT, *ca.INTERMEDIATES])


def test_restore_keeps_the_roots_under_a_new_master_key(
    original: Path, backup_file: Path, tmp_path: Path
) -> None:
    target = tmp_path / "restored"
    restore(target, backup_file)
    assert thumbprints(target) == thumbprints(original)
    assert (target / "master.key").read_bytes() != (original / "master.key").read_bytes()
    assert mode_of(target) == 0o700
    assert mode_of(target / "master.key") == 0o600
    with transaction(target) as (session, _):
        assert session.get(Group, local.TOP_GROUP) is not None
    assert "audit chain OK" in succeed("audit", "verify", "-d", str(target)).stdout


def test_restore_records_the_given_settings(backup_file: Path, tmp_path: Path) -> None:
    target = tmp_path / "restored"
    url = "https://console.example.test:9443"
    restore(target, backup_file, "--public-url", url, "--port", "9443")
    settings = json.loads((target / local.SETTINGS_FILE).read_text())
    assert settings["public_url"] == url and settings["port"] == 9443
    assert "PRIVATE" not in json.dumps(settings)


def test_original_device_cert_verifies_against_restored_device_root(
    original: Path, tmp_path: Path
) -> None:
    cert = device_cert(original, "alice")  # issued before the backup was taken
    backup_file = tmp_path / "ca-backup.bin"
    succeed("backup", "-d", str(original), "--out", str(backup_file), env=PASSPHRASE_ENV)
    target = tmp_path / "restored"
    restore(target, backup_file)
    verify_device_cert(cert, target)


def test_restored_instance_issues_certs_the_original_roots_accept(
    original: Path, backup_file: Path, tmp_path: Path
) -> None:
    target = tmp_path / "restored"
    restore(target, backup_file)
    verify_device_cert(device_cert(target, "bob"), original)


def test_unrelated_instance_rejects_the_device_cert(original: Path, tmp_path: Path) -> None:
    # Negative control: the verification above is not vacuous.
    other, _ = init_console(tmp_path / "other")
    with pytest.raises(ChainError):
        verify_device_cert(device_cert(original, "alice"), other)


def test_restore_with_wrong_passphrase(backup_file: Path, tmp_path: Path) -> None:
    target = tmp_path / "restored"
    env = {"CERTGATE_BACKUP_PASSPHRASE": "not the right passphrase"}
    message = refuse("restore", "-d", str(target), "--from", str(backup_file), env=env)
    assert "wrong passphrase" in message
    assert not target.exists()


def test_restore_into_an_existing_console(original: Path, backup_file: Path) -> None:
    master = (original / "master.key").read_bytes()
    before = thumbprints(original)
    message = refuse("restore", "-d", str(original), "--from", str(backup_file), env=PASSPHRASE_ENV)
    assert "already holds a console" in message
    assert (original / "master.key").read_bytes() == master
    assert thumbprints(original) == before


def test_backup_refuses_a_short_passphrase(original: Path, tmp_path: Path) -> None:
    out = tmp_path / "ca-backup.bin"
    env = {"CERTGATE_BACKUP_PASSPHRASE": "short"}
    message = refuse("backup", "-d", str(original), "--out", str(out), env=env)
    assert "at least 12 characters" in message
    assert not out.exists()


def test_restore_refuses_a_short_passphrase(backup_file: Path, tmp_path: Path) -> None:
    env = {"CERTGATE_BACKUP_PASSPHRASE": "short"}
    target = tmp_path / "restored"
    message = refuse("restore", "-d", str(target), "--from", str(backup_file), env=env)
    assert "at least 12 characters" in message


def test_restore_of_a_damaged_backup(backup_file: Path, tmp_path: Path) -> None:
    data = bytearray(backup_file.read_bytes())
    data[-1] ^= 0x01
    damaged = tmp_path / "damaged.bin"
    damaged.write_bytes(bytes(data))
    target = tmp_path / "restored"
    message = refuse("restore", "-d", str(target), "--from", str(damaged), env=PASSPHRASE_ENV)
    assert "damaged" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"just some file", "not a certgate backup file"), (None, "No such file")],
)
def test_restore_from_something_else(tmp_path: Path, content: bytes | None, expected: str) -> None:
    source = tmp_path / "source.bin"
    if content is not None:
        source.write_bytes(content)
    target = tmp_path / "restored"
    message = refuse("restore", "-d", str(target), "--from", str(source), env=PASSPHRASE_ENV)
    assert expected in message


def backup_document(cas: dict[str, dict[str, str]]) -> bytes:
    document = {"format": backup.FORMAT, "cas": cas}
    return encrypt_backup(json.dumps(document).encode(), PASSPHRASE)


def exported_cas(data_dir: Path) -> dict[str, dict[str, str]]:
    with transaction(data_dir) as (session, pki):
        blob = backup.export_cas(session, pki, PASSPHRASE)
    cas: dict[str, dict[str, str]] = json.loads(decrypt_backup(blob, PASSPHRASE))["cas"]
    return cas


def restore_blob(blob: bytes, target: Path) -> None:
    backup.restore_into(target, blob, PASSPHRASE, "https://127.0.0.1:7443", "127.0.0.1", 7443, None)


def test_restore_refuses_an_incomplete_backup(original: Path, tmp_path: Path) -> None:
    cas = exported_cas(original)
    del cas[ca.ADMIN_CA]
    with pytest.raises(KeystoreError, match="not a complete"):
        restore_blob(backup_document(cas), tmp_path / "restored")


def test_restore_refuses_a_key_that_does_not_match_its_cert(original: Path, tmp_path: Path) -> None:
    cas = exported_cas(original)
    cas[ca.DEVICE_ROOT]["key"] = private_key_pem(generate_key()).decode()
    with pytest.raises(KeystoreError, match="does not match"):
        restore_blob(backup_document(cas), tmp_path / "restored")


def test_rsa_instance_round_trips(tmp_path: Path) -> None:
    source = tmp_path / "rsa"
    local.init(source, KeyAlgorithm.RSA_2048, "https://127.0.0.1:7443", "127.0.0.1", 7443, None)
    blob = tmp_path / "rsa-backup.bin"
    succeed("backup", "-d", str(source), "--out", str(blob), env=PASSPHRASE_ENV)
    target = tmp_path / "restored"
    restore(target, blob)
    assert thumbprints(target) == thumbprints(source)
    with transaction(target) as (_, pki):
        assert isinstance(pki.certs[ca.ROOT].public_key(), rsa.RSAPublicKey)


def test_a_backup_after_rotations_restores_their_roots_and_the_running_rotation(
    original: Path, tmp_path: Path
) -> None:
    """Secure Channel Root rotated to the end and a Device Root rotation switched but
    running, then backup and restore: the restored console serves and issues under the
    new CAs, still trusts the old Device Root (a certificate it issued verifies), shows
    the running rotation in its status and finishes it."""
    alice = device_cert(original, "alice")  # of the Device Root about to be rotated
    with transaction(original) as (session, pki):
        for kind in (rotation.SECURE_CHANNEL, rotation.DEVICE):
            rotation.prepare(session, pki, local.TOP_GROUP, kind, "test", timedelta(0))
            rotation.switch(session, pki, local.TOP_GROUP, kind)
        rotation.finish(session, pki, local.TOP_GROUP, rotation.SECURE_CHANNEL, force=True)
        new_roots = {role: thumbprint(pki.certs[role]) for role in pki.certs}
        old_device_root = pki.others[ca.DEVICE_ROOT][1]
        old_scr = pki.others[ca.SECURE_CHANNEL_ROOT][1]
    assert new_roots[ca.DEVICE_ROOT] != thumbprint(old_device_root)
    blob = tmp_path / "ca-backup.bin"
    succeed("backup", "-d", str(original), "--out", str(blob), env=PASSPHRASE_ENV)

    target, port = tmp_path / "restored", free_port()
    restore(target, blob, "--port", str(port), "--public-url", f"https://127.0.0.1:{port}")
    with transaction(target) as (_, pki):
        assert {role: thumbprint(pki.certs[role]) for role in pki.certs} == new_roots
        assert pki.device_roots()[1] == old_device_root  # retiring: trusted until finish
        assert pki.others[ca.SECURE_CHANNEL_ROOT][0] == ca.RETIRED
        assert pki.others[ca.SECURE_CHANNEL_ROOT][1] == old_scr
        verify_client_chain(alice, [old_device_root], [pki.certs[ca.ROOT]])
    shown = succeed("rotate", "status", local.TOP_GROUP, "-d", str(target), "--json").stdout
    by_kind = {r["kind"]: r for r in json.loads(shown)}
    assert by_kind[rotation.DEVICE]["phase"] == "switched"
    assert by_kind[rotation.DEVICE]["old"]["thumbprint"] == thumbprint(old_device_root)
    assert by_kind[rotation.SECURE_CHANNEL]["phase"] == "finished"

    running = start_console(tmp_path, target, port)
    try:
        served = console_tls_leaf(running)
        served.verify_directly_issued_by(pki.certs[ca.SECURE_CHANNEL_ROOT])
        with running.client() as client:
            chain = x509.load_pem_x509_certificates(client.get("/pki/chain.pem").content)
            old_crl = client.get(f"/pki/crl/{ca.DEVICE_ROOT}.crl")
        assert thumbprint(old_device_root) not in {thumbprint(c) for c in chain}
        assert {new_roots[ca.DEVICE_ROOT], new_roots[ca.SECURE_CHANNEL_ROOT]} <= {
            thumbprint(c) for c in chain
        }
        assert old_crl.status_code == 200, old_crl.text
        assert x509.load_der_x509_crl(old_crl.content).is_signature_valid(
            old_device_root.public_key()  # type: ignore[arg-type]
        )
    finally:
        running.stop()
    bob = device_cert(target, "bob")  # issued by the restored console: the new Device Root
    with transaction(target) as (_, pki):
        bob.verify_directly_issued_by(pki.certs[ca.DEVICE_ROOT])
    succeed("rotate", "finish", "device-root", local.TOP_GROUP, "-d", str(target), "--force")
    with transaction(target) as (_, pki):
        assert pki.device_roots() == [pki.certs[ca.DEVICE_ROOT]]


def test_a_backup_during_a_root_rotation_restores_both_roots_and_the_shared_keys(
    original: Path, tmp_path: Path
) -> None:
    """A Root rotation switched but running, then backup and restore: the restored
    console trusts both Roots (the new one current), keeps the cross certificates, and
    each intermediate issued again under the new Root shares the key row of its old
    certificate, so what either issued is one CA's (its CRL lists both); it finishes, and a
    backup then restores the cross certificate finish left offered."""
    alice = device_cert(original, "alice")  # of the Device Root before the rotation
    with transaction(original) as (session, pki):
        rotation.prepare(session, pki, local.TOP_GROUP, rotation.ROOT, "test", timedelta(0))
        rotation.switch(session, pki, local.TOP_GROUP, rotation.ROOT)
        old_root, new_root = pki.others[ca.ROOT][1], pki.certs[ca.ROOT]
        crosses = pki.root_crosses()
    assert len(crosses) == 2 and old_root != new_root
    blob = tmp_path / "ca-backup.bin"
    succeed("backup", "-d", str(original), "--out", str(blob), env=PASSPHRASE_ENV)

    target = tmp_path / "restored"
    restore(target, blob)
    with transaction(target) as (session, pki):
        assert pki.roots() == [new_root, old_root]
        assert pki.root_crosses() == crosses
        current = pki.label(ca.DEVICE_ROOT)
        assert pki.family(current) == sorted([ca.DEVICE_ROOT, current])
        key_rows = {row.key_label for row in session.execute(select(CACert)).scalars()}
        assert len(key_rows) == 5  # two Roots, three intermediates: no key stored twice
        verify_client_chain(alice, [pki.certs[ca.DEVICE_ROOT]], [new_root])
    bob = device_cert(target, "bob")  # issued by the restored console under the new Root
    with transaction(target) as (_, pki):
        bob.verify_directly_issued_by(pki.certs[ca.DEVICE_ROOT])
        alice.verify_directly_issued_by(pki.certs[ca.DEVICE_ROOT])
    succeed("rotate", "finish", "root", local.TOP_GROUP, "-d", str(target), "--force")
    with transaction(target) as (_, pki):
        offered = [c for c in crosses if c.public_key() == new_root.public_key()]
        assert pki.roots() == [new_root] and pki.root_crosses() == offered
    # Once finished, a backup restores the cross certificate still offered (status offered).
    after = tmp_path / "ca-backup-after-finish.bin"
    succeed("backup", "-d", str(target), "--out", str(after), env=PASSPHRASE_ENV)
    again = tmp_path / "restored-after-finish"
    restore(again, after)
    with transaction(again) as (_, pki):
        assert pki.roots() == [new_root] and pki.root_crosses() == offered
