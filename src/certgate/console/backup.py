"""Encrypted CA backup and restore.

The backup holds the root and intermediate certificates and keys (PKCS#8 PEM) in a JSON
document encrypted with scrypt + AES-256-GCM under a passphrase (``pki.keystore``).
Restore builds a NEW data directory around the same CAs with a new master key: devices,
tunnels and admins keep trusting the same roots after a disaster.

After rotations (format 2) it also holds every other CA row (a rotation's next, retiring
and retired roots, with their labels, statuses and keys) and the instance-wide rotations
(Device Root, Secure Channel Root, Root) that made them: the restored console issues under the
new CA, still trusts the old one until the running rotation is finished, serves the CRLs
of retired ones, and shows the rotation in ``rotate status``. Restored rotations keep
their ids, which name their CA rows (``device-root@7``). Format 1 backups still restore.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from certgate.console import local
from certgate.console.config import ConsoleConfig, default_db_url
from certgate.console.services import ca
from certgate.console.services.groups import create_group
from certgate.console.store.db import Database, migrate
from certgate.console.store.models import Certificate, Rotation
from certgate.errors import KeystoreError
from certgate.pki.keys import PrivateKey, load_private_key_pem, private_key_pem
from certgate.pki.keystore import MasterKey, decrypt_backup, encrypt_backup

FORMAT = "certgate-ca-backup/2"
FORMATS = ("certgate-ca-backup/1", FORMAT)
_TIMES = ("prepared_at", "switched_at", "finished_at")
_OTHER_STATUSES = (ca.NEXT, ca.RETIRING, ca.RETIRED, ca.OFFERED)


def export_cas(session: Session, pki: ca.InstancePKI, passphrase: str) -> bytes:
    keys, others = ca.ca_keys(pki), ca.other_ca_keys(pki)
    document = {
        "format": FORMAT,
        "cas": {
            label: {"cert": ca.pem(cert), "key": private_key_pem(keys[label]).decode()}
            for label, cert in pki.certs.items()
        },
        "labels": {role: pki.label(role) for role in pki.certs},
        "others": {
            label: {"status": status, "cert": ca.pem(cert), "key": private_key_pem(key).decode()}
            for label, (status, cert, _), key in (
                (label, pki.others[label], others[label]) for label in sorted(pki.others)
            )
        },
        "rotations": [_rotation_out(r) for r in _instance_rotations(session)],
    }
    return encrypt_backup(json.dumps(document).encode(), passphrase)


def _instance_rotations(session: Session) -> list[Rotation]:
    query = select(Rotation).where(Rotation.group_id.is_(None)).order_by(Rotation.id)
    return list(session.execute(query).scalars())


def _rotation_out(rotation: Rotation) -> dict[str, Any]:
    """An instance-wide rotation; its serials name CA certificates the backup holds."""
    fields = {
        "id": rotation.id,
        "kind": rotation.kind,
        "phase": rotation.phase,
        "overlap_s": rotation.overlap_s,
        "started_by": rotation.started_by,
        "forced": rotation.forced,
    }
    for name in _TIMES:
        value = getattr(rotation, name)
        fields[name] = None if value is None else value.isoformat()
    return {**fields, "old_serial": rotation.old_serial, "new_serial": rotation.new_serial}


def _load_document(blob: bytes, passphrase: str) -> tuple[ca.InstancePKI, list[dict[str, Any]]]:
    """The CAs of a backup (as a PKI under a placeholder master key) and its rotations."""
    document = json.loads(decrypt_backup(blob, passphrase))
    roles = {ca.ROOT, *ca.INTERMEDIATES}
    if document.get("format") not in FORMATS or set(document["cas"]) != roles:
        raise KeystoreError("backup is not a complete certgate CA backup")
    certs, keys = {}, {}
    for label, entry in document["cas"].items():
        certs[label], keys[label] = _pair(label, entry)
    labels = {role: str(label) for role, label in document.get("labels", {}).items()}
    if any(ca.role_of(label) != role for role, label in labels.items()):
        raise KeystoreError("backup labels a CA with another role")
    others = {}
    for label, entry in document.get("others", {}).items():
        role = ca.role_of(label)
        if role not in {*roles, *ca.CROSS_ROLES} or entry.get("status") not in _OTHER_STATUSES:
            raise KeystoreError(f"backup CA row {label!r} has an unknown role or status")
        cert, key = _pair(label, entry)
        others[label] = (str(entry["status"]), cert, key)
    pki = ca.InstancePKI(MasterKey(b"\0" * 32), certs, _keys=dict(keys), labels=labels)
    pki.others = dict(others)
    return pki, list(document.get("rotations", []))


def _pair(label: str, entry: dict[str, Any]) -> tuple[x509.Certificate, PrivateKey]:
    cert = x509.load_pem_x509_certificate(entry["cert"].encode())
    key = load_private_key_pem(entry["key"].encode())
    if cert.public_key() != key.public_key():
        raise KeystoreError(f"backup key of {label} does not match its certificate")
    return cert, key


def _restore_rotations(session: Session, rotations: list[dict[str, Any]]) -> None:
    """The instance-wide rotations, under their own ids (their CA rows carry them)."""
    for fields in rotations:
        for name in ("old_serial", "new_serial"):
            if session.get(Certificate, fields[name]) is None:
                raise KeystoreError(f"backup rotation {fields['id']} names an unknown CA")
        times = {
            name: None if fields[name] is None else datetime.fromisoformat(fields[name])
            for name in _TIMES
        }
        session.add(
            Rotation(
                id=int(fields["id"]),
                group_id=None,
                kind=str(fields["kind"]),
                phase=str(fields["phase"]),
                old_serial=fields["old_serial"],
                new_serial=fields["new_serial"],
                overlap_s=int(fields["overlap_s"]),
                started_by=str(fields["started_by"])[:200],
                forced=bool(fields["forced"]),
                **times,
            )
        )
    session.flush()
    if rotations and session.bind is not None and session.bind.dialect.name == "postgresql":
        # Ids given explicitly do not move the sequence: the next rotation follows them.
        session.execute(
            text("SELECT setval(pg_get_serial_sequence('rotations', 'id'), MAX(id)) FROM rotations")
        )


def restore_into(
    data_dir: Path,
    blob: bytes,
    passphrase: str,
    public_url: str,
    host: str,
    port: int,
    db_url: str | None,
) -> ca.InstancePKI:
    restored, rotations = _load_document(blob, passphrase)
    if (data_dir / local.SETTINGS_FILE).exists():
        raise KeystoreError(f"{data_dir} already holds a console; restore into a new one")
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    config = ConsoleConfig(
        data_dir=data_dir,
        db_url=db_url or default_db_url(data_dir),
        host=host,
        port=port,
        public_url=public_url,
    )
    master = local.master_for_init(config)
    pki = ca.InstancePKI(
        master, restored.certs, _keys=dict(ca.ca_keys(restored)), labels=restored.labels
    )
    pki.others = restored.others
    root_key = pki.certs[ca.ROOT].public_key()
    algorithm = "ec-p256"
    if isinstance(root_key, rsa.RSAPublicKey):
        algorithm = f"rsa-{root_key.key_size}"
    db = Database(config.db_url)
    try:
        migrate(db.engine)
        with db.transaction() as session:
            ca.adopt_instance(session, pki, algorithm, public_url)
            session.flush()
            _restore_rotations(session, rotations)
        with db.transaction() as session:
            create_group(session, pki, local.TOP_GROUP, "Global", None)
    finally:
        db.dispose()
    local.save_config(config)
    return pki
