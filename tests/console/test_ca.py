"""The instance PKI as the console stores it: initialisation, sealed keys, loading,
issuance records, revocation and the Device Root CRL, on a real SQLite database."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from sqlalchemy import select

from certgate.console.services import ca
from certgate.console.store.db import Database, migrate
from certgate.console.store.models import CACert, Certificate, Group, Instance, SealedKey
from certgate.errors import Conflict, InvalidCSR, KeystoreError, NotFound, PKIError
from certgate.pki import identity
from certgate.pki.authority import Authority, Names
from certgate.pki.keys import KeyAlgorithm, generate_key
from certgate.pki.keystore import MasterKey
from certgate.pki.profiles import ADMIN_CLIENT, DEVICE_CLIENT, TUNNEL_IDENTITY
from certgate.pki.thumbprint import thumbprint
from certgate.pki.verify import verify_client_chain, verify_server_chain
from tests.pki.conftest import openssl_verify, write_pem
from tests.support import make_csr

GROUP = "group-a"
DEVICE_UID = "0123456789abcdef0123456789abcdef"
LABELS = {ca.ROOT, ca.SECURE_CHANNEL_ROOT, ca.DEVICE_ROOT, ca.ADMIN_CA}


class ConsoleInstance:
    """A migrated SQLite database holding an initialised instance PKI."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.db = Database("sqlite:///" + str(directory / "console.db"))
        migrate(self.db.engine)
        self.master = MasterKey(os.urandom(32))
        with self.db.transaction() as session:
            self.pki = ca.init_instance(
                session, self.master, KeyAlgorithm.EC_P256, "https://console.example.test"
            )
            session.add(Group(id=GROUP, name=GROUP, parent_id=None, created_at=ca.now()))

    def issue_device(self) -> tuple[x509.Certificate, str]:
        names = Names(f"device {DEVICE_UID}", identity.device(DEVICE_UID, GROUP))
        record = ca.Record("device", GROUP, DEVICE_UID)
        with self.db.transaction() as session:
            cert, row = self.pki.issue(
                session, ca.DEVICE_ROOT, DEVICE_CLIENT, names, generate_key().public_key(), record
            )
            return cert, row.serial

    def issue_admin(self) -> tuple[x509.Certificate, str]:
        names = Names("admin alice", identity.admin("f" * 32))
        with self.db.transaction() as session:
            cert, row = self.pki.issue(
                session,
                ca.ADMIN_CA,
                ADMIN_CLIENT,
                names,
                generate_key().public_key(),
                ca.Record("admin"),
            )
            return cert, row.serial


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleInstance]:
    """One instance for tests that only read or add independent rows."""
    instance = ConsoleInstance(tmp_path_factory.mktemp("instance"))
    yield instance
    instance.db.dispose()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[ConsoleInstance]:
    """A new instance for tests that count revocations or CRL numbers."""
    instance = ConsoleInstance(tmp_path)
    yield instance
    instance.db.dispose()


# --- initialisation ------------------------------------------------------------------


def test_init_creates_root_and_three_intermediates(shared: ConsoleInstance) -> None:
    certs = shared.pki.certs
    assert set(certs) == LABELS
    root = certs[ca.ROOT]
    assert root.subject == root.issuer
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1
    for label in ca.INTERMEDIATES:
        cert = certs[label]
        cert.verify_directly_issued_by(root)
        assert cert.subject.rfc4514_string() == f"CN={ca.CA_NAMES[label]},O=certgate"
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert (bc.ca, bc.path_length) == (True, 0)


def test_init_stores_certs_sealed_keys_and_records(shared: ConsoleInstance) -> None:
    with shared.db.transaction() as session:
        ca_rows = session.execute(select(CACert)).scalars().all()
        sealed = session.execute(select(SealedKey)).scalars().all()
        records = session.execute(
            select(Certificate).where(Certificate.kind.like("ca:%"))
        ).scalars()
        assert {r.label: r.key_label for r in ca_rows} == {lbl: f"ca:{lbl}" for lbl in LABELS}
        assert {r.label for r in sealed} == {f"ca:{lbl}" for lbl in LABELS}
        by_kind = {r.kind: r for r in records}
        instance = session.get(Instance, 1)
        assert instance is not None and instance.crl_number == 0
    assert set(by_kind) == {f"ca:{lbl}" for lbl in LABELS}
    for label in LABELS:
        assert by_kind[f"ca:{label}"].thumbprint == thumbprint(shared.pki.certs[label])


def test_sealed_keys_are_not_pem_in_the_database(shared: ConsoleInstance) -> None:
    with shared.db.transaction() as session:
        blobs = session.execute(select(SealedKey.sealed)).scalars().all()
    assert len(blobs) == 4
    for blob in blobs:
        assert b"PRIVATE KEY" not in blob
        assert b"-----BEGIN" not in blob
    # Nor anywhere in the SQLite files (main database and write-ahead log).
    for path in shared.directory.glob("console.db*"):
        assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_init_twice_conflicts(shared: ConsoleInstance) -> None:
    with pytest.raises(Conflict, match="instance already initialised"):
        with shared.db.transaction() as session:
            ca.init_instance(session, shared.master, KeyAlgorithm.EC_P256, "https://x.test")
    with shared.db.transaction() as session:
        assert len(session.execute(select(CACert)).scalars().all()) == 4


# --- loading -------------------------------------------------------------------------


def test_load_restores_certs_and_matching_keys(shared: ConsoleInstance) -> None:
    with shared.db.transaction() as session:
        loaded = ca.InstancePKI.load(session, shared.master)
    assert loaded.certs == shared.pki.certs
    for label in LABELS:
        issuer = loaded.issuer(label)
        assert issuer.key.public_key() == issuer.cert.public_key()


def test_load_with_wrong_master_key_fails_at_load_time(shared: ConsoleInstance) -> None:
    with shared.db.transaction() as session:
        with pytest.raises(KeystoreError, match="wrong master key or tampered data"):
            ca.InstancePKI.load(session, MasterKey(os.urandom(32)))


def test_load_uninitialised_database(tmp_path: Path) -> None:
    db = Database("sqlite:///" + str(tmp_path / "empty.db"))
    migrate(db.engine)
    try:
        with db.transaction() as session:
            with pytest.raises(PKIError, match="instance PKI is not initialised"):
                ca.InstancePKI.load(session, MasterKey(os.urandom(32)))
    finally:
        db.dispose()


# --- issuance ------------------------------------------------------------------------


def test_issue_records_the_certificate(shared: ConsoleInstance) -> None:
    cert, serial = shared.issue_device()
    with shared.db.transaction() as session:
        row = session.get(Certificate, serial)
        assert row is not None
        assert row.serial == format(cert.serial_number, "x")
        assert row.thumbprint == thumbprint(cert)
        assert (row.kind, row.issuer_label) == ("device", ca.DEVICE_ROOT)
        assert (row.group_id, row.device_uid) == (GROUP, DEVICE_UID)
        assert row.not_after == cert.not_valid_after_utc
        assert row.cert_pem == ca.pem(cert)
        assert row.revoked_at is None


def test_issued_device_cert_chains_to_device_root(shared: ConsoleInstance) -> None:
    cert, _ = shared.issue_device()
    intermediate, root = shared.pki.chain(ca.DEVICE_ROOT)
    assert root == shared.pki.certs[ca.ROOT]
    chain = verify_client_chain(cert, [intermediate], [root], expected_issuer=intermediate)
    assert chain == [cert, intermediate, root]


def test_instance_chain_verifies_with_openssl(shared: ConsoleInstance, tmp_path: Path) -> None:
    cert, _ = shared.issue_device()
    root = write_pem(tmp_path / "root.pem", [shared.pki.certs[ca.ROOT]])
    device_root = write_pem(tmp_path / "device-root.pem", [shared.pki.certs[ca.DEVICE_ROOT]])
    leaf = write_pem(tmp_path / "device.pem", [cert])
    client = openssl_verify(root, device_root, leaf, "sslclient")
    assert client.returncode == 0, client.stdout + client.stderr
    server = openssl_verify(root, device_root, leaf, "sslserver")
    assert server.returncode != 0


def test_instance_tunnel_identity_is_a_server(shared: ConsoleInstance, tmp_path: Path) -> None:
    names = Names(f"tunnel {GROUP}", identity.tunnel(GROUP), ("tunnel.example.test",))
    with shared.db.transaction() as session:
        cert, _ = shared.pki.issue(
            session,
            ca.SECURE_CHANNEL_ROOT,
            TUNNEL_IDENTITY,
            names,
            generate_key().public_key(),
            ca.Record("tunnel-identity", GROUP),
        )
    secure_channel_root, root = shared.pki.chain(ca.SECURE_CHANNEL_ROOT)
    verify_server_chain(cert, [secure_channel_root], [root], "tunnel.example.test")
    result = openssl_verify(
        write_pem(tmp_path / "root.pem", [root]),
        write_pem(tmp_path / "scr.pem", [secure_channel_root]),
        write_pem(tmp_path / "tunnel.pem", [cert]),
        "sslserver",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_issue_from_bad_csr_records_nothing(shared: ConsoleInstance) -> None:
    with shared.db.transaction() as session:
        before = len(session.execute(select(Certificate)).scalars().all())
        with pytest.raises(InvalidCSR):
            shared.pki.issue_from_csr(
                session,
                ca.DEVICE_ROOT,
                DEVICE_CLIENT,
                Names("x"),
                b"not a CSR",
                ca.Record("device"),
            )
        assert len(session.execute(select(Certificate)).scalars().all()) == before


def test_issue_from_csr_writes_the_row_at_once(shared: ConsoleInstance) -> None:
    names = Names(f"device {DEVICE_UID}", identity.device(DEVICE_UID, GROUP))
    with shared.db.transaction() as session:
        cert, row = shared.pki.issue_from_csr(
            session,
            ca.DEVICE_ROOT,
            DEVICE_CLIENT,
            names,
            make_csr()[0],
            ca.Record("device", GROUP, DEVICE_UID),
        )
        assert row not in session  # a detached value; the row itself is already written
        stored = session.execute(
            select(Certificate.thumbprint).where(Certificate.serial == row.serial)
        ).scalar_one()
        assert stored == row.thumbprint == thumbprint(cert)
    with shared.db.transaction() as session:
        committed = session.get(Certificate, row.serial)
        assert committed is not None and committed.cert_pem == ca.pem(cert)
        assert (committed.kind, committed.device_uid, committed.revoked_at) == (
            "device",
            DEVICE_UID,
            None,
        )


def test_chain_pem_is_the_chain_encoded(shared: ConsoleInstance) -> None:
    for label in (ca.DEVICE_ROOT, ca.SECURE_CHANNEL_ROOT):
        expected = [ca.pem(c) for c in shared.pki.chain(label)]
        assert shared.pki.chain_pem(label) == expected
        shared.pki.chain_pem(label).clear()  # callers get their own list
        assert shared.pki.chain_pem(label) == expected


# --- revocation and the Device Root CRL ----------------------------------------------


def test_revoke_rejects_unknown_reason(shared: ConsoleInstance) -> None:
    _, serial = shared.issue_device()
    with shared.db.transaction() as session:
        for reason in ("stolen", "unspecified", "removeFromCRL", "KEYCOMPROMISE", ""):
            with pytest.raises(PKIError, match=f"unknown revocation reason {reason!r}"):
                ca.revoke(session, serial, reason)
        row = session.get(Certificate, serial)
        assert row is not None and row.revoked_at is None


def test_accepted_revocation_reasons() -> None:
    assert set(ca.REVOCATION_REASONS) == {
        "keyCompromise",
        "cACompromise",
        "affiliationChanged",
        "superseded",
        "cessationOfOperation",
        "certificateHold",
        "privilegeWithdrawn",
        "aACompromise",
    }


def test_revoke_unknown_serial(shared: ConsoleInstance) -> None:
    with shared.db.transaction() as session:
        with pytest.raises(NotFound, match="certificate abc not found"):
            ca.revoke(session, "abc", "keyCompromise")


def test_revoke_is_idempotent(fresh: ConsoleInstance) -> None:
    _, serial = fresh.issue_device()
    with fresh.db.transaction() as session:
        first = ca.revoke(session, serial, "keyCompromise")
        when = first.revoked_at
    with fresh.db.transaction() as session:
        again = ca.revoke(session, serial, "superseded")
        assert (again.revoked_at, again.revocation_reason) == (when, "keyCompromise")


def make_crl(instance: ConsoleInstance) -> x509.CertificateRevocationList:
    with instance.db.transaction() as session:
        der = ca.device_root_crl(session, instance.pki, timedelta(days=7))
    (instance.directory / "device-root.crl").write_bytes(der)
    return x509.load_der_x509_crl(der)


def test_device_root_crl_lists_revoked_device_certs(fresh: ConsoleInstance) -> None:
    device, device_serial = fresh.issue_device()
    kept, _ = fresh.issue_device()
    admin, admin_serial = fresh.issue_admin()
    with fresh.db.transaction() as session:
        ca.revoke(session, device_serial, "keyCompromise")
        ca.revoke(session, admin_serial, "superseded")  # another CA's: not on this CRL
    crl = make_crl(fresh)
    device_root = fresh.pki.certs[ca.DEVICE_ROOT]
    assert crl.issuer == device_root.subject
    assert crl.is_signature_valid(fresh.pki.issuer(ca.DEVICE_ROOT).key.public_key())
    assert not crl.is_signature_valid(fresh.pki.issuer(ca.ROOT).key.public_key())
    assert len(crl) == 1
    entry = crl.get_revoked_certificate_by_serial_number(device.serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(kept.serial_number) is None
    assert crl.get_revoked_certificate_by_serial_number(admin.serial_number) is None
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=7)


def test_crl_numbers_increase(fresh: ConsoleInstance) -> None:
    numbers = [
        make_crl(fresh).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        for _ in range(3)
    ]
    assert numbers == [1, 2, 3]


def openssl_crl_verify(crl: Path, cafile: Path) -> subprocess.CompletedProcess[str]:
    command = ["openssl", "crl", "-inform", "DER", "-in", str(crl), "-noout"]
    command += ["-CAfile", str(cafile), "-verify"]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def test_device_root_crl_verifies_with_openssl(
    fresh: ConsoleInstance, shared: ConsoleInstance
) -> None:
    _, serial = fresh.issue_device()
    with fresh.db.transaction() as session:
        ca.revoke(session, serial, "keyCompromise")
    make_crl(fresh)
    crl_path = fresh.directory / "device-root.crl"
    certs = fresh.pki.certs
    cafile = write_pem(fresh.directory / "chain.pem", [certs[ca.DEVICE_ROOT], certs[ca.ROOT]])
    result = openssl_crl_verify(crl_path, cafile)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "verify OK"
    # Another instance's Device Root has the same name but another key: the signature fails.
    impostor = shared.pki.certs[ca.DEVICE_ROOT]
    assert impostor.subject == certs[ca.DEVICE_ROOT].subject
    refused = openssl_crl_verify(crl_path, write_pem(fresh.directory / "other.pem", [impostor]))
    # OpenSSL 3.0 `crl -verify` exits 0 even on a bad signature: its message is the verdict.
    assert refused.stderr.strip() == "verify failure"


def test_a_leaf_is_served_with_the_ca_that_signed_it(shared: ConsoleInstance) -> None:
    """``chain_of`` finds a leaf's own issuer among the CAs, not the current one of its
    role; a certificate no CA of the instance signed is refused."""
    pki = shared.pki
    for role in (ca.DEVICE_ROOT, ca.SECURE_CHANNEL_ROOT):
        key = generate_key()
        leaf = pki.authority.issue(pki.issuer(role), DEVICE_CLIENT, Names("leaf"), key.public_key())
        assert pki.chain_of(leaf) == [pki.certs[role], pki.certs[ca.ROOT]]
        assert pki.issuing_ca(leaf) == pki.certs[role]  # again, from what it remembered
    foreign_key = generate_key()
    foreign = Authority().create_root(foreign_key, Names("certgate Device Root"))
    with pytest.raises(PKIError, match="no CA of this instance issued"):
        pki.issuing_ca(foreign)
