"""Several consoles on one PostgreSQL (issue #15): two started at the same instant both
come up, serve the same instance, and share one console TLS identity.

Each round is a fresh database (no console TLS certificate yet: the start that used to
crash one of them with an IntegrityError on the sealed key ``console-tls``), with each
console in its own data directory holding copies of the shared settings and master key,
as on two machines.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from certgate.console import local
from tests.postgres import PostgresServer
from tests.support import (
    CERTGATE,
    START_TIMEOUT_S,
    RunningConsole,
    free_port,
    init_console,
    wait_for_tls_port,
)

pytestmark = pytest.mark.integration
ROUNDS = 4


def second_data_dir(first: Path, work: Path) -> Path:
    """What an operator copies to another console machine: settings and master key."""
    second = work / "console-b"
    second.mkdir(mode=0o700)
    for name in (local.SETTINGS_FILE, "master.key"):
        shutil.copy2(first / name, second / name)
    return second


def start_together(work: Path, dirs: list[Path], ports: list[int]) -> list[RunningConsole]:
    """Start the consoles released by one barrier, so their startups overlap."""
    barrier = threading.Barrier(len(dirs))
    started: dict[int, subprocess.Popen[bytes]] = {}

    def start(index: int) -> None:
        log_path = work / f"console-{ports[index]}.log"
        args = ["console", "serve", "-d", str(dirs[index]), "--port", str(ports[index])]
        with log_path.open("ab") as log_file:
            barrier.wait()
            started[index] = subprocess.Popen(
                [*CERTGATE, *args], stdout=log_file, stderr=subprocess.STDOUT
            )

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(dirs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [
        RunningConsole(dirs[i], ports[i], started[i], work / f"console-{ports[i]}.log", work)
        for i in range(len(dirs))
    ]


def served_certificate(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_two_consoles_started_at_the_same_instant_both_serve(
    postgres: PostgresServer, tmp_path: Path, round_: int
) -> None:
    db_url = postgres.create_database(f"twoconsoles{round_}")
    first, port_a = init_console(tmp_path, db_url=db_url)
    dirs, ports = [first, second_data_dir(first, tmp_path)], [port_a, free_port()]
    consoles = start_together(tmp_path, dirs, ports)
    try:
        for console in consoles:
            try:
                wait_for_tls_port(console.port, console.proc, START_TIMEOUT_S)
            except (RuntimeError, TimeoutError) as exc:
                raise AssertionError(f"{exc}:\n{console.log()}") from None
        certs = {hashlib.sha256(served_certificate(c.port)).hexdigest() for c in consoles}
        assert len(certs) == 1, "the consoles should share one TLS identity"
        for console in consoles:
            assert console.proc.poll() is None, console.log()
            assert "IntegrityError" not in console.log()
    finally:
        for console in consoles:
            console.stop()
