"""The benchmark's world: a real console, its groups, enrolled devices, tunnel state dirs.

Everything goes through the product's own paths: ``certgate console init`` (in-process,
as ``local.init``), ``certgate console serve`` as a subprocess, the admin and device APIs
over mTLS for enrollment and certificates, and ``certgate tunnel setup`` for tunnel
nodes. The same tunnel identity and Device Root are then written out for HAProxy and
stunnel, so every relay presents and verifies the same certificates.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from sqlalchemy.orm import Session

from bench import procs
from bench.procs import Proc, Supervisor
from certgate.console import local
from certgate.console.services import admins, ca, groups
from certgate.pki.csr import build_csr
from certgate.pki.keys import KeyAlgorithm, generate_key, private_key_pem
from certgate.pki.thumbprint import thumbprint
from certgate.tlsconf import pem_of
from certgate.tunnel.config import load_state

APP = "com.example.bench"
ENROLL_PASSWORD = "bench-enrollment-password"
CONSOLE_START_S = 60.0


def group_settings() -> dict[str, Any]:
    """Devices start compliant; tunnels may reach loopback only."""
    return {
        "initial_compliance": "compliant",
        "server_rules": {
            "default": "deny",
            "rules": [{"action": "allow", "cidrs": ["127.0.0.0/8"]}],
        },
    }


@dataclass
class Admin:
    username: str
    api_key: str
    cert_path: Path
    key_path: Path


@dataclass
class DeviceCert:
    """An enrolled device and one client certificate (key on disk, as the app keeps it)."""

    device_uid: str
    credential: str
    cert_path: Path
    key_path: Path
    thumbprint: str


@dataclass
class Console:
    work: Path
    data_dir: Path
    port: int
    proc: Proc | None = None
    admins: dict[str, Admin] = field(default_factory=dict)

    @classmethod
    def init(cls, work: Path) -> Console:
        port = procs.free_port()
        data_dir = work / "console"
        url = f"https://127.0.0.1:{port}"
        local.init(data_dir, KeyAlgorithm.EC_P256, url, "127.0.0.1", port, None)
        console = cls(work, data_dir, port)
        with console.local() as (_, pki):
            (work / "instance-root.pem").write_bytes(pem_of([pki.certs[ca.ROOT]]))
            labels = (ca.ROOT, *ca.INTERMEDIATES)
            (work / "console-chain.pem").write_bytes(pem_of([pki.certs[x] for x in labels]))
        return console

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "console.db"

    def start(self, sup: Supervisor, cores: set[int] | None = None) -> None:
        argv = [*procs.CERTGATE, "console", "serve", "-d", str(self.data_dir)]
        self.proc = sup.start("console", argv, cores=cores)
        procs.wait_for_port(self.port, self.proc, CONSOLE_START_S)

    def proc_cpu(self) -> float:
        return self.proc.cpu_seconds() if self.proc is not None else 0.0

    def stop(self, sup: Supervisor) -> None:
        if self.proc is not None:
            sup.stop(self.proc)
            self.proc = None

    @contextmanager
    def local(self) -> Iterator[tuple[Session, ca.InstancePKI]]:
        """A transaction on the console's database, as the CLI opens it."""
        db, pki = local.open_db(local.load_config(self.data_dir))
        try:
            with db.transaction() as session:
                yield session, pki
        finally:
            db.dispose()

    def make_admin(self, username: str, role: str, group: str) -> Admin:
        with self.local() as (session, pki):
            admin = admins.create_admin(session, username, role, group)
            key = admins.issue_api_key(session, admin)
            cert, private = admins.issue_admin_cert(session, pki, admin)
        cert_path, key_path = self.work / f"{username}.pem", self.work / f"{username}.key"
        cert_path.write_text(ca.pem(cert))
        key_path.write_bytes(private_key_pem(private))
        self.admins[username] = Admin(username, key.token, cert_path, key_path)
        return self.admins[username]

    def create_group(self, group_id: str) -> None:
        with self.local() as (session, pki):
            groups.create_group(session, pki, group_id, group_id, local.TOP_GROUP, group_settings())

    def client(self, admin: Admin | None = None, *, bearer: str | None = None) -> httpx.Client:
        token = bearer or (admin.api_key if admin else None)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        cert = (str(admin.cert_path), str(admin.key_path)) if admin else None
        verify = httpx.create_ssl_context(verify=str(self.work / "console-chain.pem"))
        if cert is not None:
            verify.load_cert_chain(*cert)
        return httpx.Client(base_url=self.url, verify=verify, headers=headers, timeout=60)


def add_enrollment_user(console: Console, admin: Admin, group: str) -> str:
    username = f"bench-{group}"
    with console.client(admin) as api:
        api.post(
            f"/api/v1/groups/{group}/enrollment-users",
            json={"username": username, "password": ENROLL_PASSWORD},
        ).raise_for_status()
    return username


def enroll(console: Console, username: str) -> tuple[str, str]:
    """(device uid, device credential) of a newly enrolled device."""
    with console.client() as anon:
        response = anon.post(
            "/api/v1/enroll",
            json={"username": username, "password": ENROLL_PASSWORD, "platform": "linux"},
        )
        response.raise_for_status()
        device = response.json()
    return device["device_uid"], device["credential"]


def enroll_app(console: Console, username: str, name: str) -> DeviceCert:
    """Enroll a device and get a Proxy-mode app certificate for it (device API, CSR)."""
    uid, credential = enroll(console, username)
    key = generate_key()
    csr = build_csr(key, "bench app").decode()
    with console.client(bearer=credential) as device:
        response = device.post(
            f"/api/v1/device/apps/{APP}/certificate",
            json={"username": username, "password": ENROLL_PASSWORD, "csr": csr},
        )
        response.raise_for_status()
        issued = response.json()
    cert_path, key_path = console.work / f"{name}.pem", console.work / f"{name}.key"
    cert_path.write_text(issued["certificate"])
    key_path.write_bytes(private_key_pem(key))
    return DeviceCert(uid, credential, cert_path, key_path, issued["thumbprint"])


def setup_node(console: Console, admin: Admin, group: str, name: str) -> Path:
    """``certgate tunnel setup`` for one node; returns its state directory."""
    state_dir = console.work / f"tunnel-{name}"
    subprocess.run(
        [
            *procs.CERTGATE,
            "tunnel",
            "setup",
            "--console",
            console.url,
            "--group",
            group,
            "--api-key",
            admin.api_key,
            "--admin-cert",
            str(admin.cert_path),
            "--admin-key",
            str(admin.key_path),
            "--ca-file",
            str(console.work / "instance-root.pem"),
            "--state-dir",
            str(state_dir),
            "--node-name",
            name,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return state_dir


@dataclass(frozen=True)
class RelayCerts:
    """The tunnel identity and client trust, as files every relay can load."""

    chain: Path  # tunnel cert + Secure Channel Root + Root (what certgate sends)
    key: Path
    combined: Path  # chain + key, HAProxy's ``crt`` format
    client_ca: Path  # Device Root + Root: the anchors verify a full chain
    server_trust: Path  # Secure Channel Root + Root: what clients trust


def relay_certs(state_dir: Path, out: Path) -> RelayCerts:
    state = load_state(state_dir)
    chain = pem_of([state.tunnel_cert, *state.tunnel_chain])
    key = private_key_pem(state.tunnel_key)
    certs = RelayCerts(
        out / "relay-chain.pem",
        out / "relay.key",
        out / "relay-combined.pem",
        out / "client-ca.pem",
        out / "server-trust.pem",
    )
    certs.chain.write_bytes(chain)
    certs.key.write_bytes(key)
    certs.key.chmod(0o600)
    certs.combined.write_bytes(chain + key)
    certs.combined.chmod(0o600)
    certs.client_ca.write_bytes(pem_of([state.device_root, state.root]))
    certs.server_trust.write_bytes(pem_of(state.tunnel_chain))
    return certs


def cert_thumbprint(path: Path) -> str:
    return thumbprint(x509.load_pem_x509_certificate(path.read_bytes()))
