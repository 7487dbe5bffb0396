"""Load generators: blocking TLS clients on the load-generator core.

Each client opens TCP, completes the TLS handshake with its client certificate, sends
``CONNECT`` when the relay is certgate, then talks to the origin (``bench.origin``).
Relay CPU is read from ``/proc/PID/stat`` right before and after each measured window, so
what the load generator itself costs never counts.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import env
from bench.origin import ACK, download_request, upload_request

BUFFER = 1024 * 1024
_ZEROS = memoryview(bytes(BUFFER))
CONNECT_OK = b"HTTP/1.1 200"
MAX_HEAD = 16 * 1024


@dataclass(frozen=True)
class Target:
    """How to reach the origin through one relay."""

    name: str
    port: int
    origin_port: int
    tls: ssl.SSLContext | None
    connect: bool
    pid: int

    def relay_cpu(self) -> float:
        return env.tree_cpu_seconds(self.pid)


def client_context(trust: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """The device side: trusts the tunnel's chain, presents the app certificate.

    The cipher suite and group are pinned by OPENSSL_CONF (``bench/openssl-pin.cnf``),
    which the benchmark sets before ``ssl`` is first loaded.
    """
    ctx = ssl.create_default_context(cafile=str(trust))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    return ctx


def open_stream(
    target: Target, timeout: float = 30.0, session: ssl.SSLSession | None = None
) -> socket.socket:
    """A byte stream to the origin through ``target`` (handshake and CONNECT done)."""
    raw = socket.create_connection(("127.0.0.1", target.port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock: socket.socket = raw
        if target.tls is not None:
            sock = target.tls.wrap_socket(raw, server_hostname="localhost", session=session)
        if target.connect:
            _connect(sock, target.origin_port)
    except BaseException:
        raw.close()
        raise
    return sock


def _connect(sock: socket.socket, port: int) -> None:
    # RFC 9110 §9.3.6: CONNECT names the destination in authority-form.
    sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk or len(head) > MAX_HEAD:
            raise ConnectionError(f"CONNECT refused or cut: {head[:80]!r}")
        head += chunk
    if not head.startswith(CONNECT_OK):
        raise ConnectionError(f"CONNECT refused: {head.splitlines()[0]!r}")


def tls_facts(sock: socket.socket) -> dict[str, Any]:
    if not isinstance(sock, ssl.SSLSocket):
        return {"tls": None}
    cipher = sock.cipher()
    return {"tls": sock.version(), "cipher": cipher[0] if cipher else None}


# Throughput


def transfer(target: Target, size: int, direction: str) -> dict[str, Any]:
    """One stream moving ``size`` bytes up (client to origin) or down; relay CPU included."""
    with open_stream(target) as sock:
        facts = tls_facts(sock)
        cpu, started = target.relay_cpu(), time.perf_counter()
        (_upload if direction == "upload" else _download)(sock, size)
        wall, cpu = time.perf_counter() - started, target.relay_cpu() - cpu
    mb = size / 1e6
    return {
        "bytes": size,
        "wall_s": round(wall, 4),
        "mb_per_s": round(mb / wall, 1),
        "relay_cpu_s": round(cpu, 3),
        "mb_per_relay_cpu_s": round(mb / cpu, 1) if cpu > 0 else None,
        **facts,
    }


def _upload(sock: socket.socket, size: int) -> None:
    sock.sendall(upload_request(size))
    left = size
    while left:
        piece = min(left, BUFFER)
        sock.sendall(_ZEROS[:piece])
        left -= piece
    if sock.recv(1) != ACK:
        raise ConnectionError("origin did not acknowledge the upload")


def _download(sock: socket.socket, size: int) -> None:
    sock.sendall(download_request(size))
    buffer = bytearray(BUFFER)
    got = 0
    while got < size:
        n = sock.recv_into(buffer)
        if n == 0:
            raise ConnectionError(f"stream ended after {got} of {size} bytes")
        got += n


# New connections


@dataclass
class _RateWorker:
    target: Target
    resume: bool
    deadline: float
    latencies: list[float]
    reused: int = 0
    errors: int = 0
    last_error: str = ""

    def run(self) -> None:
        session: ssl.SSLSession | None = None
        while time.monotonic() < self.deadline:
            started = time.perf_counter()
            try:
                session = self._one(session)
            except (OSError, ConnectionError) as exc:
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                session = None
                continue
            self.latencies.append(time.perf_counter() - started)

    def _one(self, session: ssl.SSLSession | None) -> ssl.SSLSession | None:
        with open_stream(self.target, 10.0, session if self.resume else None) as sock:
            sock.sendall(b"P")
            if sock.recv(1) != ACK:
                raise ConnectionError("no first byte from the origin")
            if isinstance(sock, ssl.SSLSocket):
                self.reused += 1 if sock.session_reused else 0
                return sock.session  # TLS 1.3 tickets arrive after the handshake
        return None


def connection_rate(
    target: Target, seconds: float, threads: int, *, resume: bool
) -> dict[str, Any]:
    """New connections for ``seconds`` from ``threads`` clients: rate, latency, relay CPU."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    workers = [_RateWorker(target, resume, deadline, latencies) for _ in range(threads)]
    cpu, started = target.relay_cpu(), time.perf_counter()
    _run_threads([w.run for w in workers])
    wall, cpu = time.perf_counter() - started, target.relay_cpu() - cpu
    done = len(latencies)
    errors = sum(w.errors for w in workers)
    return {
        "connections": done,
        "errors": errors,
        "last_error": next((w.last_error for w in workers if w.last_error), None),
        "resumed": sum(w.reused for w in workers),
        "wall_s": round(wall, 3),
        "conns_per_s": round(done / wall, 1),
        "p50_ms": round(env.percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(env.percentile(latencies, 0.99) * 1000, 2),
        "relay_cpu_s": round(cpu, 3),
        "relay_cpu_ms_per_conn": round(cpu * 1000 / done, 3) if done else None,
        "conns_per_relay_cpu_s": round(done / cpu, 1) if cpu > 0 else None,
        "client_threads": threads,
    }


_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def probe_storm(target: Target, seconds: float, threads: int) -> dict[str, Any]:
    """Short TCP connections that close at once, half with FIN, half with a reset: what
    load-balancer health checks and port scans do. Measures how many the relay takes."""
    counts = [0] * threads
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def storm(index: int) -> None:
        while time.monotonic() < deadline:
            try:
                sock = socket.create_connection(("127.0.0.1", target.port), timeout=5)
            except OSError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if counts[index] % 2:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            sock.close()
            counts[index] += 1

    cpu, started = target.relay_cpu(), time.perf_counter()
    _run_threads([lambda i=i: storm(i) for i in range(threads)])  # type: ignore[misc]
    wall, cpu = time.perf_counter() - started, target.relay_cpu() - cpu
    return {
        "probes": sum(counts),
        "per_s": round(sum(counts) / wall),
        "errors": len(errors),
        "last_error": errors[-1] if errors else None,
        "relay_cpu_s": round(cpu, 3),
    }


def _run_threads(jobs: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=job, daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# Many tunnels


def open_many(target: Target, count: int, threads: int, deadline: float) -> list[socket.socket]:
    """Open up to ``count`` tunnels (stops early at ``deadline``); callers close them."""
    opened: list[socket.socket] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        if time.monotonic() > deadline:
            return
        sock = open_stream(target, timeout=60.0)
        with lock:
            opened.append(sock)

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(count)))
    except BaseException:
        close_all(opened)
        raise
    return opened


def parallel_transfer(
    target: Target, socks: list[socket.socket], size: int, direction: str
) -> dict[str, Any]:
    """``size`` bytes on each of ``socks`` at once; aggregate rate and relay CPU."""
    move = _upload if direction == "upload" else _download
    cpu, started = target.relay_cpu(), time.perf_counter()
    with ThreadPoolExecutor(len(socks)) as pool:
        list(pool.map(lambda s: move(s, size), socks))
    wall, cpu = time.perf_counter() - started, target.relay_cpu() - cpu
    mb = size * len(socks) / 1e6
    return {
        "streams": len(socks),
        "bytes_per_stream": size,
        "wall_s": round(wall, 3),
        "mb_per_s": round(mb / wall, 1),
        "relay_cpu_s": round(cpu, 3),
        "mb_per_relay_cpu_s": round(mb / cpu, 1) if cpu > 0 else None,
    }


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        try:
            sock.close()
        except OSError:
            continue
