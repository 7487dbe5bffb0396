"""Encrypted CA backup and restore.

The backup holds the root and intermediate certificates and keys (PKCS#8 PEM) in a JSON
document encrypted with scrypt + AES-256-GCM under a passphrase (``pki.keystore``).
Restore builds a NEW data directory around the same CAs with a new master key: devices,
tunnels and admins keep trusting the same roots after a disaster.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy.orm import Session

from certgate.console import local
from certgate.console.config import ConsoleConfig, default_db_url
from certgate.console.services import ca
from certgate.console.services.groups import create_group
from certgate.console.store.db import Database, migrate
from certgate.errors import KeystoreError
from certgate.pki.keys import load_private_key_pem, private_key_pem
from certgate.pki.keystore import MasterKey, decrypt_backup, encrypt_backup

FORMAT = "certgate-ca-backup/1"


def export_cas(session: Session, pki: ca.InstancePKI, passphrase: str) -> bytes:
    keys = ca.ca_keys(pki)
    document = {
        "format": FORMAT,
        "cas": {
            label: {"cert": ca.pem(cert), "key": private_key_pem(keys[label]).decode()}
            for label, cert in pki.certs.items()
        },
    }
    return encrypt_backup(json.dumps(document).encode(), passphrase)


def _load_document(blob: bytes, passphrase: str) -> ca.InstancePKI:
    document = json.loads(decrypt_backup(blob, passphrase))
    if document.get("format") != FORMAT or set(document["cas"]) != {ca.ROOT, *ca.INTERMEDIATES}:
        raise KeystoreError("backup is not a complete certgate CA backup")
    certs, keys = {}, {}
    for label, entry in document["cas"].items():
        certs[label] = x509.load_pem_x509_certificate(entry["cert"].encode())
        keys[label] = load_private_key_pem(entry["key"].encode())
        if certs[label].public_key() != keys[label].public_key():
            raise KeystoreError(f"backup key of {label} does not match its certificate")
    return ca.InstancePKI(MasterKey(b"\0" * 32), certs, _keys=dict(keys))


def restore_into(
    data_dir: Path,
    blob: bytes,
    passphrase: str,
    public_url: str,
    host: str,
    port: int,
    db_url: str | None,
) -> ca.InstancePKI:
    restored = _load_document(blob, passphrase)
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
    pki = ca.InstancePKI(master, restored.certs, _keys=dict(ca.ca_keys(restored)))
    root_key = pki.certs[ca.ROOT].public_key()
    algorithm = "ec-p256"
    if isinstance(root_key, rsa.RSAPublicKey):
        algorithm = f"rsa-{root_key.key_size}"
    db = Database(config.db_url)
    try:
        migrate(db.engine)
        with db.transaction() as session:
            ca.adopt_instance(session, pki, algorithm, public_url)
        with db.transaction() as session:
            create_group(session, pki, local.TOP_GROUP, "Global", None)
    finally:
        db.dispose()
    local.save_config(config)
    return pki
