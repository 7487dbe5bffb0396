"""Device-agent harness: a state directory provisioned from the tunnel harness's PKI (no
console), so the agent's listeners and tunnel client run against the real data plane
(``tests/tunnel/dataplane.py``). Also: an origin that counts requests, a TCP sentinel
that counts connection attempts, a recorder for the tunnel's log, and tiny raw clients.
"""

from __future__ import annotations

import http.server
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from certgate.device.agent import AgentConfig
from certgate.device.listeners import ListenAddress, Timeouts
from certgate.device.state import CertifiedKey, Enrollment, StateDir
from certgate.pki.keys import load_private_key_pem
from certgate.protocol import socks5
from tests.support import CERTGATE, free_port, wait_for_tls_port
from tests.tunnel.dataplane import GROUP, PKI, Client

BROWSER = "com.example.browser"
MAIL = "com.example.mail"
PAGE = b"<h1>intranet</h1>\n"

# Same destination, different apps: the browser tunnels, mail is blocked; 127.0.0.1
# (by name) bypasses for everyone; anything else falls to the default, block.
RULES: dict[str, Any] = {
    "default": "block",
    "rules": [
        {"apps": [BROWSER, "certgate.unattributed"], "domains": ["localhost"], "action": "tunnel"},
        {"apps": [MAIL], "domains": ["localhost"], "action": "block"},
        {"apps": ["*"], "domains": ["127.0.0.1"], "action": "bypass"},
    ],
}


def pem(cert: Any) -> str:
    return str(cert.public_bytes(Encoding.PEM).decode())


def provision(
    directory: Path,
    pki: PKI,
    device: Client,
    tunnel_port: int,
    rules: dict[str, Any] | None = None,
    *,
    version: int = 1,
    group: str = GROUP,
) -> StateDir:
    """A state dir as enrollment + profile delivery would leave it, for ``device``."""
    state = StateDir(directory)
    state.create()
    enrollment = Enrollment("https://127.0.0.1:9", device.device_uid, group, "linux", "t", "now")
    state.save_enrollment(enrollment, "cgd_unused", pem(pki.root).encode())
    key = load_private_key_pem(device.key_path.read_bytes())
    identity = CertifiedKey(key, device.cert, (pki.device_root, pki.root))
    profile = {
        "version": version,
        "device_uid": device.device_uid,
        "group_id": group,
        "tunnel": {"hosts": ["127.0.0.1"], "per_app_port": tunnel_port, "proxy_port": 1},
        "tunnel_trust": [pem(pki.scr), pem(pki.root)],
        "rules": rules or RULES,
        "thumbprint": identity.thumbprint,
    }
    state.save_profile(identity, profile)
    return state


def agent_config(**overrides: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "socks": ListenAddress("127.0.0.1", 0),
        "http": ListenAddress("127.0.0.1", 0),
        "app_ports": ((BROWSER, ListenAddress("127.0.0.1", 0)),),
        "check_interval_s": None,
        "policy_wait_s": None,  # the provisioned console URL leads nowhere
        "timeouts": Timeouts(head_s=5, connect_s=5, idle_s=30),
    }
    values.update(overrides)
    return AgentConfig(**values)


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    server: _CountingServer

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: Any) -> None:
        pass


class _CountingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _CountingHandler)
        self.requests: list[str] = []


@contextmanager
def counting_origin() -> Iterator[_CountingServer]:
    """The intranet: a real HTTP server on loopback that records every request path."""
    server = _CountingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Sentinel:
    """A TCP listener that only counts connection attempts (to prove there were none)."""

    sock: socket.socket = field(default_factory=socket.socket)
    accepted: int = 0

    def __post_init__(self) -> None:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


class TunnelLog(logging.Handler):
    """Records the tunnel data plane's log lines (it runs in-process, on its own thread)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "certgate.tunnel":  # the data plane, not feed sync chatter
            self.lines.append(record.getMessage())

    def admits(self, app: str | None = None, dest: str | None = None) -> list[str]:
        return [
            line
            for line in self.lines
            if line.startswith("admit ")
            and (app is None or f" app={app} " in line)
            and (dest is None or f" dest={dest} " in line)
        ]

    def denials(self, reason: str) -> list[str]:
        return [
            line for line in self.lines if line.startswith("deny ") and f"reason={reason}" in line
        ]


@contextmanager
def tunnel_log() -> Iterator[TunnelLog]:
    logger = logging.getLogger("certgate.tunnel")
    handler, level = TunnelLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def socks_connect(port: int, host: str, dest_port: int) -> tuple[socket.socket, int]:
    """A raw SOCKS5 client: greeting, CONNECT; returns the socket and the REP code."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    parser = socks5.ClientReplyParser()
    sock.sendall(socks5.client_greeting() + socks5.client_connect(host, dest_port))
    while True:
        event = parser.next_event()
        if isinstance(event, socks5.CommandReply):
            return sock, int(event.code)
        if event is socks5.NEED_DATA:
            parser.receive_data(sock.recv(4096))
        elif isinstance(event, socks5.ConnectionClosed):
            return sock, -1


def http_get_via_socks(port: int, host: str, dest_port: int) -> tuple[int, bytes]:
    sock, code = socks_connect(port, host, dest_port)
    with sock:
        if code != 0:
            return code, b""
        sock.sendall(f"GET /socks HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return code, recv_all(sock)


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return recv_all(sock)


@dataclass
class Agent:
    """A running ``certgate device run`` process and the ports of its listeners."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    socks: int
    http: int
    browser: int  # the port dedicated to ``app``

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


def start_agent(state: StateDir, work: Path, app: str = BROWSER) -> Agent:
    """``certgate device run`` for ``state`` on free loopback ports (SOCKS5, HTTP, and one
    port of ``app``'s own), checking the console every second; logs to work/agent.log."""
    socks, http, browser = free_port(), free_port(), free_port()
    log_path = work / "agent.log"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [*CERTGATE, "device", "run", "-s", str(state.path),
             "--socks", f"127.0.0.1:{socks}", "--http", f"127.0.0.1:{http}",
             "--app-port", f"{app}={browser}", "--check-interval", "1"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    agent = Agent(proc, log_path, socks, http, browser)
    try:
        for port in (socks, http, browser):
            wait_for_tls_port(port, proc, 30)
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        raise RuntimeError(f"the agent did not start ({exc}):\n{agent.log()}") from None
    return agent
