"""Scenario: a device enrolled with the real CLI checks its posture in with a real console
over mTLS with its device certificate, by hand (``certgate device checkin``) and from a
running ``certgate device run`` agent on every maintenance pass; the console's verdict
comes back with each failing rule's reason, and the agent's check-ins keep a device that
a "check-in age" rule governs compliant."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from certgate.cli import app
from certgate.device.state import StateDir
from tests.device.console_side import (
    add_enrollment_user,
    admin_call,
    configure_group,
    enrollment_token,
    root_pem,
)
from tests.device.harness import RULES
from tests.support import CERTGATE, RunningConsole, free_port, wait_for_tls_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("console", ["sqlite"], indirect=True),
]
runner = CliRunner()
POLICY = "/api/v1/groups/global/compliance-policy"


def device_cli(*args: str) -> str:
    result = runner.invoke(app, ["device", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def enrolled(console: RunningConsole, work: Path) -> StateDir:
    configure_group(console, RULES)
    add_enrollment_user(console)
    ca_file = work / "root.pem"
    ca_file.write_bytes(root_pem(console))
    state = ["-s", str(work / "device")]
    token = enrollment_token(console)
    device_cli(
        "enroll", "--console", console.url, "--ca-file", str(ca_file), "--token", token, *state
    )
    device_cli("profile", *state)
    return StateDir(work / "device")


def compliance_of(console: RunningConsole, uid: str) -> dict[str, Any]:
    answer: dict[str, Any] = admin_call(console, "GET", f"/api/v1/devices/{uid}/compliance")
    return answer


def test_checkin_by_hand_and_by_the_running_agent(console: RunningConsole, work: Path) -> None:
    state = enrolled(console, work)
    uid = state.enrollment().device_uid
    shown = json.loads(device_cli("checkin", "--show"))
    assert shown["facts"]["kernel"] == os.uname().release

    admin_call(console, "PUT", POLICY, {"rules": [
        {"id": "os", "fact": "os_name", "op": "one_of", "value": ["fedora"]},
    ]})  # fmt: skip
    said = device_cli("checkin", "-s", str(state.path))
    assert "compliance: noncompliant" in said
    assert f"failing os: os_name '{shown['facts']['os_name']}' is not one of ('fedora',)" in said
    assert compliance_of(console, uid)["history"][0]["cause"] == "checkin"

    # A passing policy with a check-in age rule: the agent's own check-ins (every second)
    # make the device compliant and keep its last check-in fresh.
    admin_call(console, "PUT", POLICY, {"rules": [
        {"id": "seen", "fact": "checkin_age_s", "op": "at_most", "value": 120},
    ]})  # fmt: skip
    agent = start_agent(state, work)
    try:
        first = wait_for_checkin(console, uid, after=None)
        wait_for_checkin(console, uid, after=first)
        shown_now = compliance_of(console, uid)
        assert shown_now["compliance_status"] == "compliant"
        assert shown_now["facts"]["checkin_age_s"] <= 120
        # The passing policy already judged it compliant; unchanged check-ins add no row.
        assert shown_now["history"][0]["cause"] == "policy"
        assert "posture check-in failed" not in (work / "agent.log").read_text()
    finally:
        agent.terminate()
        agent.wait(timeout=20)
    admin_call(console, "PUT", POLICY, {"rules": []})


def wait_for_checkin(console: RunningConsole, uid: str, after: str | None) -> str:
    """The device's next check-in time after ``after`` (bounded wait)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        seen = compliance_of(console, uid)["checked_in_at"]
        if seen is not None and seen != after:
            return str(seen)
        time.sleep(0.3)
    raise AssertionError("the agent never checked in")


def start_agent(state: StateDir, work: Path) -> subprocess.Popen[bytes]:
    socks, http = free_port(), free_port()
    with (work / "agent.log").open("ab") as log_file:
        proc = subprocess.Popen(
            [*CERTGATE, "device", "run", "-s", str(state.path), "--socks", f"127.0.0.1:{socks}",
             "--http", f"127.0.0.1:{http}", "--check-interval", "1"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    wait_for_tls_port(http, proc, 30)
    return proc
