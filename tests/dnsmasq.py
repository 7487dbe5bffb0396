"""A throwaway DNS server (Debian ``dnsmasq``) for the UDP scenarios, and real ``dig``.

dnsmasq runs from its own config on a free loopback port, answers one name (``NAME`` ->
``ANSWER``) and reads no system file (no resolv.conf, no hosts); it listens only there, so
a client reaches it through the tunnel or not at all."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

ANSWER = "10.9.8.7"
NAME = "intranet.corp.test"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def start_dnsmasq(work: Path) -> Iterator[int]:
    """dnsmasq in ``work`` (created), answering; yields its UDP port."""
    binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    work.mkdir(parents=True, exist_ok=True)
    port = free_udp_port()
    conf = work / "dnsmasq.conf"
    conf.write_text(
        f"port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\n"
        f"no-dhcp-interface=\naddress=/{NAME}/{ANSWER}\npid-file={work / 'pid'}\n"
        "log-queries\n"
    )
    with (work / "log").open("wb") as log_file:
        proc = subprocess.Popen(
            [binary, f"--conf-file={conf}", "--keep-in-foreground", "--log-facility=-"],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + 20
        while dig(port, timeout_s=1).returncode != 0:
            assert proc.poll() is None, (work / "log").read_text()
            assert time.monotonic() < deadline, "dnsmasq did not answer"
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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
