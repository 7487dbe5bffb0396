"""`certgate demo` (what `make demo` runs) passes end to end, stops what it started, and
leaves no private key in clear on any disk it wrote: console, tunnel nodes, device, Access."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.keyscan import scan
from tests.support import CERTGATE

pytestmark = pytest.mark.integration

EXPECTED = (
    "API key alone → HTTP 401",
    "same group tunnel certificate",
    "openssl verify -purpose sslclient app cert: OK",
    "Proxy mode, real curl with the app certificate → <h1>Welcome",
    "Per-App Tunnel: certgate device exec --app com.example.browser -- curl → <h1>Welcome",
    "blocked by the default device rule",
    "UDP echo answered through the tunnel → b'echo: ping from com.example.browser'",
    "agent log: udp route app=com.example.browser dest=127.0.0.1:",
    "tunnel-2 running as the back end",
    "tunnel-3 running as a front end",
    "Proxy mode through tunnel-3, real curl with the app certificate → <h1>Welcome",
    "the connection it answered is held by tunnel-2 (back end)",
    "live Per-App Tunnel closed",
    "certgate: noncompliant (HTTP 403)",
    "audit chain OK",
    "Access installed",
    "demo passed",
)
# The keys everything else is sealed under: the console's and Access's master keys and
# each node's key (docs/CONVENTIONS.md, "Keys at rest"). Each must be 0600.
KEY_FILES = (
    "access/master.key",
    "console/master.key",
    "device/node.key",
    "tunnel-1/node.key",
    "tunnel-2/node.key",
    "tunnel-3/node.key",
)


@dataclass(frozen=True)
class DemoRun:
    result: subprocess.CompletedProcess[str]
    work: Path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """One demo run, kept on disk (``--work-dir``); every test here reads it."""
    work = tmp_path_factory.mktemp("scan") / "certgate-demo-run"
    result = subprocess.run(
        [*CERTGATE, "demo", "--work-dir", str(work)],
        capture_output=True,
        text=True,
        timeout=600,  # generous: the machine may be shared
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    return DemoRun(result, work)


def test_demo_runs_the_whole_lifecycle(demo_run: DemoRun) -> None:
    result = demo_run.result
    assert result.returncode == 0, result.stdout + result.stderr
    for expected in EXPECTED:
        assert expected in result.stdout, expected
    # Every process the demo starts names its work directory on its command line; only
    # this run's (other demos may be running on a shared machine).
    left = subprocess.run(
        ["pgrep", "-f", re.escape(str(demo_run.work))], capture_output=True, text=True, check=False
    ).stdout.split()
    assert left == [], "the demo left processes running"


def test_no_private_key_in_clear_on_any_disk_the_demo_wrote(demo_run: DemoRun) -> None:
    assert demo_run.result.returncode == 0, demo_run.result.stdout
    wrote = {p.name for p in demo_run.work.iterdir() if p.is_dir()}
    assert {"console", "tunnel-1", "tunnel-2", "tunnel-3", "device", "access"} <= wrote
    scanned = sum(1 for p in demo_run.work.rglob("*") if p.is_file())
    findings, key_files = scan(demo_run.work)
    assert findings == {}, "\n".join(f"{path}: {what}" for path, what in findings.items())
    assert {str(p.relative_to(demo_run.work)): m for p, m in key_files.items()} == dict.fromkeys(
        KEY_FILES, 0o600
    )
    assert scanned > 30  # the console database, logs, state files, exports...
