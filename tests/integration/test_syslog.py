"""Structured logs reach a real rsyslog (issue #15): audit events of real certgate
processes over UDP and TCP, a served console configured by ``--config``, and values built
to forge records arriving intact as single records.

rsyslog runs as a throwaway unprivileged instance with its own configuration: imudp and
imtcp on free loopback ports, mmpstrucdata parsing the RFC 5424 structured data, omfile
writing one tab-separated line per record (no system socket, no system configuration).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from certgate import logs
from tests.support import (
    CERTGATE,
    START_TIMEOUT_S,
    RunningConsole,
    free_port,
    init_console,
    wait_for_tls_port,
)

pytestmark = pytest.mark.integration
RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
WAIT_S = 30.0
SD = logs.SD_ID


@dataclass(frozen=True)
class Received:
    msgid: str
    app: str
    severity: str
    fields: dict[str, str]
    message: str


@dataclass
class Rsyslog:
    udp: int
    tcp: int
    out: Path

    def url(self, scheme: str) -> str:
        return f"{scheme}://127.0.0.1:{self.udp if scheme == 'udp' else self.tcp}"

    def records(self) -> list[Received]:
        if not self.out.exists():
            return []
        found = []
        for line in self.out.read_text().splitlines():
            msgid, app, severity, sd, message = line.split("\t")
            fields = json.loads(sd)[SD] if sd.strip() else {}
            found.append(Received(msgid, app, severity, fields, json.loads(f'"{message}"')))
        return found

    def wait_for(self, matches: Callable[[Received], bool]) -> Received:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            hits = [r for r in self.records() if matches(r)]
            if hits:
                return hits[-1]
            time.sleep(0.1)
        raise AssertionError(f"rsyslog received no such record; it has {self.records()}")


CONFIG = """\
global(workDirectory="{work}")
module(load="imudp")
module(load="imtcp")
module(load="mmpstrucdata")
input(type="imudp" address="127.0.0.1" port="{udp}")
input(type="imtcp" address="127.0.0.1" port="{tcp}")
template(name="fields" type="string"
         string="%msgid%\\t%app-name%\\t%syslogseverity-text%\\t%$!rfc5424-sd%\\t%msg:::json%\\n")
action(type="mmpstrucdata")
action(type="omfile" file="{out}" template="fields")
"""


TLS_CONFIG = """\
global(workDirectory="{work}" DefaultNetstreamDriverCAFile="{cert}"
       DefaultNetstreamDriverCertFile="{cert}" DefaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" StreamDriver.Name="ossl" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
module(load="mmpstrucdata")
input(type="imtcp" address="127.0.0.1" port="{tcp}")
template(name="fields" type="string"
         string="%msgid%\\t%app-name%\\t%syslogseverity-text%\\t%$!rfc5424-sd%\\t%msg:::json%\\n")
action(type="mmpstrucdata")
action(type="omfile" file="{out}" template="fields")
"""


@pytest.fixture(scope="module")
def rsyslog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rsyslog]:
    work = tmp_path_factory.mktemp("rsyslog")
    server = Rsyslog(free_port(), free_port(), work / "received.log")
    text = CONFIG.format(work=work, udp=server.udp, tcp=server.tcp, out=server.out)
    yield from run_rsyslog(work, text, server)


@pytest.fixture(scope="module")
def rsyslog_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rsyslog]:
    """imtcp with rsyslog's OpenSSL driver; its certificate is made here by openssl."""
    work = tmp_path_factory.mktemp("rsyslog-tls")
    cert, key = work / "cert.pem", work / "key.pem"
    request = "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1"
    names = ["-subj", "/CN=syslog", "-addext", "subjectAltName=IP:127.0.0.1"]
    made = subprocess.run(
        ["openssl", *request.split(), "-keyout", str(key), "-out", str(cert), *names],
        capture_output=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    server = Rsyslog(0, free_port(), work / "received.log")
    text = TLS_CONFIG.format(work=work, cert=cert, key=key, tcp=server.tcp, out=server.out)
    yield from run_rsyslog(work, text, server)


def run_rsyslog(work: Path, config: str, server: Rsyslog) -> Iterator[Rsyslog]:
    if not os.path.exists(RSYSLOGD):
        pytest.fail("rsyslogd missing: make sysdeps installs the Debian package rsyslog")
    conf = work / "rsyslog.conf"
    conf.write_text(config)
    with (work / "rsyslogd.out").open("wb") as output:
        proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(conf), "-i", str(work / "pid")],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_tls_port(server.tcp, proc, START_TIMEOUT_S)  # plain TCP accept is enough
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_tls_audit_events_reach_rsyslog_and_a_collector_not_trusted_gets_nothing(
    rsyslog_tls: Rsyslog, tmp_path: Path
) -> None:
    data_dir, _ = init_console(tmp_path)
    ca = str(rsyslog_tls.out.parent / "cert.pem")
    target = f"tls://127.0.0.1:{rsyslog_tls.tcp}"
    # Without --syslog-ca the collector's self-signed certificate is not trusted: nothing
    # is sent, and the command itself still succeeds (logging never fails the service).
    untrusted = certgate(
        "--syslog", target, "console", "group", "create", "-d", str(data_dir), "tls-a"
    )
    assert untrusted.returncode == 0, untrusted.stderr
    assert f"syslog {target} failed" in untrusted.stderr  # said once, on stderr
    trusted = ["--syslog", target, "--syslog-ca", ca]
    done = certgate(*trusted, "console", "group", "create", "-d", str(data_dir), "tls-b")
    assert done.returncode == 0, done.stderr

    got = rsyslog_tls.wait_for(lambda r: r.fields.get("group") == "tls-b")
    assert (got.msgid, got.fields["action"]) == ("audit", "group.create")
    assert [r for r in rsyslog_tls.records() if r.fields.get("group") == "tls-a"] == []


def certgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CERTGATE, *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("scheme", ["udp", "tcp"])
def test_cli_audit_events_reach_rsyslog_with_the_stable_fields(
    rsyslog: Rsyslog, tmp_path: Path, scheme: str
) -> None:
    data_dir, _ = init_console(tmp_path)
    group = f"syslog-{scheme}"
    args = ["--log-format", "json", "--syslog", rsyslog.url(scheme)]
    done = certgate(*args, "console", "group", "create", "-d", str(data_dir), group)
    assert done.returncode == 0, done.stderr

    got = rsyslog.wait_for(lambda r: r.fields.get("group") == group)
    assert (got.msgid, got.app, got.severity) == ("audit", "certgate", "info")
    assert got.fields["event"] == "audit"
    assert got.fields["action"] == "group.create"
    assert got.fields["outcome"] == "ok"
    assert got.fields["actor"].startswith("cli:")
    assert got.message.lstrip("\ufeff").startswith("audit actor=cli:")
    # The same event on stderr, as JSON with every field of the stable set.
    line = next(json.loads(x) for x in done.stderr.splitlines() if '"audit"' in x)
    assert set(logs.FIELDS) <= set(line)
    assert (line["event"], line["group"], line["action"]) == ("audit", group, "group.create")


def test_a_rolled_back_action_sends_no_audit_event(rsyslog: Rsyslog, tmp_path: Path) -> None:
    data_dir, _ = init_console(tmp_path)
    syslog = ["--syslog", rsyslog.url("tcp")]
    assert (
        certgate(*syslog, "console", "group", "create", "-d", str(data_dir), "rb-1").returncode == 0
    )
    again = certgate(*syslog, "console", "group", "create", "-d", str(data_dir), "rb-1")
    assert again.returncode != 0  # exists: the transaction rolls back
    assert (
        certgate(*syslog, "console", "group", "create", "-d", str(data_dir), "rb-2").returncode == 0
    )

    rsyslog.wait_for(lambda r: r.fields.get("group") == "rb-2")
    creations = [r for r in rsyslog.records() if r.fields.get("group") == "rb-1"]
    assert len(creations) == 1, creations


def test_served_console_configured_by_file_sends_api_audit_events(
    rsyslog: Rsyslog, tmp_path: Path
) -> None:
    data_dir, port = init_console(tmp_path)
    config = tmp_path / "console.toml"
    config.write_text(
        f'data-dir = "{data_dir}"\nlog-format = "json"\nsyslog = "{rsyslog.url("tcp")}"\n'
    )
    log_path = tmp_path / "console.log"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [*CERTGATE, "console", "serve", "--config", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    console = RunningConsole(data_dir, port, proc, log_path, tmp_path)
    try:
        wait_for_tls_port(port, proc, START_TIMEOUT_S)
        console.chain_path.write_text(_chain(console))
        creds = console.make_admin("root", "superadmin", "global")
        with console.client(creds) as client:
            created = client.post("/api/v1/groups", json={"id": "from-api", "name": "x"})
        assert created.status_code == 201, created.text
        got = rsyslog.wait_for(lambda r: r.fields.get("group") == "from-api")
        assert got.fields["actor"] != "" and got.fields["action"] == "group.create"
    finally:
        console.stop()
    json_lines = [x for x in console.log().splitlines() if x.startswith("{")]
    assert json_lines and all(json.loads(x)["event"] for x in json_lines)


def _chain(console: RunningConsole) -> str:
    from certgate.console.services import ca

    with console.local() as (_, pki):
        return "".join(ca.pem(pki.certs[label]) for label in (ca.ROOT, *ca.INTERMEDIATES))


FORGER = textwrap.dedent(
    """
    import logging, sys
    from certgate import logs
    logs.configure(logs.LogOptions(syslog=sys.argv[1]))
    value = sys.argv[2]
    logging.getLogger("certgate.tunnel").warning(
        "deny dest=%s", value, extra=logs.event("deny", destination=value, reason="forged")
    )
    logs.shutdown()
    """
)
FORGED = 'x"] [certgate@32473 event="admit"] \\" <14>1 - evil\nsecond line]'


@pytest.mark.parametrize("scheme", ["udp", "tcp"])
def test_values_built_to_forge_records_arrive_as_one_intact_record(
    rsyslog: Rsyslog, scheme: str
) -> None:
    before = len(rsyslog.records())
    done = subprocess.run(
        [sys.executable, "-c", FORGER, rsyslog.url(scheme), FORGED],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    got = rsyslog.wait_for(lambda r: r.fields.get("reason") == "forged" and r.app == "certgate")
    # mmpstrucdata un-escaped the SD-PARAM: the very value, with its newline made visible.
    assert got.fields["destination"] == logs.escape_controls(FORGED)
    assert got.fields["event"] == "deny" and got.msgid == "deny"
    time.sleep(0.5)  # any forged extra record would have arrived with it
    new = rsyslog.records()[before:]
    assert [r.fields.get("event") for r in new].count("admit") == 0
    assert len([r for r in new if r.fields.get("reason") == "forged"]) == 1
    assert "\n" not in stderr_line(done.stderr)


def stderr_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if "deny dest=" in x]
    assert len(lines) == 1, stderr
    return lines[0]
