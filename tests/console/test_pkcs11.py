"""The console with its CA keys in a PKCS#11 token (SoftHSM v2): ``console init`` generates
them there, the console signs with them, and a token that goes away makes issuance answer
503 with the JSON error body, audited, never signed by a key from anywhere else."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from certgate.console import local
from certgate.console.config import ConsoleConfig
from certgate.console.services import admins, ca
from certgate.console.store.models import AuditEntry, SealedKey
from certgate.errors import ConfigError, PKIError
from certgate.pki.keys import KeyAlgorithm
from certgate.pki.token import TokenKey
from tests.softhsm import MODULE, PIN_ENV, SoftHSM
from tests.support import CERTGATE, free_port, make_csr, start_console


def init(data_dir: Path, port: int, hsm: SoftHSM, token: str) -> ca.InstancePKI:
    url = f"https://127.0.0.1:{port}"
    config = hsm.config(token)
    return local.init(data_dir, KeyAlgorithm.EC_P256, url, "127.0.0.1", port, None, config)[1]


def test_init_generates_the_ca_keys_in_the_token_and_seals_none(
    hsm: SoftHSM, tmp_path: Path
) -> None:
    data_dir = tmp_path / "console"
    init(data_dir, free_port(), hsm, "console")
    settings = json.loads((data_dir / "console.json").read_text())
    assert (settings["pkcs11_token"], settings["pkcs11_pin_env"]) == ("console", PIN_ENV)
    assert hsm.pin not in (data_dir / "console.json").read_text()
    db, pki = local.open_db(local.load_config(data_dir))
    try:
        with db.transaction() as session:
            stored = {k.label: k.sealed for k in session.execute(select(SealedKey)).scalars()}
            admin = admins.create_admin(session, "ops", "superadmin", "global")
            cert, _ = admins.issue_admin_cert(session, pki, admin)
    finally:
        db.dispose()
    # Each CA row names its key in the token; the database holds no copy of it.
    ca_rows = {label: blob for label, blob in stored.items() if label.startswith("ca:")}
    assert ca_rows == {f"ca:{c}": ca.TOKEN_REFERENCE + f"ca:{c}".encode() for c in pki.certs}
    assert all(isinstance(pki.issuer(label).key, TokenKey) for label in pki.certs)
    cert.verify_directly_issued_by(pki.certs[ca.ADMIN_CA])
    with pytest.raises(PKIError, match="cannot be exported; back up the token"):
        ca.ca_keys(pki)


@pytest.mark.integration
def test_issuance_answers_503_when_the_token_is_gone(hsm: SoftHSM, tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "console"
    init(data_dir, port, hsm, "api")
    console = start_console(tmp_path, data_dir, port)
    try:
        root = console.make_admin("root", "superadmin", "global")
        user, password = "alice", secrets.token_urlsafe(12)
        with console.client(root) as client:
            made = client.post(
                "/api/v1/groups/global/enrollment-users",
                json={"username": user, "password": password},
            )
            assert made.status_code == 201, made.text
        with console.client() as client:
            body = {"username": user, "password": password, "platform": "ios", "name": user}
            enrolled = client.post("/api/v1/enroll", json=body)
            assert enrolled.status_code == 201, enrolled.text
        credential = enrolled.json()["credential"]
        with console.client(api_key=credential) as device:
            first = device.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})
            assert first.status_code == 201, first.text  # signed in the token
            hsm.delete("api")
            second = device.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})
        assert second.status_code == 503, second.text
        assert second.json()["error"] == "unavailable"
        assert "PKCS#11 token 'api'" in second.json()["detail"]
        with console.local() as (session, _):
            denied = session.execute(
                select(AuditEntry).where(AuditEntry.outcome == "denied")
            ).scalars()
            codes = [(e.action, e.detail.get("status"), e.detail.get("code")) for e in denied]
        assert ("POST /api/v1/device/profile", 503, "unavailable") in codes
    finally:
        console.stop()


def rewrite_settings(data_dir: Path, **changes: object) -> None:
    path = data_dir / "console.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_console_without_the_token_settings_refuses_token_keys(
    hsm: SoftHSM, tmp_path: Path
) -> None:
    data_dir = tmp_path / "console"
    init(data_dir, free_port(), hsm, "console")
    rewrite_settings(data_dir, pkcs11_module=None, pkcs11_token=None, pkcs11_pin_env=None)
    with pytest.raises(
        ConfigError, match=r"'ca:[a-z-]+' is in a PKCS#11 token: console\.json needs"
    ):
        local.open_db(local.load_config(data_dir))


def test_a_console_with_token_settings_never_uses_sealed_ca_keys(
    hsm: SoftHSM, tmp_path: Path
) -> None:
    data_dir, port = tmp_path / "console", free_port()
    local.init(data_dir, KeyAlgorithm.EC_P256, f"https://127.0.0.1:{port}", "127.0.0.1", port, None)
    config = hsm.config("console")
    rewrite_settings(
        data_dir,
        pkcs11_module=config.module,
        pkcs11_token=config.token_label,
        pkcs11_pin_env=config.pin_env,
    )
    with pytest.raises(ConfigError, match=r"'ca:[a-z-]+' was not created in a PKCS#11 token"):
        local.open_db(local.load_config(data_dir))


def test_token_settings_come_all_three_or_none(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="module, a token label and a PIN variable together"):
        ConsoleConfig(data_dir=tmp_path, db_url="sqlite:///x.db", pkcs11_token="only-a-label")


def test_console_init_cli_takes_the_token_options(hsm: SoftHSM, tmp_path: Path) -> None:
    base = [*CERTGATE, "console", "init", "-d"]
    options = ["--pkcs11-module", MODULE, "--pkcs11-token", "console"]
    made = subprocess.run(
        [*base, str(tmp_path / "a"), *options, "--pkcs11-pin-env", PIN_ENV],
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    assert "CA keys: in PKCS#11 token 'console'" in made.stdout
    partial = subprocess.run(
        [*base, str(tmp_path / "b"), *options], capture_output=True, text=True, check=False
    )
    assert partial.returncode == 1
    assert "needs a module, a token label and a PIN variable" in partial.stderr
