"""Fixtures of the console's store tests: a new, empty database on each backend, the store
of the module's running console, device rows written directly, and the audit tests' ways
to write, tamper with and verify a data directory's log."""

from __future__ import annotations

import itertools
import secrets
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from certgate.console import local
from certgate.console.config import ConsoleConfig
from certgate.console.services import audit, ca, rotation
from certgate.console.store.db import Database
from certgate.console.store.models import Certificate, Device, Rotation, SealedKey
from certgate.pki.keys import KeyAlgorithm
from certgate.pki.keystore import ENV_VAR
from tests.postgres import PostgresServer
from tests.softhsm import PIN_ENV, SoftHSM, shared
from tests.support import CERTGATE, RunningConsole
from tests.tunnel.conftest import COMPLIANT, create_group

_names = itertools.count()


@pytest.fixture(autouse=True)
def no_master_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests decide where the master key comes from, not the caller's environment."""
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'console.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database(f"store{next(_names)}")


@pytest.fixture(scope="module")
def store(console: RunningConsole) -> Iterator[tuple[Database, ca.InstancePKI]]:
    """The database and PKI of the module's running console, opened in this process."""
    db, pki = local.open_db(local.load_config(console.data_dir))
    try:
        yield db, pki
    finally:
        db.dispose()


def add_device(session: Any, group_id: str) -> str:
    """An enrolled device of ``group_id`` with one device certificate; returns its uid."""
    uid, now = secrets.token_hex(16), ca.now()
    session.add(
        Device(
            uid=uid,
            group_id=group_id,
            platform="linux",
            owner="owner",
            enrollment_status="enrolled",
            compliance_status="compliant",
            credential_hash=secrets.token_hex(32),
            enrolled_at=now,
            updated_at=now,
        )
    )
    session.add(
        Certificate(
            serial=secrets.token_hex(19),
            thumbprint=secrets.token_hex(32),
            kind="device",
            issuer_label=ca.DEVICE_ROOT,
            group_id=group_id,
            device_uid=uid,
            subject=f"CN=device {uid}",
            not_before=now,
            not_after=now + timedelta(days=30),
            issued_at=now,
            cert_pem="(not read by snapshots)",
        )
    )
    session.flush()
    return uid


def append_audit(data_dir: Path, entries: int) -> None:
    """``entries`` audit entries written as a local command would write them."""
    db, _ = local.open_db(local.load_config(data_dir))
    with db.transaction() as session:
        for n in range(entries):
            audit.append(session, "cli:test", "test.action", group_id="global", n=n)
    db.dispose()


def tamper(data_dir: Path, *statements: object) -> None:
    """What a database writer does: statements on the data dir's database, committed."""
    db, _ = local.open_db(local.load_config(data_dir))
    with db.transaction() as session:
        for statement in statements:
            session.execute(statement)  # type: ignore[call-overload]
    db.dispose()


def cli_audit_verify(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CERTGATE, "console", "audit", "verify", "-d", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def hsm(monkeypatch: pytest.MonkeyPatch) -> SoftHSM:
    """The shared throwaway SoftHSM token, its PIN in the environment (a console
    subprocess inherits it too)."""
    softhsm = shared()
    monkeypatch.setenv(PIN_ENV, softhsm.pin)
    return softhsm


def token_console(
    hsm: SoftHSM, tmp_path: Path, token: str
) -> tuple[ConsoleConfig, Database, ca.InstancePKI]:
    """A fresh console data dir whose CA keys live in the SoftHSM ``token``, opened."""
    data_dir, url = tmp_path / "console", "https://127.0.0.1:8443"
    local.init(data_dir, KeyAlgorithm.EC_P256, url, "127.0.0.1", 8443, None, hsm.config(token))
    config = local.load_config(data_dir)
    db, pki = local.open_db(config)
    return config, db, pki


def switched_in_token(session: Session, pki: ca.InstancePKI, kind: str, role: str) -> Rotation:
    """Prepare and switch a rotation of ``kind`` on a token console: the new CA (of
    ``role``) has its key made in the token, the database holding only a reference."""
    started = rotation.prepare(session, pki, local.TOP_GROUP, kind, "test")
    rotation.switch(session, pki, local.TOP_GROUP, kind)
    label = ca.version_label(role, started.id)
    reference = session.get(SealedKey, f"ca:{label}")
    assert reference is not None
    assert reference.sealed == ca.TOKEN_REFERENCE + f"ca:{label}".encode()
    return started


def local_superadmin_refused(console: RunningConsole, path: str, kind: str) -> None:
    """A superadmin of a group below the top one may not rotate the instance's ``kind``."""
    group = create_group(console, COMPLIANT)
    local_admin = console.make_admin(f"super-{group}", "superadmin", group)
    with console.client(local_admin) as client:
        refused = client.post(path.format(group))
    assert refused.status_code == 403, refused.text
    body = refused.json()
    assert set(body) == {"error", "detail"}
    assert body["detail"] == f"rotating the {kind} needs a top-level superadmin"
