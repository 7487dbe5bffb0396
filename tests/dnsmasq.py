"""A throwaway DNS server (Debian ``dnsmasq``) for the UDP scenarios, and real ``dig``.

dnsmasq runs from its own config on a free loopback port, answers one name (``NAME`` ->
``ANSWER``) and reads no system file (no resolv.conf, no hosts); it listens only there, so
a client reaches it through the tunnel or not at all."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support import free_tcp_and_udp_port

ANSWER = "10.9.8.7"
NAME = "intranet.corp.test"
START_ATTEMPTS = 5


@contextlib.contextmanager
def start_dnsmasq(work: Path) -> Iterator[int]:
    """dnsmasq in ``work`` (created), answering; yields its UDP port.

    dnsmasq binds the port for TCP and UDP; when another process (a parallel test worker's
    client connection) takes it between the choice and the bind, it starts again on
    another port, a bounded number of times."""
    work.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_tcp_and_udp_port()
        proc = spawn_dnsmasq(work, port)
        try:
            if answering(proc, port):
                yield port
                return
            log = (work / "log").read_text()
            assert "Address already in use" in log and attempt < START_ATTEMPTS, log
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def spawn_dnsmasq(work: Path, port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    conf = work / "dnsmasq.conf"
    conf.write_text(
        f"port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\n"
        f"no-dhcp-interface=\naddress=/{NAME}/{ANSWER}\npid-file={work / 'pid'}\n"
        "log-queries\n"
    )
    with (work / "log").open("wb") as log_file:
        return subprocess.Popen(
            [binary, f"--conf-file={conf}", "--keep-in-foreground", "--log-facility=-"],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )


def answering(proc: subprocess.Popen[bytes], port: int) -> bool:
    """True once dnsmasq answers on ``port``; False if it exited (it could not bind)."""
    deadline = time.monotonic() + 20
    while dig(port, timeout_s=1).returncode != 0:
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "dnsmasq did not answer"
    return True


def dig(port: int, timeout_s: int = 5) -> subprocess.CompletedProcess[str]:
    """Real dig asking 127.0.0.1:``port`` for ``NAME`` once (exit 9: no reply)."""
    return subprocess.run(
        [
            "dig",
            "@127.0.0.1",
            "-p",
            str(port),
            NAME,
            "A",
            "+short",
            "+tries=1",
            f"+time={timeout_s}",
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s + 20,
        check=False,
    )
