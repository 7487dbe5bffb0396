"""Tests for the node's side of a Device Root rotation (certgate.tunnel.rotation, the
FeedFollower's trust operations, service.data_plane_tls), against a real console over mTLS
(this module has its own console: the rotation is instance-wide).

Each step's trust configuration lists the Device Roots to trust; the node rebuilds the data
plane's TLS context from it (real handshakes with console-issued device certificates show
what it admits), stores it for a restart, and keeps what it has on a refusal."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from certgate.errors import ConfigError
from certgate.feed import DEVICE_ROOT
from certgate.pki.keys import PrivateKey
from certgate.pki.thumbprint import thumbprint
from certgate.tlsconf import client_context
from certgate.tunnel import rotation
from certgate.tunnel.config import TunnelState, load_state
from certgate.tunnel.service import data_plane_tls
from certgate.tunnel.sync import FeedChange, FeedFollower
from tests.support import RunningConsole, make_csr
from tests.tunnel.conftest import (
    COMPLIANT,
    create_group,
    enroll_device,
    raw_snapshot,
    setup_node,
)
from tests.tunnel.test_rotation import trust_ops

pytestmark = pytest.mark.integration  # a real console process

HANDSHAKE_TIMEOUT_S = 30  # generous: the machine is shared


def step(console: RunningConsole, group: str, path: str, **params: Any) -> dict[str, Any]:
    with console.client(console.admins["root"]) as client:
        response = client.post(
            f"/api/v1/groups/{group}/rotations/device-root{path}",
            json={"overlap_s": 0} if path == "" else None,
            params=params,
        )
    assert response.status_code in (200, 201), response.text
    shown: dict[str, Any] = response.json()
    return shown


def device_cert(
    console: RunningConsole, group: str
) -> tuple[x509.Certificate, list[x509.Certificate], PrivateKey]:
    """A device certificate from the console's current Device Root, with its key."""
    device = enroll_device(console, group)
    csr, key = make_csr()
    with console.client(api_key=device.credential) as client:
        response = client.post("/api/v1/device/profile", json={"csr": csr.decode()})
    assert response.status_code == 201, response.text
    body = response.json()
    chain = [x509.load_pem_x509_certificate(c.encode()) for c in body["chain"]]
    return x509.load_pem_x509_certificate(body["certificate"].encode()), chain, key


def admitted(state: TunnelState, client: tuple[Any, ...]) -> bool:
    """A real TLS 1.3 handshake on a socket pair: does the data plane built from ``state``
    accept this device certificate (the server side decides)?"""
    leaf, chain, key = client
    server_ctx = data_plane_tls(
        [state.tunnel_cert, *state.tunnel_chain], state.tunnel_key, state.device_roots
    )
    client_ctx = client_context([state.root], chain=[leaf, chain[0]], key=key)
    client_ctx.check_hostname = False
    near, far = socket.socketpair()
    near.settimeout(HANDSHAKE_TIMEOUT_S)
    far.settimeout(HANDSHAKE_TIMEOUT_S)
    outcome: list[bool] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(far, server_side=True) as tls:
                tls.sendall(b"ok")
                outcome.append(True)
        except (ssl.SSLError, OSError):
            outcome.append(False)

    server = threading.Thread(target=serve)
    server.start()
    try:
        with client_ctx.wrap_socket(near) as tls:
            tls.recv(2)  # TLS 1.3: a refused client certificate shows after the handshake
    except (ssl.SSLError, OSError):
        pass
    server.join(HANDSHAKE_TIMEOUT_S)
    assert outcome, "the server side of the handshake did not end"
    return outcome[0]


class Rebuilt:
    """An ``on_identity`` callback building the data plane's context, as the runner does."""

    def __init__(self) -> None:
        self.given: list[TunnelState] = []

    def __call__(self, state: TunnelState) -> None:
        data_plane_tls(
            [state.tunnel_cert, *state.tunnel_chain], state.tunnel_key, state.device_roots
        )
        self.given.append(state)


def _ignore(_: FeedChange) -> None:
    pass


def roots(state: TunnelState) -> list[str]:
    return [thumbprint(r) for r in state.device_roots]


def test_a_node_trusts_both_roots_during_the_overlap_and_the_new_one_after(
    sqlite_console: RunningConsole, tmp_path: Path
) -> None:
    console = sqlite_console
    group = create_group(console, COMPLIANT)
    node = setup_node(console, group, tmp_path / "node")
    old_device = device_cert(console, group)
    rebuilt = Rebuilt()

    async def scenario() -> None:
        async with FeedFollower(node, state_dir=node.state_dir) as f:
            f.subscribe(_ignore, rebuilt)
            await f.accept_snapshot(raw_snapshot(node))
            old = thumbprint(node.device_root)
            new = step(console, group, "")["new"]["thumbprint"]
            await f.poll_once(wait=5)
            assert roots(f.state) == [old, new] == f.status()["device_roots"]
            assert roots(load_state(node.state_dir)) == [old, new]  # what a restart serves

            step(console, group, "/switch")
            await f.poll_once(wait=5)
            assert roots(f.state) == [new, old]
            new_device = device_cert(console, group)
            assert thumbprint(new_device[1][0]) == new
            assert admitted(f.state, old_device) and admitted(f.state, new_device)

            step(console, group, "/finish", force=True)
            await f.poll_once(wait=5)
            assert roots(f.state) == [new] == roots(load_state(node.state_dir))
            assert not admitted(f.state, old_device)
            assert admitted(f.state, new_device)
            assert [roots(s) for s in rebuilt.given] == [[old, new], [new, old], [new]]
            assert f.status()["identity_error"] is None

    asyncio.run(scenario())


def test_a_tampered_device_root_operation_is_refused(
    sqlite_console: RunningConsole, tmp_path: Path
) -> None:
    console = sqlite_console
    group = create_group(console, COMPLIANT)
    node = setup_node(console, group, tmp_path / "node")
    seq_before = 0
    step(console, group, "")
    try:
        ops = [op for op in trust_ops(node, seq_before) if op.kind == DEVICE_ROOT]
        assert ops, "the prepare step reached the group's feed"
        good = rotation.next_identity(node, ops[-1])
        assert len(good.state.device_roots) == 2
        forged = dataclasses.replace(ops[-1], trust=ops[-1].trust[:-8] + "AAAAAAAA")
        with pytest.raises(ConfigError, match="does not verify"):
            rotation.next_identity(node, forged)
    finally:
        step(console, group, "/switch")
        step(console, group, "/finish", force=True)
