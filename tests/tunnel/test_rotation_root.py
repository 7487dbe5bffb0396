"""Tests for the node's side of a Root rotation (certgate.tunnel.rotation,
config.state_from_files, the FeedFollower's trust operations) against a real console over
mTLS (this module has its own console: the rotation is instance-wide).

The follower reads every step from the feed with no gap: at prepare it trusts both Roots
(the new one vouched for by the cross certificate the old one signed) and sends the cross
certificate of its Root after its Secure Channel Root; at switch the new Root comes first
and its intermediates are the ones sent; at finish it trusts the new Root alone (still
sending the cross certificate the old Root signed, which the console offers after
finish), and its client to the console is anchored on it. What it stores is what a
restart loads, verified as at setup. A version 4 node is never sent a Root step."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from certgate.feed import ROOT, trust_kinds_of
from certgate.pki.thumbprint import thumbprint
from certgate.tunnel.config import TunnelState, load_state
from certgate.tunnel.sync import FeedFollower
from tests.support import RunningConsole
from tests.tunnel.conftest import (
    COMPLIANT,
    create_group,
    enroll_device,
    raw_batch,
    raw_snapshot,
    setup_node,
)
from tests.tunnel.test_rotation import Identities
from tests.tunnel.test_rotation_secure_channel import _ignore, drain
from tests.tunnel.test_rotation_secure_channel import step as instance_ca_step

pytestmark = pytest.mark.integration  # a real console process


def step(console: RunningConsole, group: str, path: str, **params: Any) -> dict[str, object]:
    return instance_ca_step(console, group, path, kind="root", **params)


def trust_kinds_in(token: bytes) -> set[str]:
    """The kinds of the trust operations of a signed batch (its payload, unverified)."""
    body = token.split(b".")[1]
    payload = json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
    return {op["kind"] for op in payload["entries"] if op.get("op") == "trust"}


def thumbs(state: TunnelState) -> list[str]:
    return [thumbprint(r) for r in state.roots]


def sent_after_tunnel(state_dir: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates((state_dir / "chain.pem").read_bytes())


async def report(follower: FeedFollower, name: str) -> None:
    """The node's report of what it trusts (what the reporter sends every interval)."""
    await follower.post_report(
        {
            "node": name,
            "at": 0,
            "live_total": 0,
            "live": [],
            "status": {
                "policy_version": follower.policy.version,
                "table_seq": follower.table.seq,
                "fresh": True,
                "age_s": 0.0,
                "restart_required": [],
                "roots": follower.status()["roots"],
            },
        }
    )


def test_root_steps_are_for_version_5_nodes() -> None:
    assert ROOT not in trust_kinds_of(4) and ROOT in trust_kinds_of(5)


def test_a_node_follows_prepare_switch_and_finish(
    sqlite_console: RunningConsole, tmp_path: Path
) -> None:
    group = create_group(sqlite_console, COMPLIANT)
    node = setup_node(sqlite_console, group, tmp_path / "node", "node-a")
    old_root = thumbprint(node.root)
    given = Identities()

    async def scenario() -> None:
        async with FeedFollower(node, state_dir=node.state_dir) as f:
            f.subscribe(_ignore, given)
            await f.accept_snapshot(raw_snapshot(node))

            shown = step(sqlite_console, group, "")
            new_root = shown["new"]["thumbprint"]  # type: ignore[index]
            await drain(f)
            assert f.status()["roots"] == [old_root, new_root]
            assert f.status()["identity_error"] is None, f.status()["identity_error"]
            assert thumbs(given.given[-1]) == [old_root, new_root]
            stored = load_state(node.state_dir)  # what a restart serves
            assert thumbs(stored) == [old_root, new_root]
            scr, cross = sent_after_tunnel(node.state_dir)
            assert cross.issuer == cross.subject and thumbprint(cross) not in (old_root, new_root)
            assert cross.public_key() == node.root.public_key()  # the old Root, by the new
            # A version 4 node's feed holds no Root step (it would refuse the batch).
            assert ROOT not in trust_kinds_in(raw_batch(node, 0, 4))
            assert ROOT in trust_kinds_in(raw_batch(node, 0, 5))

            step(sqlite_console, group, "/switch")
            await drain(f)
            state = f.state
            assert thumbs(state) == [new_root, old_root]
            assert f.status()["identity_error"] is None and f.status()["last_error"] is None
            scr, cross = sent_after_tunnel(node.state_dir)
            assert state.tunnel_chain == (scr, cross)
            assert thumbprint(cross) != new_root and cross.subject == state.root.subject
            assert cross.public_key() == state.root.public_key()  # the new Root, by the old
            assert scr.public_key() == node.secure_channel_root.public_key()  # same key
            assert thumbs(load_state(node.state_dir)) == [new_root, old_root]
            enroll_device(sqlite_console, group)
            await drain(f)
            assert f.status()["last_error"] is None

            await report(f, "node-a")
            finished = step(sqlite_console, group, "/finish")
            assert finished["phase"] == "finished" and finished["forced"] is False
            await drain(f)
            assert thumbs(f.state) == [new_root]
            stored = load_state(node.state_dir)
            assert thumbs(stored) == [new_root]
            # It sends root-cross still (offered after finish: a party pinning the old Root
            # alone climbs); its client to the console is anchored on the new Root alone
            # now, and the console's chain verifies there: the feed still flows.
            assert sent_after_tunnel(node.state_dir)[1] == cross
            enroll_device(sqlite_console, group)
            await drain(f)
            assert f.status()["last_error"] is None

    asyncio.run(scenario())


def test_a_node_without_its_table_after_a_whole_rotation_takes_the_new_root_from_a_snapshot(
    sqlite_console: RunningConsole, tmp_path: Path
) -> None:
    """Set up before prepare, "down" (no follower) until after finish, with no persisted
    table: it verifies the console through the offered cross certificate, and the Root
    step of the snapshot page (the new Root alone) is taken because the Root it pins
    vouches for it; its chain.pem, written under the old Root, is written again."""
    group = create_group(sqlite_console, COMPLIANT)
    node = setup_node(sqlite_console, group, tmp_path / "node", "node-b")
    new_root = step(sqlite_console, group, "")["new"]["thumbprint"]  # type: ignore[index]
    step(sqlite_console, group, "/switch")
    step(sqlite_console, group, "/finish", force="true")

    async def scenario() -> None:
        async with FeedFollower(load_state(node.state_dir), state_dir=node.state_dir) as f:
            await f.bootstrap()  # nothing persisted: a snapshot, over mTLS
            assert thumbs(f.state) == [new_root]
            assert f.status()["identity_error"] is None, f.status()["identity_error"]
            await f.poll_once(wait=0)  # its client is anchored on the new Root now
            assert f.status()["last_error"] is None

    asyncio.run(scenario())
    stored = load_state(node.state_dir)
    assert thumbs(stored) == [new_root]
    scr, cross = sent_after_tunnel(node.state_dir)
    assert scr.public_key() == node.secure_channel_root.public_key()
    assert cross.public_key() == stored.root.public_key()  # the new Root, by the old one
    cross.verify_directly_issued_by(node.root)
