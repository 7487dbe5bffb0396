"""``make bench`` / ``make bench-smoke``: run the benchmark suite, bounded in time.

    .venv/bin/python bench/run.py            # full run, results in bench/results/
    .venv/bin/python bench/run.py --smoke    # tiny sizes, results in $TMPDIR/certgate-bench-smoke
    .venv/bin/python bench/run.py --only relay,fleet --keep-work

The suite (``bench.suite``) runs in a child process started with OPENSSL_CONF pointing at
``bench/openssl-pin.cnf``, so that every TLS context of the load generator (and of
certgate, HAProxy and stunnel, which get the same variable) offers exactly TLS 1.3,
TLS_AES_128_GCM_SHA256 and X25519: OpenSSL reads that file once, when ``ssl`` is first
loaded, which is why it cannot be set from inside the suite. Past the time budget the
suite is sent SIGTERM, stops every process it started and writes what it has.

This file imports nothing that loads ``ssl``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN_FILE = ROOT / "bench" / "openssl-pin.cnf"
BUDGET_S = {"full": 570.0, "smoke": 150.0}
STOP_GRACE_S = 30.0


def main(argv: list[str]) -> int:
    budget = BUDGET_S["smoke" if "--smoke" in argv else "full"]
    child_env = {
        **os.environ,
        "OPENSSL_CONF": str(PIN_FILE),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    suite = subprocess.Popen([sys.executable, "-m", "bench.suite", *argv], env=child_env, cwd=ROOT)
    try:
        return suite.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        print(f"bench: time budget of {budget:g}s exceeded; stopping", file=sys.stderr)
        return _stop(suite) or 124
    except KeyboardInterrupt:
        return _stop(suite) or 130


def _stop(suite: subprocess.Popen[bytes]) -> int:
    suite.send_signal(signal.SIGTERM)  # the suite stops its own children, then exits
    try:
        return suite.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        suite.kill()
        return suite.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
