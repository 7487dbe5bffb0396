"""Local administration: open a data directory directly (no HTTP), as the CLI does.

The data directory holds ``console.json`` (non-secret settings), ``master.key`` (0600), the
signed audit checkpoints and, by default, the SQLite database. Secrets never go into
``console.json``.

A SQLite database inside the data directory belongs to it: ``console.json`` names it by a
path relative to the directory, so a copied or moved directory opens its own database, not
the one it was copied from. A database outside the directory (PostgreSQL, or a SQLite file
given elsewhere at init) is shared by every copy, as configured.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from certgate.console.checkpointer import Checkpointer, CheckpointSink
from certgate.console.config import DB_FILE, ConsoleConfig, default_db_url
from certgate.console.services import audit, ca
from certgate.console.services.groups import create_group
from certgate.console.store.db import Database, migrate
from certgate.errors import ConfigError
from certgate.pki.keys import KeyAlgorithm
from certgate.pki.keystore import ENV_VAR, MasterKey, load_master_key, new_master_key_file
from certgate.pki.token import TokenConfig

SETTINGS_FILE = "console.json"
TOP_GROUP = "global"
_SQLITE = "sqlite:///"


def save_config(config: ConsoleConfig) -> None:
    data: dict[str, Any] = asdict(config)
    data["data_dir"] = str(config.data_dir)
    data["db_url"] = _stored_db_url(config)
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
    data["db_url"] = _resolve_db_url(data["db_url"], data.get("data_dir"), data_dir)
    data["data_dir"] = data_dir
    return ConsoleConfig(**data)


def _sqlite_path(url: str) -> Path | None:
    return Path(url.removeprefix(_SQLITE)) if url.startswith(_SQLITE) else None


def _stored_db_url(config: ConsoleConfig) -> str:
    """``config.db_url`` as ``console.json`` keeps it: relative when inside the data dir."""
    path = _sqlite_path(config.db_url)
    home = config.data_dir.resolve()
    if path is not None and path.resolve().is_relative_to(home):
        return _SQLITE + str(path.resolve().relative_to(home))
    return config.db_url


def _resolve_db_url(stored: str, stored_dir: str | None, data_dir: Path) -> str:
    """The database of ``data_dir``, from the URL its ``console.json`` holds.

    Relative SQLite paths are the directory's own. An absolute one inside the directory
    named by ``stored_dir`` (``console.json`` of releases that stored absolute paths) is
    rebased onto ``data_dir``. Any other absolute path is used as is, unless ``data_dir``
    holds a database of its own, which it would silently ignore: that is refused."""
    path = _sqlite_path(stored)
    home = data_dir.resolve()
    if path is None:
        return stored
    if not path.is_absolute():
        return _SQLITE + str(home / path)
    for old_home in _old_homes(stored_dir):
        if path.is_relative_to(old_home):
            return _SQLITE + str(home / path.relative_to(old_home))
    own = home / DB_FILE
    if own.exists() and not (path.exists() and path.samefile(own)):
        raise ConfigError(
            f"{data_dir}/{SETTINGS_FILE} names the database {path}, outside {data_dir}, "
            f"while {own} exists: set db_url there to the database you mean"
        )
    return stored


def _old_homes(stored_dir: str | None) -> list[Path]:
    if not stored_dir or not Path(stored_dir).is_absolute():
        return []
    return [Path(stored_dir), Path(stored_dir).resolve()]


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
    db = Database(config.db_url, session_info=audit.session_info(master))
    try:
        migrate(db.engine)
        with db.transaction() as session:
            pki = ca.init_instance(session, master, algorithm, public_url, config.pkcs11)
        with db.transaction() as session:
            create_group(session, pki, TOP_GROUP, "Global", None)
        # The first signed checkpoint vouches for the cut-over (0: every entry keyed).
        first = checkpointer(config, db, pki)
        first.checkpoint()
        first.stop()
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


def checkpointer(config: ConsoleConfig, db: Database, pki: ca.InstancePKI) -> Checkpointer:
    """The checkpointer of this data directory, signing as the top group's console."""
    sink = CheckpointSink(config.audit_sink, config.syslog_address())
    return Checkpointer(db, pki, sink, TOP_GROUP, config.audit_checkpoint_s)


def open_db(config: ConsoleConfig) -> tuple[Database, ca.InstancePKI]:
    master = load_master_key(config.master_key_file)
    db = Database(config.db_url, session_info=audit.session_info(master))
    migrate(db.engine)
    with db.transaction() as session:
        pki = ca.InstancePKI.load(session, master, config.pkcs11)
    return db, pki
