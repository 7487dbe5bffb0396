"""``--config FILE`` on every service command: TOML keys are the flags' names, flags
override the file, unknown keys and bad values are refused naming the key.

The commands run for real (typer's runner, no stand-in): each fails at its first use of
the data or state directory, and its error names the directory it was given, which shows
which source won."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from certgate import cliconfig
from certgate.cli import app

runner = CliRunner()
# (command, the flag naming its directory, the error that names that directory)
SERVICES = [
    (["console", "serve"], "data-dir"),
    (["tunnel", "run"], "state-dir"),
    (["access", "serve"], "data-dir"),
    (["certproxy", "serve"], "data-dir"),
]
IDS = [" ".join(command) for command, _ in SERVICES]


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "300"})
    return result.exit_code, result.output


@pytest.mark.parametrize(("command", "flag"), SERVICES, ids=IDS)
def test_the_file_supplies_the_flags(tmp_path: Path, command: list[str], flag: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'{flag} = "{tmp_path / "from-file"}"\n')
    code, output = invoke(*command, "--config", str(config))
    assert code == 1, output
    assert "from-file" in output


@pytest.mark.parametrize(("command", "flag"), SERVICES, ids=IDS)
def test_a_flag_overrides_the_file(tmp_path: Path, command: list[str], flag: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'{flag} = "{tmp_path / "from-file"}"\n')
    code, output = invoke(*command, "--config", str(config), f"--{flag}", str(tmp_path / "flag"))
    assert code == 1, output
    assert "flag" in output and "from-file" not in output


@pytest.mark.parametrize(("command", "flag"), SERVICES, ids=IDS)
def test_an_unknown_key_is_refused_by_name(tmp_path: Path, command: list[str], flag: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'{flag} = "/x"\nlisten_port = 1\n')
    code, output = invoke(*command, "--config", str(config))
    assert code == 2, output
    assert "unknown key 'listen_port'" in output


def test_values_are_checked_like_the_flags(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('state-dir = "/x"\ndrain-s = "soon"\n')
    code, output = invoke("tunnel", "run", "--config", str(config))
    assert code == 2, output
    assert "--drain-s" in output and "valid number" in output


@pytest.mark.parametrize(
    ("content", "problem"),
    [("state-dir = ", "not valid TOML"), (None, "cannot read")],
)
def test_an_unreadable_file_is_refused(tmp_path: Path, content: str | None, problem: str) -> None:
    config = tmp_path / "c.toml"
    if content is not None:
        config.write_text(content)
    code, output = invoke("tunnel", "run", "--config", str(config))
    assert code == 2, output
    assert problem in output


def test_logging_keys_apply_and_root_flags_win(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'state-dir = "{tmp_path}/none"\nlog-format = "json"\nlog-level = "bogus"\n')
    code, output = invoke("tunnel", "run", "--config", str(config))
    assert code == 2 and "bogus" in output, output
    # The root flag wins: the file's bad level is not even looked at.
    code, output = invoke("--log-level", "debug", "tunnel", "run", "--config", str(config))
    assert code == 1, output


def test_a_bad_syslog_target_in_the_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('state-dir = "/x"\nsyslog = "ftp://h:1"\n')
    code, output = invoke("tunnel", "run", "--config", str(config))
    assert code == 2 and "scheme" in output, output


EXAMPLES = Path(__file__).resolve().parents[1] / "packaging" / "config"


@pytest.mark.parametrize(
    ("example", "command"),
    [
        ("console.toml", ["console", "serve"]),
        ("tunnel-node1.toml", ["tunnel", "run"]),
        ("access.toml", ["access", "serve"]),
        ("certproxy.toml", ["certproxy", "serve"]),
    ],
)
def test_the_packaged_examples_are_accepted_by_their_command(
    example: str, command: list[str]
) -> None:
    group = typer.main.get_command(app)
    for name in command:
        group = group.commands[name]  # type: ignore[attr-defined]
    defaults, logging_ = cliconfig.defaults_from(EXAMPLES / example, group.params)
    assert defaults and logging_ == {"format": "json"}
