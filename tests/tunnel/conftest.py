"""Helpers for the tunnel control-plane tests: groups, devices and tunnel nodes on a real
console (real HTTPS, real mTLS), raw signed feed messages, and a controllable clock."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certgate.pki.authority import Authority, Names
from certgate.pki.keys import generate_key, load_private_key_pem
from certgate.tlsconf import client_context
from certgate.tunnel import setup
from certgate.tunnel.config import TunnelState
from certgate.tunnel.service import TLS_BACKENDS
from tests.support import (
    AdminCreds,
    RunningConsole,
    init_console,
    make_csr,
    start_console,
)

_ids = itertools.count(1)
COMPLIANT = {"initial_compliance": "compliant"}


def unique(prefix: str) -> str:
    return f"{prefix}{next(_ids)}-{secrets.token_hex(3)}"


def root_of(console: RunningConsole) -> x509.Certificate:
    """The instance root: the self-signed certificate of the console's chain file."""
    certs = x509.load_pem_x509_certificates(console.chain_path.read_bytes())
    return next(c for c in certs if c.issuer == c.subject)


def foreign_root_pem() -> bytes:
    """A self-signed root of some other instance."""
    root = Authority().create_root(generate_key(), Names("another instance root"))
    return root.public_bytes(Encoding.PEM)


def root_file(console: RunningConsole) -> Path:
    path = console.work / "instance-root.pem"
    if not path.exists():
        path.write_bytes(root_of(console).public_bytes(Encoding.PEM))
    return path


def admin_credential(creds: AdminCreds) -> setup.AdminCredential:
    chain = x509.load_pem_x509_certificates(creds.cert_path.read_bytes())
    key = load_private_key_pem(creds.key_path.read_bytes())
    return setup.AdminCredential(creds.api_key, tuple(chain), key)


def create_group(console: RunningConsole, settings: dict[str, Any] | None = None) -> str:
    group_id = unique("g")
    body = {"id": group_id, "name": group_id, "parent_id": "global", "settings": settings}
    with console.client(console.admins["root"]) as client:
        response = client.post("/api/v1/groups", json=body)
    assert response.status_code == 201, response.text
    return group_id


def setup_admin(console: RunningConsole, group_id: str) -> AdminCreds:
    """An admin holding only the tunnel-setup role on ``group_id``."""
    return console.make_admin(unique("setup"), "tunnel-setup", group_id)


def setup_node(
    console: RunningConsole, group_id: str, state_dir: Path, node_name: str = "node-a"
) -> TunnelState:
    creds = console.admins.get(f"setup-{group_id}") or setup_admin(console, group_id)
    console.admins[f"setup-{group_id}"] = creds
    return setup.setup(
        console.url, group_id, admin_credential(creds), root_of(console), state_dir, node_name
    )


@dataclass(frozen=True)
class Device:
    uid: str
    thumbprint: str
    credential: str


def enroll_device(console: RunningConsole, group_id: str) -> Device:
    """Enroll a device with a password and deliver its Per-App Tunnel profile (a cert)."""
    user, password = unique("user"), secrets.token_urlsafe(12)
    with console.client(console.admins["root"]) as client:
        response = client.post(
            f"/api/v1/groups/{group_id}/enrollment-users",
            json={"username": user, "password": password},
        )
        assert response.status_code == 201, response.text
    with console.client() as client:
        body = {"username": user, "password": password, "platform": "ios", "name": user}
        enrolled = client.post("/api/v1/enroll", json=body)
        assert enrolled.status_code == 201, enrolled.text
    credential = enrolled.json()["credential"]
    with console.client(api_key=credential) as client:
        profile = client.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})
        assert profile.status_code == 201, profile.text
    return Device(enrolled.json()["device_uid"], profile.json()["thumbprint"], credential)


def set_compliance(console: RunningConsole, device: Device, status: str) -> None:
    with console.client(console.admins["root"]) as client:
        response = client.put(f"/api/v1/devices/{device.uid}/compliance", json={"status": status})
    assert response.status_code == 200, response.text


def tunnel_client(state: TunnelState) -> httpx.Client:
    """A client holding ``state``'s tunnel identity, for fetching raw signed messages."""
    ctx = client_context(
        [state.root], chain=[state.tunnel_cert, *state.tunnel_chain], key=state.tunnel_key
    )
    return httpx.Client(base_url=state.console_url, verify=ctx, timeout=30)


def raw_batch(state: TunnelState, after: int, version: int | None = None) -> bytes:
    """The signed batch after ``after``, of feed ``version`` (None: a node that says none)."""
    params = {"after": after, "wait": 0} | ({} if version is None else {"version": version})
    with tunnel_client(state) as client:
        response = client.get(state.trust.feed.feed_path, params=params)
    assert response.status_code == 200, (response.status_code, response.text)
    return response.content


def raw_snapshot(state: TunnelState) -> bytes:
    """A one-page snapshot in format 2 (what ``FeedFollower.accept_snapshot`` takes)."""
    with tunnel_client(state) as client:
        response = client.get(state.trust.feed.snapshot_path, params={"format": 2})
    assert response.status_code == 200, response.text
    return response.content


@contextmanager
def console_stopped(console: RunningConsole) -> Iterator[None]:
    """Stop the console for the duration, then start it again on the same port."""
    console.stop()
    try:
        yield
    finally:
        restarted = start_console(console.work, console.data_dir, console.port)
        console.proc = restarted.proc


class Clock:
    """A wall clock the test moves by hand (no sleeping, no timing assertions)."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=TLS_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The data plane's TLS backend: a test asking for it runs on each."""
    return str(request.param)


@pytest.fixture(scope="module")
def sqlite_console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningConsole]:
    """A real console on SQLite only, for tests where the storage backend is irrelevant."""
    work = tmp_path_factory.mktemp("console-sqlite")
    data_dir, port = init_console(work)
    running = start_console(work, data_dir, port)
    running.make_admin("root", "superadmin", "global")
    try:
        yield running
    finally:
        running.stop()
