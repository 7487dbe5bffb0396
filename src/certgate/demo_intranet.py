"""The demo's intranet on loopback: a web page and a UDP echo service, and who dialed them.

``certgate demo`` fetches the page through the tunnel and a cascade, and sends datagrams
to the echo through the device's UDP forward. To show that a cascade's back end, not its
front end, reached the page, the web server names the process holding the other end of
each connection, from the kernel's socket table (Linux; elsewhere it says it cannot tell).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["Intranet", "UDPEcho", "socket_owner"]


class Intranet(http.server.ThreadingHTTPServer):
    """A web server on loopback answering ``page`` to every GET. For each request it notes
    which of ``processes`` (pid -> name) holds the other end of the connection
    (``visitors``, None when unknown): the tunnel node that dialed it."""

    def __init__(self, page: bytes, processes: Mapping[int, str]) -> None:
        super().__init__(("127.0.0.1", 0), _IntranetPage)
        self.page, self.processes = page, processes
        self.visitors: list[str | None] = []


class _IntranetPage(http.server.BaseHTTPRequestHandler):
    server: Intranet

    def do_GET(self) -> None:
        here = self.connection.getsockname()
        owner = socket_owner(self.client_address, here, self.server.processes)
        self.server.visitors.append(owner)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.page)))
        self.end_headers()
        self.wfile.write(self.server.page)

    def log_message(self, *args: Any) -> None:
        pass


def socket_owner(
    local: tuple[str, int], remote: tuple[str, int], processes: Mapping[int, str]
) -> str | None:
    """The name of the process of ``processes`` (pid -> name) that, itself or through a
    descendant, holds the TCP socket ``local`` -> ``remote`` (IPv4), from the kernel's
    tables (/proc/net/tcp, /proc/PID/fd); None where there are none (not Linux) or none
    of them holds it."""
    wanted = f"{_proc_net(local)} {_proc_net(remote)}"
    try:
        rows = [row.split() for row in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    except OSError:
        return None
    sockets = {f"socket:[{row[9]}]" for row in rows if f"{row[1]} {row[2]}" == wanted}
    for pid, name in processes.items():
        if any(sockets & _open_files(each) for each in _with_descendants(pid)):
            return name  # the node itself, or one of its workers
    return None


def _with_descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (a node's data plane may run in workers)."""
    found: list[int] = []
    pending = [pid]
    while pending and len(found) < 256:
        each = pending.pop()
        found.append(each)
        with contextlib.suppress(OSError, ValueError):
            for task in Path(f"/proc/{each}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
    return found


def _proc_net(address: tuple[str, int]) -> str:
    """An IPv4 address as /proc/net/tcp spells it: the 32-bit value in host order, hex."""
    value = int.from_bytes(socket.inet_aton(address[0]), sys.byteorder)
    return f"{value:08X}:{address[1]:04X}"


def _open_files(pid: int) -> set[str]:
    found = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):  # closed meanwhile
                found.add(os.readlink(fd))
    return found


class UDPEcho:
    """A UDP service on loopback answering each datagram with ``echo: `` and its bytes."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)  # so that the thread sees close() soon
        self.port: int = self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                data, sender = self.sock.recvfrom(65535)
                self.sock.sendto(b"echo: " + data, sender)
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self.running = False
        self.thread.join(timeout=5)
        self.sock.close()
