"""Local administration: open a data directory directly (no HTTP), as the CLI does.

The data directory holds ``console.json`` (non-secret settings), ``master.key`` (0600) and,
by default, the SQLite database. Secrets never go into ``console.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from certgate.console.config import ConsoleConfig, default_db_url
from certgate.console.services import ca
from certgate.console.services.groups import create_group
from certgate.console.store.db import Database, migrate
from certgate.errors import ConfigError
from certgate.pki.keys import KeyAlgorithm
from certgate.pki.keystore import ENV_VAR, MasterKey, load_master_key, new_master_key_file
from certgate.pki.token import TokenConfig

SETTINGS_FILE = "console.json"
TOP_GROUP = "global"


def save_config(config: ConsoleConfig) -> None:
    data: dict[str, Any] = asdict(config)
    data["data_dir"] = str(config.data_dir)
    path = config.data_dir / SETTINGS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def load_config(data_dir: Path, **overrides: Any) -> ConsoleConfig:
    path = data_dir / SETTINGS_FILE
    if not path.exists():
        raise ConfigError(f"{data_dir} is not a console data directory (run console init)")
    data = json.loads(path.read_text())
    data.update({k: v for k, v in overrides.items() if v is not None})
    data["data_dir"] = data_dir
    return ConsoleConfig(**data)


def init(
    data_dir: Path,
    algorithm: KeyAlgorithm,
    public_url: str,
    host: str,
    port: int,
    db_url: str | None,
    pkcs11: TokenConfig | None = None,
) -> tuple[ConsoleConfig, ca.InstancePKI]:
    """Create the data dir, master key (unless given by env), schema, PKI, top group. With
    ``pkcs11``, the CA keys are generated in that token and never leave it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    config = ConsoleConfig(
        data_dir=data_dir,
        db_url=db_url or default_db_url(data_dir),
        host=host,
        port=port,
        public_url=public_url,
        pkcs11_module=pkcs11.module if pkcs11 else None,
        pkcs11_token=pkcs11.token_label if pkcs11 else None,
        pkcs11_pin_env=pkcs11.pin_env if pkcs11 else None,
    )
    master = master_for_init(config)
    db = Database(config.db_url)
    try:
        migrate(db.engine)
        with db.transaction() as session:
            pki = ca.init_instance(session, master, algorithm, public_url, config.pkcs11)
        with db.transaction() as session:
            create_group(session, pki, TOP_GROUP, "Global", None)
    finally:
        db.dispose()
    save_config(config)
    return config, pki


def master_for_init(config: ConsoleConfig) -> MasterKey:
    if os.environ.get(ENV_VAR):
        return load_master_key(None)
    if config.master_key_file.exists():
        return load_master_key(config.master_key_file)
    return new_master_key_file(config.master_key_file)


def open_db(config: ConsoleConfig) -> tuple[Database, ca.InstancePKI]:
    master = load_master_key(config.master_key_file)
    db = Database(config.db_url)
    migrate(db.engine)
    with db.transaction() as session:
        pki = ca.InstancePKI.load(session, master, config.pkcs11)
    return db, pki
