"""Test harness: real console processes on loopback, admin credentials, mTLS clients.

Nothing is mocked: the console runs as ``certgate console serve`` in a subprocess with its
own SQLite data directory, and clients talk real TLS to it.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from sqlalchemy.orm import Session

from certgate.console import local
from certgate.console.services import admins, ca
from certgate.pki.keys import KeyAlgorithm, PrivateKey, private_key_pem

CERTGATE = [sys.executable, "-m", "certgate"]
START_TIMEOUT_S = 30.0


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """``issuer``'s key signed ``cert`` (an old and a new CA of a rotation share a name)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def free_port() -> int:
    """A loopback port free for TCP now, that no other test worker hands out."""
    return PORTS.take(socket.SOCK_STREAM)


def free_udp_port() -> int:
    """A loopback port free for UDP now, that no other test worker hands out."""
    return PORTS.take(socket.SOCK_DGRAM)


def free_tcp_and_udp_port() -> int:
    """A loopback port free for both TCP and UDP now, for servers (dnsmasq, krb5kdc) that
    bind both."""
    return PORTS.take(socket.SOCK_STREAM, socket.SOCK_DGRAM)


class PortAllocator:
    """Hands out loopback ports from this test worker's own slice of the ports below the
    kernel's ephemeral range.

    Binding port 0 returns a port from the ephemeral range, where a parallel worker's
    client connection or another worker's ``bind(0)`` may take it before the server we
    start binds it (seen in CI: dnsmasq "Address already in use"). Below that range the
    kernel never picks a port by itself, and each xdist worker has its own slice, so only
    a foreign process could collide; every port is still checked by binding it."""

    def __init__(self, ports: range) -> None:
        self._ports = ports
        self._next = random.randrange(len(ports))  # a re-run starts elsewhere

    @classmethod
    def for_this_worker(cls) -> PortAllocator:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        first, workers = 10_000, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
        span = (low - first) // workers
        if span < 500:
            raise RuntimeError(f"ephemeral ports start at {low}: too few ports below")
        return cls(range(first + worker * span, first + (worker + 1) * span))

    def take(self, *kinds: socket.SocketKind) -> int:
        for _ in range(len(self._ports)):
            port = self._ports[self._next]
            self._next = (self._next + 1) % len(self._ports)
            if all(bindable(port, kind) for kind in kinds):
                return port
        raise RuntimeError(f"no free loopback port in {self._ports}")


def bindable(port: int, kind: socket.SocketKind) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


PORTS = PortAllocator.for_this_worker()


def wait_for_tls_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening after {timeout}s")


@dataclass
class AdminCreds:
    username: str
    id: str
    api_key: str
    cert_path: Path
    key_path: Path


@dataclass
class RunningConsole:
    data_dir: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    work: Path
    admins: dict[str, AdminCreds] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def chain_path(self) -> Path:
        return self.work / "chain.pem"

    @contextmanager
    def local(self) -> Iterator[tuple[Session, ca.InstancePKI]]:
        """A transaction on the console's own database (as the CLI would open it)."""
        db, pki = local.open_db(local.load_config(self.data_dir))
        try:
            with db.transaction() as session:
                yield session, pki
        finally:
            db.dispose()

    def make_admin(self, username: str, role: str, group: str) -> AdminCreds:
        with self.local() as (session, pki):
            admin = admins.create_admin(session, username, role, group)
            key = admins.issue_api_key(session, admin)
            cert, private = admins.issue_admin_cert(session, pki, admin)
        creds = self.write_creds(username, admin.id, key.token, ca.pem(cert), private)
        self.admins[username] = creds
        return creds

    def write_creds(
        self, name: str, admin_id: str, api_key: str, cert_pem: str, key: PrivateKey
    ) -> AdminCreds:
        cert_path, key_path = self.work / f"{name}.pem", self.work / f"{name}.key"
        cert_path.write_text(cert_pem)
        key_path.write_bytes(private_key_pem(key))
        return AdminCreds(name, admin_id, api_key, cert_path, key_path)

    def ssl_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.chain_path))
        if cert is not None:
            ctx.load_cert_chain(cert, key)
        return ctx

    def client(
        self,
        creds: AdminCreds | None = None,
        *,
        send_key: bool = True,
        send_cert: bool = True,
        api_key: str | None = None,
    ) -> httpx.Client:
        headers = {}
        token = api_key or (creds.api_key if creds and send_key else None)
        if token:
            headers["authorization"] = f"Bearer {token}"
        ctx = self.ssl_context(
            creds.cert_path if creds and send_cert else None,
            creds.key_path if creds and send_cert else None,
        )
        return httpx.Client(base_url=self.url, verify=ctx, headers=headers, timeout=30)

    def stop(self, sig: int | None = None) -> None:
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            self.proc.wait(timeout=20)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def init_console(
    work: Path, port: int | None = None, db_url: str | None = None
) -> tuple[Path, int]:
    """A fresh console data dir (EC P-256 PKI) on SQLite, or on ``db_url``."""
    port = port or free_port()
    data_dir = work / "console"
    url = f"https://127.0.0.1:{port}"
    local.init(data_dir, KeyAlgorithm.EC_P256, url, "127.0.0.1", port, db_url)
    return data_dir, port


def start_console(work: Path, data_dir: Path, port: int) -> RunningConsole:
    log_path = work / f"console-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [*CERTGATE, "console", "serve", "-d", str(data_dir)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    running = RunningConsole(data_dir, port, proc, log_path, work)
    try:
        wait_for_tls_port(port, proc, START_TIMEOUT_S)
    except Exception:
        running.stop()
        raise RuntimeError(f"console did not start:\n{running.log()}") from None
    with running.local() as (_, pki):
        running.chain_path.write_text(
            "".join(ca.pem(pki.certs[label]) for label in (ca.ROOT, *ca.INTERMEDIATES))
        )
    return running


def json_of(response: httpx.Response) -> Any:
    return response.json()


def make_csr(
    key: PrivateKey | None = None, *, ca_true: bool = False, common_name: str = "device"
) -> tuple[bytes, PrivateKey]:
    """A PEM CSR as a device would send it (optionally asking for CA:TRUE)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    from certgate.pki.keys import generate_key

    key = key or generate_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    if ca_true:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.PEM), key
