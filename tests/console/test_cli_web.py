"""``certgate console admin set-password/totp`` and ``--json`` on every listing.

Uses test_cli's runner and fixtures (the same data directory per test)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest
from sqlalchemy import select

from certgate.console.services import admins, signin
from certgate.console.store.models import AdminSignIn, AuditEntry
from certgate.errors import AuthError
from tests.console.conftest import add_device
from tests.console.test_cli import ACTOR, PASSWORD, invoke, succeed, transaction
from tests.support import init_console

URI_RE_PREFIX = "TOTP URI (shown once): "


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory, _ = init_console(tmp_path)
    return directory


def _with_admin(data_dir: Path, name: str = "ops") -> None:
    succeed(
        "admin",
        "create",
        "-d",
        str(data_dir),
        name,
        "--role",
        "superadmin",
        "--out-dir",
        str(data_dir.parent / "out"),
    )


def test_set_password_and_totp_give_a_working_sign_in(data_dir: Path) -> None:
    _with_admin(data_dir)
    succeed(
        "admin",
        "set-password",
        "-d",
        str(data_dir),
        "ops",
        env={"CERTGATE_ADMIN_PASSWORD": PASSWORD},
    )
    shown = succeed("admin", "totp", "-d", str(data_dir), "ops").stdout
    uri = shown.split(URI_RE_PREFIX)[1].split()[0]
    secret = parse_qs(urlsplit(uri).query)["secret"][0]
    with transaction(data_dir) as (session, pki):
        row = session.get(AdminSignIn, admins.by_username(session, "ops").id)
        assert row is not None and row.password_hash and row.password_hash.startswith("scrypt$")
        assert row.totp_sealed is not None and secret.encode() not in row.totp_sealed
        now = datetime.now(UTC)
        code = pyotp.TOTP(secret).at(now)
        admin = signin.verify_factors(session, pki.master, "ops", PASSWORD, code, now)
        assert admin.username == "ops"
        with pytest.raises(AuthError):
            signin.verify_factors(session, pki.master, "ops", "wrong password!", code, now)
        actions = {
            e.action for e in session.execute(select(AuditEntry)).scalars() if e.actor == ACTOR
        }
    assert {"admin.set_password", "admin.totp"} <= actions


def test_a_short_password_is_refused(data_dir: Path) -> None:
    _with_admin(data_dir)
    result = invoke(
        "admin",
        "set-password",
        "-d",
        str(data_dir),
        "ops",
        env={"CERTGATE_ADMIN_PASSWORD": "short"},
    )
    assert result.exit_code == 1 and "8-1024" in result.stderr


def test_every_listing_prints_json(data_dir: Path) -> None:
    _with_admin(data_dir)
    with transaction(data_dir) as (session, _):
        uid = add_device(session, "global")
    listings = {
        ("admin", "list"): lambda rows: rows[0]["username"] == "ops",
        ("admin", "keys", "ops"): lambda rows: rows[0]["id"] and "secret_hash" not in rows[0],
        ("group", "list"): lambda rows: rows[0]["id"] == "global",
        ("device", "list", "global"): lambda rows: rows[0]["uid"] == uid,
        ("cert", "list", "--group", "global"): lambda rows: any(
            r["device_uid"] == uid for r in rows
        ),
        ("audit", "list"): lambda rows: rows[0]["action"] == "admin.create",
    }
    for command, check in listings.items():
        result = succeed(command[0], command[1], "-d", str(data_dir), *command[2:], "--json")
        rows = json.loads(result.stdout)
        assert isinstance(rows, list) and check(rows), (command, rows)
