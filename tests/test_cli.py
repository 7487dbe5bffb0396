"""The top-level ``certgate`` command: one sub-app per component, reachable as a module."""

from __future__ import annotations

import subprocess

from typer.testing import CliRunner

from certgate.cli import app
from tests.support import CERTGATE

runner = CliRunner()
COMMANDS = ("console", "plan", "demo")
RECOVERY = ("installer", "backup", "restore")


def test_help_lists_every_component() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert all(command in result.stdout for command in COMMANDS)


def test_console_help_lists_its_commands() -> None:
    result = runner.invoke(app, ["console", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    listed = result.stdout.split()
    for command in (*"init serve admin group device cert audit".split(), *RECOVERY):
        assert command in listed


def test_unknown_command_is_a_usage_error() -> None:
    result = runner.invoke(app, ["frobnicate"])
    assert result.exit_code == 2
    assert "frobnicate" in result.output


def test_python_dash_m_certgate_runs() -> None:
    proc = subprocess.run(
        [*CERTGATE, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert all(command in proc.stdout for command in COMMANDS)
