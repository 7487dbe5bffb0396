"""The checkpointer shell: a running console signs the audit head at start, periodically and
at clean shutdown; lines go to the data directory's file and to syslog (UDP or a socket,
and through a real rsyslogd)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from certgate.console import local
from certgate.console.checkpointer import SYSLOG_TAG
from certgate.console.config import ConsoleConfig
from certgate.console.services import audit, checkpoints
from certgate.errors import ConfigError
from tests.console.conftest import append_audit, cli_audit_verify
from tests.support import RunningConsole, free_udp_port, init_console, start_console

WAIT_S = 60.0  # generous: two cores shared by several test runs


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory, _ = init_console(tmp_path)
    return directory


def signed_counts(data_dir: Path) -> list[int]:
    db, pki = local.open_db(local.load_config(data_dir))
    db.dispose()
    trusted = checkpoints.anchors(pki, local.TOP_GROUP)
    report = checkpoints.read_sink(local.load_config(data_dir).audit_sink, trusted)
    assert report.problems == ()
    return [c.count for c in report.checkpoints]


def audit_count(data_dir: Path) -> int:
    db, _ = local.open_db(local.load_config(data_dir))
    with db.read_only() as session:
        count = audit.current(session).count
    db.dispose()
    return count


def set_interval(data_dir: Path, seconds: float) -> None:
    config = local.load_config(data_dir)
    local.save_config(dataclasses.replace(config, audit_checkpoint_s=seconds))


def denied_request(console: RunningConsole) -> None:
    """An unauthenticated admin call: answered 401 and audited by the console itself."""
    with console.client() as client:
        assert client.get("/api/v1/groups").status_code == 401


def test_a_running_console_checkpoints_periodically(data_dir: Path, tmp_path: Path) -> None:
    set_interval(data_dir, 1.0)
    port = local.load_config(data_dir).port
    console = start_console(tmp_path, data_dir, port)
    try:
        denied_request(console)
        moved = audit_count(data_dir)
        deadline = time.monotonic() + WAIT_S
        while moved not in signed_counts(data_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert moved in signed_counts(data_dir), console.log()  # signed while it runs
    finally:
        console.stop()
    assert cli_audit_verify(data_dir).returncode == 0


def test_a_console_checkpoints_at_start_and_at_clean_shutdown(
    data_dir: Path, tmp_path: Path
) -> None:
    set_interval(data_dir, 24 * 3600)  # no periodic checkpoint can happen during the test
    append_audit(data_dir, 2)  # written while no console ran
    port = local.load_config(data_dir).port
    console = start_console(tmp_path, data_dir, port)
    try:
        deadline = time.monotonic() + WAIT_S
        while signed_counts(data_dir) == [0] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert signed_counts(data_dir) == [0, 2]  # init's, then the start's
        denied_request(console)
    finally:
        console.stop()  # SIGTERM: uvicorn shuts down cleanly (then re-raises the signal)
    assert signed_counts(data_dir) == [0, 2, 3] and audit_count(data_dir) == 3
    result = cli_audit_verify(data_dir)
    assert result.returncode == 0 and "3 entries, 3 signed checkpoints hold" in result.stdout


def syslog_line(datagram: bytes) -> str:
    """The sink line in an RFC 3164-style datagram from ``SysLogHandler``."""
    message = datagram.rstrip(b"\0").decode()
    assert message.startswith("<86>")  # facility authpriv (10) * 8 + severity info (6)
    assert SYSLOG_TAG in message
    return message[message.index("{") :]


def checkpoint_with(config: ConsoleConfig) -> None:
    db, pki = local.open_db(config)
    writer = local.checkpointer(config, db, pki)
    try:
        assert writer.checkpoint() is not None
    finally:
        writer.stop()
        db.dispose()


def test_checkpoints_go_to_syslog_over_udp(data_dir: Path) -> None:
    append_audit(data_dir, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(WAIT_S)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        checkpoint_with(local.load_config(data_dir, audit_syslog=address))
        line = syslog_line(server.recv(65536))
    assert line == local.load_config(data_dir).audit_sink.read_text().splitlines()[-1]
    db, pki = local.open_db(local.load_config(data_dir))
    db.dispose()
    assert checkpoints.verify_line(line, checkpoints.anchors(pki, local.TOP_GROUP)).count == 1


def test_checkpoints_go_to_a_syslog_socket(data_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(WAIT_S)
        checkpoint_with(local.load_config(data_dir, audit_syslog=str(path)))
        line = syslog_line(server.recv(65536))
    assert json.loads(line)["count"] == 0


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("audit_syslog", "loghost"),
        ("audit_syslog", "loghost:99999"),
        ("audit_syslog", ":514"),
        ("audit_checkpoint_s", 0.5),
        ("audit_checkpoint_s", 2 * 24 * 3600),
    ],
)
def test_bad_checkpoint_settings_are_refused_at_startup(
    data_dir: Path, setting: str, value: object
) -> None:
    with pytest.raises(ConfigError, match="audit"):
        local.load_config(data_dir, **{setting: value})


def test_a_syslog_socket_nobody_listens_on_is_refused(data_dir: Path, tmp_path: Path) -> None:
    config = local.load_config(data_dir, audit_syslog=str(tmp_path / "absent.sock"))
    db, pki = local.open_db(config)
    try:
        with pytest.raises(ConfigError, match=r"audit syslog .* is not reachable"):
            local.checkpointer(config, db, pki)
    finally:
        db.dispose()


def test_a_console_that_cannot_write_its_checkpoints_does_not_start(
    data_dir: Path, tmp_path: Path
) -> None:
    sink = local.load_config(data_dir).audit_sink
    sink.unlink()
    sink.mkdir()  # not writable as a file, even by root
    with pytest.raises(RuntimeError, match="did not start") as failed:
        start_console(tmp_path, data_dir, local.load_config(data_dir).port)
    assert "audit-checkpoints.jsonl" in str(failed.value)


RSYSLOGD = shutil.which("rsyslogd", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
RSYSLOG_CONF = """
global(workDirectory="{work}")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{port}")
template(name="raw" type="string" string="%syslogfacility-text%.%syslogseverity-text% %msg%\\n")
authpriv.* action(type="omfile" file="{out}" template="raw")
"""


def wait_for_udp_bound(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Until rsyslogd holds the port: binding it ourselves then fails."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return
        time.sleep(0.1)
    raise RuntimeError(f"rsyslogd did not bind 127.0.0.1:{port} (exit {proc.poll()})")


@pytest.mark.skipif(RSYSLOGD is None, reason="rsyslog is not installed (make sysdeps)")
def test_a_real_rsyslog_receives_verifiable_checkpoints(data_dir: Path, tmp_path: Path) -> None:
    assert RSYSLOGD is not None
    port, out, conf = free_udp_port(), tmp_path / "authpriv.log", tmp_path / "rsyslog.conf"
    conf.write_text(RSYSLOG_CONF.format(work=tmp_path, port=port, out=out))
    command = [RSYSLOGD, "-n", "-f", str(conf), "-i", str(tmp_path / "rsyslogd.pid")]
    with (tmp_path / "rsyslogd.log").open("wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for_udp_bound(port, proc)
        append_audit(data_dir, 2)
        checkpoint_with(local.load_config(data_dir, audit_syslog=f"127.0.0.1:{port}"))
        deadline = time.monotonic() + WAIT_S
        while not (out.exists() and out.read_text().endswith("\n")):
            assert time.monotonic() < deadline, "rsyslogd wrote nothing"
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    [received] = out.read_text().splitlines()
    assert received.startswith("authpriv.info ")
    line = received[received.index("{") :]
    db, pki = local.open_db(local.load_config(data_dir))
    db.dispose()
    assert checkpoints.verify_line(line, checkpoints.anchors(pki, local.TOP_GROUP)).count == 2
