"""``certgate device`` through typer's CliRunner against a real console (SQLite): what each
command prints, the exit codes (3 for an unenrolled device, with guidance), and refusals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from certgate.cli import app
from certgate.device.state import StateDir
from tests.device.console_side import (
    PASSWORD,
    USER,
    add_enrollment_user,
    configure_group,
    enrollment_token,
    root_pem,
    unenroll,
)
from tests.device.harness import RULES
from tests.support import RunningConsole

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("console", ["sqlite"], indirect=True),
]
runner = CliRunner()
ENV = {"COLUMNS": "200", "ALICE_PW": PASSWORD, "CERTGATE_DEVICE_DIR": None}
APP = "com.example.browser"


def device(*args: str) -> Result:
    return runner.invoke(app, ["device", *args], env=ENV)


@pytest.fixture(scope="module")
def prepared(console: RunningConsole, tmp_path_factory: pytest.TempPathFactory) -> Path:
    add_enrollment_user(console)
    configure_group(console, RULES)
    ca_file = tmp_path_factory.mktemp("ca") / "root.pem"
    ca_file.write_bytes(root_pem(console))
    return ca_file


def enroll_args(console: RunningConsole, ca_file: Path, state: Path) -> list[str]:
    return ["enroll", "--console", console.url, "--ca-file", str(ca_file), "-s", str(state)]


def test_enroll_profile_app_auth_status(
    console: RunningConsole, prepared: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    token = enrollment_token(console)
    enrolled = device(*enroll_args(console, prepared, state), "--token", token)
    assert enrolled.exit_code == 0, enrolled.output
    uid = StateDir(state).enrollment().device_uid
    assert f"enrolled: DeviceUid {uid} in group global" in enrolled.output

    first, second = device("profile", "-s", str(state)), device("profile", "-s", str(state))
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert "profile v1: device certificate" in first.output
    assert "profile v2: device certificate" in second.output and "(removed)" in second.output

    auth = device(
        "app-auth", "--app", APP, "--user", USER, "--password-env", "ALICE_PW", "-s", str(state)
    )
    assert auth.exit_code == 0, auth.output
    assert f"{state}/apps/{APP}/identity.sealed" in auth.output
    assert "(no key export)" in auth.output  # no export password: no key leaves the seal

    status = device("status", "-s", str(state))
    assert status.exit_code == 0, status.output
    assert "console: enrolled, compliant" in status.output and "profile: v2" in status.output
    assert re.search(r"^policy: v[1-9][0-9]*$", status.output, re.MULTILINE), status.output

    renew = device("renew", "--fraction", "0.99999999", "-s", str(state))
    assert renew.exit_code == 0, renew.output
    assert "renewed (device certificate expires" in renew.output
    assert f"warning: app certificate of {APP} expires" in renew.output


def test_enroll_with_user_and_password_env(
    console: RunningConsole, prepared: Path, tmp_path: Path
) -> None:
    args = [*enroll_args(console, prepared, tmp_path / "s"), "--user", USER]
    missing = device(*args, "--password-env", "NOT_SET_ANYWHERE")
    assert missing.exit_code == 1 and "NOT_SET_ANYWHERE is not set" in missing.output
    ok = device(*args, "--password-env", "ALICE_PW")
    assert ok.exit_code == 0, ok.output


def test_unenrolled_device_exits_3_with_guidance(
    console: RunningConsole, prepared: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    token = enrollment_token(console)
    assert device(*enroll_args(console, prepared, state), "--token", token).exit_code == 0
    unenroll(console, StateDir(state).enrollment().device_uid)
    for command in (["profile"], ["status"], ["renew"]):
        result = device(*command, "-s", str(state))
        assert result.exit_code == 3, (command, result.output)
        assert "enroll it again" in result.output or "no longer enrolled" in result.output
        assert f"certgate device enroll --force --state-dir {state}" in result.output


def test_bad_inputs_are_refused_with_a_message(
    console: RunningConsole, prepared: Path, tmp_path: Path
) -> None:
    missing_ca = device(
        *enroll_args(console, tmp_path / "nope.pem", tmp_path / "s"), "--token", "t"
    )
    assert missing_ca.exit_code == 1 and "cannot read" in missing_ca.output
    not_enrolled = device("profile", "-s", str(tmp_path / "empty"))
    assert not_enrolled.exit_code == 1 and "run certgate device enroll" in not_enrolled.output
    exposed = device("run", "--http", "0.0.0.0:3128", "-s", str(tmp_path / "empty"))
    assert exposed.exit_code == 1 and "refusing to listen on 0.0.0.0:3128" in exposed.output
    bad_port = device("run", "--app-port", "com.example.x", "-s", str(tmp_path / "empty"))
    assert bad_port.exit_code == 1 and "BUNDLE=PORT" in bad_port.output
