"""``certgate console sso set-secret/clear-secret`` over a real console data directory.

typer's CliRunner for piped input (its stdin is no terminal), and a real process on a
pseudo-terminal for the hidden prompt. The console's own use of the sealed file (sign-in
pages answering 503 when it is missing or does not open): tests/console/ui/test_sso_pages.py.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select as sql_select
from typer.main import get_command
from typer.testing import Result

from certgate.cli import app
from certgate.console import local
from certgate.console.config import SSO_SECRET_FILE
from certgate.console.sso_secret import SealedSecret
from certgate.console.store.models import AuditEntry
from certgate.errors import ConfigError
from certgate.pki.keystore import MasterKey, load_master_key
from tests.console.test_cli import ACTOR, BASE_ENV, mode_of, runner, transaction
from tests.support import CERTGATE, init_console

SECRET = "Sso-Client-Secret-0f9e8d7c6b5a"
PROMPT_TIMEOUT_S = 60


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory, _ = init_console(tmp_path)
    settings = directory / "console.json"
    config = json.loads(settings.read_text())
    config["sso"] = {"issuer": "https://idp.test", "client_id": "certgate-console",
                     "admins": {"a@x": "root"}, "client_secret_sealed": True}  # fmt: skip
    settings.write_text(json.dumps(config))
    return directory


def sso(command: str, data_dir: Path, stdin: bytes | str = b"", *extra: str) -> Result:
    return runner.invoke(
        app,
        ["console", "sso", command, "-d", str(data_dir), *extra],
        input=stdin,
        env=BASE_ENV,
        catch_exceptions=False,
    )


def console_secret(data_dir: Path) -> str | None:
    """The secret the console's single sign-on would send, read as the console reads it."""
    config = local.load_config(data_dir)
    settings = config.sso_config
    assert settings is not None
    master = load_master_key(config.master_key_file)
    return settings.client_secret(SealedSecret(config.sso_secret_file, master))


def sso_audit(data_dir: Path) -> list[AuditEntry]:
    with transaction(data_dir) as (session, _):
        query = sql_select(AuditEntry).where(AuditEntry.action.startswith("sso.secret"))
        entries = list(session.execute(query.order_by(AuditEntry.id)).scalars())
        session.expunge_all()
    return entries


def test_a_piped_secret_is_sealed_owner_only_audited_and_read_back(data_dir: Path) -> None:
    result = sso("set-secret", data_dir, SECRET + "\n")
    assert result.exit_code == 0, result.output
    sealed = data_dir / SSO_SECRET_FILE
    assert mode_of(sealed) == 0o600
    assert SECRET.encode() not in sealed.read_bytes()
    assert SECRET not in result.output
    assert console_secret(data_dir) == SECRET
    [entry] = sso_audit(data_dir)
    assert (entry.actor, entry.action, entry.outcome) == (ACTOR, "sso.secret.set", "ok")
    assert entry.detail == {"file": SSO_SECRET_FILE, "replaced": False}
    assert SECRET not in json.dumps(entry.detail)
    again = sso("set-secret", data_dir, "the-next-secret")  # no line ending: taken as is
    assert again.exit_code == 0, again.output
    assert console_secret(data_dir) == "the-next-secret"
    assert sso_audit(data_dir)[-1].detail == {"file": SSO_SECRET_FILE, "replaced": True}


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b"two\nlines\n", "contains control characters"),
        (b"esc\x1b[0m", "contains control characters"),
        (b"x" * 1025, "is over 1024 bytes"),
        (b"x" * 100_000, "is over 1024 bytes"),
        (b"\xff\xfe", "is not UTF-8"),
    ],
)
def test_a_value_that_cannot_be_a_secret_is_refused_with_exit_2(
    data_dir: Path, stdin: bytes, message: str
) -> None:
    result = sso("set-secret", data_dir, stdin)
    assert result.exit_code == 2, result.output
    assert f"error: refused: the client secret {message}" in result.stderr
    assert not (data_dir / SSO_SECRET_FILE).exists()
    assert sso_audit(data_dir) == []


def test_the_secret_cannot_be_given_in_argv(data_dir: Path) -> None:
    command = get_command(app).commands["console"].commands["sso"].commands["set-secret"]  # type: ignore[attr-defined]
    assert [param.name for param in command.params] == ["data_dir"]
    result = sso("set-secret", data_dir, SECRET, "--secret", SECRET)
    assert result.exit_code == 2 and "No such option: --secret" in result.output
    extra = sso("set-secret", data_dir, SECRET, SECRET)
    assert extra.exit_code == 2 and "unexpected extra argument" in extra.output
    assert not (data_dir / SSO_SECRET_FILE).exists()


def test_a_wrong_master_key_a_tampered_or_missing_file_give_no_secret(data_dir: Path) -> None:
    assert sso("set-secret", data_dir, SECRET).exit_code == 0
    config = local.load_config(data_dir)
    sealed_file = config.sso_secret_file
    other = SealedSecret(sealed_file, MasterKey(os.urandom(32), "another master key"))
    settings = config.sso_config
    assert settings is not None
    with pytest.raises(ConfigError, match="does not open with the key from another master key"):
        settings.client_secret(other)
    blob = bytearray(sealed_file.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    sealed_file.write_bytes(bytes(blob))
    with pytest.raises(ConfigError, match="wrong master key or tampered data"):
        console_secret(data_dir)
    sealed_file.unlink()
    with pytest.raises(ConfigError, match="missing: run `certgate console sso set-secret`"):
        console_secret(data_dir)


def test_clear_secret_removes_it_audited_and_says_when_there_is_none(data_dir: Path) -> None:
    assert sso("set-secret", data_dir, SECRET).exit_code == 0
    cleared = sso("clear-secret", data_dir)
    assert cleared.exit_code == 0, cleared.output
    assert not (data_dir / SSO_SECRET_FILE).exists()
    assert [e.action for e in sso_audit(data_dir)] == ["sso.secret.set", "sso.secret.clear"]
    assert sso_audit(data_dir)[-1].detail == {"file": SSO_SECRET_FILE}
    twice = sso("clear-secret", data_dir)
    assert twice.exit_code == 1
    assert "no sealed SSO client secret in" in twice.stderr
    assert len(sso_audit(data_dir)) == 2


def test_a_console_json_without_the_sealed_source_is_pointed_at(tmp_path: Path) -> None:
    directory, _ = init_console(tmp_path)  # no "sso" block at all
    result = sso("set-secret", directory, SECRET)
    assert result.exit_code == 0, result.output
    assert '"client_secret_sealed": true' in result.stderr


def _read_until(fd: int, marker: bytes | None, seen: bytearray) -> None:
    """Terminal output into ``seen`` until ``marker`` shows, or (None) until it closes."""
    deadline = time.monotonic() + PROMPT_TIMEOUT_S
    while marker is None or marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} in {bytes(seen)!r}"
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the other end closed (EIO on Linux)
                chunk = b""
            if not chunk and marker is None:
                return
            assert chunk, f"closed before {marker!r}: {bytes(seen)!r}"
            seen += chunk


def test_on_a_terminal_the_secret_is_asked_twice_and_never_echoed(data_dir: Path) -> None:
    parent, child = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in BASE_ENV}
    proc = subprocess.Popen(
        [*CERTGATE, "console", "sso", "set-secret", "-d", str(data_dir)],
        stdin=child, stdout=child, stderr=child, env=env, close_fds=True,
    )  # fmt: skip
    os.close(child)
    seen = bytearray()
    try:
        _read_until(parent, b"SSO client secret: ", seen)
        os.write(parent, SECRET.encode() + b"\n")
        _read_until(parent, b"Repeat for confirmation: ", seen)
        os.write(parent, SECRET.encode() + b"\n")
        _read_until(parent, None, seen)
        assert proc.wait(timeout=PROMPT_TIMEOUT_S) == 0, bytes(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(parent)
    assert b"SSO client secret sealed into" in seen
    assert SECRET.encode() not in seen  # the terminal's echo was off
    assert console_secret(data_dir) == SECRET
