"""`certgate demo` (what `make demo` runs) passes end to end and stops what it started."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support import CERTGATE

pytestmark = pytest.mark.integration

EXPECTED = (
    "API key alone → HTTP 401",
    "same group tunnel certificate",
    "openssl verify -purpose sslclient app cert: OK",
    "Proxy mode, real curl with the app certificate → <h1>Welcome",
    "Per-App Tunnel: certgate device exec --app com.example.browser -- curl → <h1>Welcome",
    "blocked by the default device rule",
    "live Per-App Tunnel closed",
    "certgate: noncompliant (HTTP 403)",
    "audit chain OK",
    "demo passed",
)


def test_demo_runs_the_whole_lifecycle() -> None:
    result = subprocess.run(
        [*CERTGATE, "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for expected in EXPECTED:
        assert expected in result.stdout, expected
    # Every process the demo starts runs from its own certgate-demo-* directory.
    left = subprocess.run(
        ["pgrep", "-f", "certgate-demo-"], capture_output=True, text=True, check=False
    ).stdout.split()
    assert left == [], "the demo left processes running"
