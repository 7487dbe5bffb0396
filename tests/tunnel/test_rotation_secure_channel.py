"""Tests for the node's side of a Secure Channel Root rotation (certgate.tunnel.rotation,
config.state_from_files, the FeedFollower's trust operations) against a real console over
mTLS (this module has its own console: the rotation is instance-wide).

The follower reads every step from the feed with no gap: at prepare it trusts both roots;
at switch it takes the group identities the new root issued (their own rotations, in the
same feed) and sends the new root after its tunnel identity; at finish it trusts the new
root alone. What it stores is what a restart loads, verified as at setup."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from certgate.pki.thumbprint import thumbprint
from certgate.tunnel.config import TunnelState, load_state
from certgate.tunnel.sync import FeedChange, FeedFollower
from tests.support import RunningConsole
from tests.tunnel.conftest import COMPLIANT, create_group, enroll_device, raw_snapshot, setup_node
from tests.tunnel.test_rotation import Identities

pytestmark = pytest.mark.integration  # a real console process


def step(
    console: RunningConsole, group: str, path: str, kind: str = "secure-channel-root", **params: Any
) -> dict[str, Any]:
    """A step of an instance CA rotation (prepare: ``path`` "") through the API."""
    with console.client(console.admins["root"]) as client:
        response = client.post(
            f"/api/v1/groups/{group}/rotations/{kind}{path}",
            json={"overlap_s": 0} if path == "" else None,
            params=params,
        )
    assert response.status_code in (200, 201), response.text
    shown: dict[str, Any] = response.json()
    return shown


def _ignore(_: FeedChange) -> None:
    pass


def thumbs(state: TunnelState) -> list[str]:
    return [thumbprint(r) for r in state.secure_channel_roots]


async def drain(follower: FeedFollower) -> None:
    """Poll until the console has nothing more (a switch spans two batches: the feed up to
    a console identity's switch is signed by the old identity)."""
    for _ in range(10):  # bounded: a few batches at most
        if await follower.poll_once(wait=0) is None:
            return
    raise AssertionError("the feed did not run dry")


def test_a_node_follows_prepare_switch_and_finish(
    sqlite_console: RunningConsole, tmp_path: Path
) -> None:
    group = create_group(sqlite_console, COMPLIANT)
    node = setup_node(sqlite_console, group, tmp_path / "node", "node-a")
    old_root = thumbprint(node.secure_channel_root)
    given = Identities()

    async def scenario() -> None:
        async with FeedFollower(node, state_dir=node.state_dir) as f:
            f.subscribe(_ignore, given)
            await f.accept_snapshot(raw_snapshot(node))

            new_root = step(sqlite_console, group, "")["new"]["thumbprint"]
            await drain(f)
            assert f.status()["secure_channel_roots"] == [old_root, new_root]
            assert thumbs(given.given[-1]) == [old_root, new_root]
            stored = load_state(node.state_dir)  # what a restart serves
            assert thumbs(stored) == [old_root, new_root]
            assert thumbprint(stored.secure_channel_root) == old_root

            old_tunnel = f.state.tunnel_thumbprint
            old_console = thumbprint(f.state.console_identity)
            step(sqlite_console, group, "/switch")
            await drain(f)
            state = f.state
            assert state.tunnel_thumbprint != old_tunnel
            assert thumbprint(state.console_identity) != old_console
            assert thumbprint(state.secure_channel_root) == new_root  # sent after the new leaf
            assert thumbs(state) == [new_root, old_root]
            assert f.status()["identity_error"] is None and f.status()["last_error"] is None
            stored = load_state(node.state_dir)
            assert stored.tunnel_thumbprint == state.tunnel_thumbprint
            assert stored.tunnel_chain == state.tunnel_chain
            sent = x509.load_pem_x509_certificates((node.state_dir / "chain.pem").read_bytes())
            assert sent == list(state.tunnel_chain)  # the new root, then the Root
            enroll_device(sqlite_console, group)  # a batch the new console identity signs
            await drain(f)
            assert f.status()["last_error"] is None

            # The node presents the new identity from its next call; then nothing holds
            # the finish back but its report of the roots it trusts.
            await f.poll_once(wait=0)
            await f.post_report(
                {
                    "node": "node-a",
                    "at": 0,
                    "live_total": 0,
                    "live": [],
                    "status": {
                        "policy_version": f.policy.version,
                        "table_seq": f.table.seq,
                        "fresh": True,
                        "age_s": 0.0,
                        "restart_required": [],
                        "secure_channel_roots": f.status()["secure_channel_roots"],
                    },
                }
            )
            finished = step(sqlite_console, group, "/finish")
            assert finished["phase"] == "finished" and finished["forced"] is False
            await drain(f)
            assert thumbs(f.state) == [new_root]
            stored = load_state(node.state_dir)
            assert thumbs(stored) == [new_root]
            assert thumbprint(stored.secure_channel_root) == new_root
            enroll_device(sqlite_console, group)
            await drain(f)
            assert f.status()["last_error"] is None

    asyncio.run(scenario())
