"""``certgate tunnel status``: the group policy in force (version, staleness budget,
long-poll) and ``restart_required`` as ``/healthz`` says them, read from the state
directory (a real console; a real ``certgate tunnel run`` for the running case)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from certgate.tunnel.cli import app
from certgate.tunnel.service import LISTENERS_FILE
from tests.support import CERTGATE, RunningConsole, free_port, wait_for_tls_port
from tests.tlsgroups import negotiated_group
from tests.tunnel.conftest import create_group, setup_node

runner = CliRunner()
HANG_GUARD_S = 30.0  # a bound against hanging, not a timing


def status_json(state_dir: Path) -> dict[str, Any]:
    """``certgate tunnel status --json`` in a process of its own, as an operator runs it."""
    done = subprocess.run(
        [*CERTGATE, "tunnel", "status", "--state-dir", str(state_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_a_node_that_never_ran_shows_the_trust_config_policy(
    sqlite_console: RunningConsole, tmp_path: Path
) -> None:
    settings = {"feed": {"long_poll_s": 9, "max_staleness_s": 90}}
    state = setup_node(sqlite_console, create_group(sqlite_console, settings), tmp_path / "n")
    report = status_json(state.state_dir)
    assert report["policy_version"] == state.trust.policy.version
    assert report["policy"]["feed"] == {"long_poll_s": 9, "max_staleness_s": 90}
    assert (report["sync"]["long_poll_s"], report["sync"]["max_staleness_s"]) == (9, 90)
    assert report["restart_required"] is None and report["bound"] is None
    assert (report["status"], report["table_seq"], report["sync"]["age_s"]) == ("stale", 0, None)
    text = runner.invoke(app, ["status", "--state-dir", str(state.state_dir)])
    assert text.exit_code == 0, text.output
    assert "unknown (the node has not run" in text.output
    assert "90s" in text.output and "long-poll" in text.output


@pytest.fixture
def running_node(sqlite_console: RunningConsole, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A ``certgate tunnel run`` whose data ports come from its group's policy."""
    with node_running(sqlite_console, tmp_path) as node:
        yield node


@contextmanager
def node_running(
    sqlite_console: RunningConsole, tmp_path: Path, *options: str
) -> Iterator[dict[str, Any]]:
    """``certgate tunnel run [options]`` on a new group's node, until the block ends."""
    proxy, per_app, admin = free_port(), free_port(), free_port()
    tunnel = {
        "hostnames": ["localhost"],
        "ip_addresses": ["127.0.0.1"],
        "proxy_port": proxy,
        "per_app_port": per_app,
    }
    group = create_group(sqlite_console, {"initial_compliance": "compliant", "tunnel": tunnel})
    state = setup_node(sqlite_console, group, tmp_path / "node")
    command = ["tunnel", "run", "--state-dir", str(state.state_dir)]
    with (tmp_path / "node.log").open("ab") as log:
        proc = subprocess.Popen(
            [*CERTGATE, *command, "--admin-listen", f"127.0.0.1:{admin}", *options],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_for_tls_port(proxy, proc, HANG_GUARD_S)
        deadline = time.monotonic() + HANG_GUARD_S
        while not (state.state_dir / LISTENERS_FILE).exists():  # written once all are bound
            assert time.monotonic() < deadline and proc.poll() is None, "node never started"
            time.sleep(0.05)
        yield {"group": group, "state_dir": state.state_dir, "admin": admin, "proxy": proxy}
    finally:
        proc.terminate()
        proc.wait(timeout=HANG_GUARD_S)


def health(admin_port: int) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"http://127.0.0.1:{admin_port}/healthz", timeout=10).json()
    return body


def test_status_says_what_healthz_says_after_the_policy_moved_a_port(
    sqlite_console: RunningConsole, running_node: dict[str, Any]
) -> None:
    node, state_dir = running_node, running_node["state_dir"]
    assert json.loads((state_dir / LISTENERS_FILE).read_text())["bound"]["proxy"] == node["proxy"]
    before = status_json(state_dir)
    assert before["restart_required"] == [] == health(node["admin"])["restart_required"]
    moved = free_port()
    change = {"tunnel": {"proxy_port": moved}, "feed": {"long_poll_s": 7, "max_staleness_s": 40}}
    with sqlite_console.client(sqlite_console.admins["root"]) as admin:
        path = f"/api/v1/groups/{node['group']}/settings"
        admin.patch(path, json=change).raise_for_status()
    deadline = time.monotonic() + HANG_GUARD_S
    while (live := health(node["admin"]))["policy_version"] == before["policy_version"]:
        assert time.monotonic() < deadline, "the node never applied the policy"
        time.sleep(0.05)
    report = status_json(state_dir)
    expected = [f"proxy listens on {node['proxy']}, policy says {moved}"]
    assert live["restart_required"] == report["restart_required"] == expected
    assert report["policy_version"] == live["policy_version"] > before["policy_version"]
    assert report["table_seq"] == live["table_seq"]
    assert (report["sync"]["long_poll_s"], report["sync"]["max_staleness_s"]) == (7, 40)
    assert report["policy"]["tunnel"]["proxy_port"] == moved and report["status"] == "ok"
    text = runner.invoke(app, ["status", "--state-dir", str(state_dir)])
    assert text.exit_code == 0, text.output
    assert f"policy says {moved}" in text.output and "40s" in text.output


@pytest.mark.parametrize("backend", ["ssl", "pyopenssl"])
def test_run_serves_with_the_tls_backend_and_curve_it_is_given(
    sqlite_console: RunningConsole, tmp_path: Path, backend: str
) -> None:
    options = ("--tls-backend", backend, "--tls-curve", "secp384r1", "--workers", "1")
    with node_running(sqlite_console, tmp_path, *options) as node:
        assert negotiated_group(node["proxy"], "P-256") is None  # only the pinned curve
        used = negotiated_group(node["proxy"], "P-384")
        assert used is not None and "secp384r1" in used, used
    log = (tmp_path / "node.log").read_text()
    assert f"tls={backend}" in log


def test_run_refuses_an_unknown_tls_backend(tmp_path: Path) -> None:
    done = runner.invoke(app, ["run", "--state-dir", str(tmp_path), "--tls-backend", "gnutls"])
    assert done.exit_code != 0
    assert "TLS backend must be one of" in done.output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--role", "middle"], "'middle' is not a valid Role"),
        (["--role", "front-end"], "a front end needs at least one --back-end"),
        (["--role", "front-end", "--back-end", "back.example:2020"], "must be an IP address"),
        (["--role", "back-end", "--back-end", "127.0.0.1:2020"], "is for front ends"),
    ],
)
def test_run_refuses_inconsistent_cascade_options(
    tmp_path: Path, options: list[str], message: str
) -> None:
    """Checked before anything is loaded or bound (a state directory is not even read)."""
    result = runner.invoke(app, ["run", "--state-dir", str(tmp_path / "none"), *options])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split()), result.output


@pytest.mark.parametrize("role", [["front-end", "--back-end", "127.0.0.1:2020"], ["back-end"]])
def test_a_cascade_node_may_run_several_workers(tmp_path: Path, role: list[str]) -> None:
    """The options pass their checks; what stops this run is the missing state."""
    options = ["--state-dir", str(tmp_path / "none"), "--role", *role, "--workers", "2"]
    result = runner.invoke(app, ["run", *options])
    assert result.exit_code == 1, result.output
    assert "serves from one process" not in result.output
    assert "state" in result.output.lower(), result.output
