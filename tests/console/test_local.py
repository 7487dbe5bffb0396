"""Local administration: data directory layout, settings file, master key, opening the DB."""

from __future__ import annotations

import base64
import json
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import update

from certgate.console import local
from certgate.console.services import ca
from certgate.console.store.models import AuditEntry, Group
from certgate.errors import ConfigError, Conflict, KeystoreError
from certgate.pki.keys import KeyAlgorithm
from certgate.pki.keystore import ENV_VAR
from tests.console.conftest import append_audit, cli_audit_verify, tamper

URL = "https://console.example.test:7443"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def init(data_dir: Path) -> ca.InstancePKI:
    _, pki = local.init(data_dir, KeyAlgorithm.EC_P256, URL, "127.0.0.1", 7443, None)
    return pki


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "console"
    init(directory)
    return directory


@contextmanager
def open_pki(data_dir: Path) -> Iterator[ca.InstancePKI]:
    db, pki = local.open_db(local.load_config(data_dir))
    try:
        yield pki
    finally:
        db.dispose()


def test_init_creates_owner_only_directory_and_master_key(data_dir: Path) -> None:
    assert mode_of(data_dir) == 0o700
    key_file = data_dir / "master.key"
    assert mode_of(key_file) == 0o600
    assert len(base64.urlsafe_b64decode(key_file.read_bytes().strip())) == 32


def test_init_tightens_an_existing_directory(tmp_path: Path) -> None:
    directory = tmp_path / "console"
    directory.mkdir(mode=0o755)
    init(directory)
    assert mode_of(directory) == 0o700


def test_settings_file_holds_no_secret(data_dir: Path) -> None:
    text = (data_dir / local.SETTINGS_FILE).read_text()
    master_text = (data_dir / "master.key").read_text().strip()
    assert master_text not in text
    assert "PRIVATE" not in text
    assert set(json.loads(text)) >= {"db_url", "host", "port", "public_url"}
    assert not list(data_dir.glob("*.tmp"))  # the atomic write left nothing behind


def test_settings_round_trip(data_dir: Path) -> None:
    config = local.load_config(data_dir)
    assert config.public_url == URL
    assert config.data_dir == data_dir
    assert config.db_url == f"sqlite:///{(data_dir / 'console.db').resolve()}"


def test_load_config_applies_given_overrides_only(data_dir: Path) -> None:
    config = local.load_config(data_dir, host="0.0.0.0", port=None)
    assert config.host == "0.0.0.0"
    assert config.port == 7443


def test_load_config_of_a_plain_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a console data directory"):
        local.load_config(tmp_path)


def test_init_creates_the_pki_and_top_group(data_dir: Path) -> None:
    db, pki = local.open_db(local.load_config(data_dir))
    try:
        assert set(pki.certs) == {ca.ROOT, *ca.INTERMEDIATES}
        with db.transaction() as session:
            top = session.get(Group, local.TOP_GROUP)
            assert top is not None and top.parent_id is None
    finally:
        db.dispose()


def test_second_init_fails_and_keeps_the_master_key(data_dir: Path) -> None:
    before = (data_dir / "master.key").read_bytes()
    with pytest.raises(Conflict, match="already initialised"):
        init(data_dir)
    assert (data_dir / "master.key").read_bytes() == before
    assert mode_of(data_dir / "master.key") == 0o600


def test_master_key_from_environment_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, base64.urlsafe_b64encode(bytes(range(32))).decode())
    directory = tmp_path / "console"
    init(directory)
    assert not (directory / "master.key").exists()
    with open_pki(directory) as pki:
        assert set(pki.certs) == {ca.ROOT, *ca.INTERMEDIATES}
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(ConfigError, match="does not exist"):
        local.open_db(local.load_config(directory))


def test_open_db_with_another_master_key_fails_at_once(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, base64.urlsafe_b64encode(bytes(32)).decode())
    with pytest.raises(KeystoreError, match="wrong master key"):
        local.open_db(local.load_config(data_dir))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_open_db_refuses_a_readable_master_key(data_dir: Path, mode: int) -> None:
    (data_dir / "master.key").chmod(mode)
    with pytest.raises(ConfigError, match=f"mode {mode:04o}.*0600"):
        local.open_db(local.load_config(data_dir))


def test_open_db_accepts_a_read_only_master_key(data_dir: Path) -> None:
    (data_dir / "master.key").chmod(0o400)
    with open_pki(data_dir) as pki:
        assert ca.DEVICE_ROOT in pki.certs


# --- a data directory copied or moved opens its own database -----------------------------


def test_settings_name_the_own_database_relative_to_the_directory(data_dir: Path) -> None:
    settings = json.loads((data_dir / local.SETTINGS_FILE).read_text())
    assert settings["db_url"] == "sqlite:///console.db"


def edit_first_entry(data_dir: Path) -> None:
    tamper(data_dir, update(AuditEntry).where(AuditEntry.id == 1).values(actor="cli:mallory"))


def test_a_copied_directory_verifies_its_own_database(data_dir: Path, tmp_path: Path) -> None:
    """Before: the copy's console.json named the original's database by absolute path, so
    `audit verify -d COPY` verified the original and said nothing of the copy."""
    append_audit(data_dir, 2)
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    assert local.load_config(copy).db_url == f"sqlite:///{(copy / 'console.db').resolve()}"
    edit_first_entry(copy)
    copied = cli_audit_verify(copy)
    assert copied.returncode == 1 and "BROKEN at entry 1" in copied.stderr
    assert str(copy / "console.db") in copied.stdout
    original = cli_audit_verify(data_dir)
    assert original.returncode == 0 and "2 entries" in original.stdout


def test_a_moved_directory_opens_its_database_where_it_now_is(
    data_dir: Path, tmp_path: Path
) -> None:
    append_audit(data_dir, 2)
    moved = tmp_path / "elsewhere" / "console"
    moved.parent.mkdir()
    data_dir.rename(moved)
    result = cli_audit_verify(moved)
    assert result.returncode == 0 and "audit chain OK: 2 entries" in result.stdout
    assert str(moved / "console.db") in result.stdout
    assert not data_dir.exists()  # nothing was created at the old place


def write_settings(directory: Path, changes: dict[str, str]) -> None:
    path = directory / local.SETTINGS_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_settings_of_older_releases_are_rebased_onto_the_copy(
    data_dir: Path, tmp_path: Path
) -> None:
    """Older releases stored the absolute path of the database inside the directory."""
    absolute = f"sqlite:///{(data_dir / 'console.db').resolve()}"
    write_settings(data_dir, {"db_url": absolute, "data_dir": str(data_dir)})
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    assert local.load_config(copy).db_url == f"sqlite:///{(copy / 'console.db').resolve()}"
    assert local.load_config(data_dir).db_url == absolute


def test_a_database_outside_the_directory_is_shared_by_copies(tmp_path: Path) -> None:
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    local.init(tmp_path / "console", KeyAlgorithm.EC_P256, URL, "127.0.0.1", 7443, shared)
    shutil.copytree(tmp_path / "console", tmp_path / "copy")
    assert local.load_config(tmp_path / "copy").db_url == shared


def test_an_outside_database_beside_an_own_one_is_refused(data_dir: Path, tmp_path: Path) -> None:
    """console.json naming a database elsewhere while the directory holds one: which one
    the user means cannot be known, so no command guesses."""
    write_settings(data_dir, {"db_url": f"sqlite:///{tmp_path / 'other.db'}"})
    with pytest.raises(ConfigError, match=r"names the database .*other\.db.*console\.db exists"):
        local.load_config(data_dir)
