"""certgate.tunnel.sync across feed contract versions, against a real console over mTLS.

A node of the previous version (``FeedFollower(feed_version=1)``: it omits ``?version``,
as nodes did before versions existed) keeps following a console that speaks version 2:
it gets no ``policy`` operations, the seqs they took stay as gaps inside batches
(docs/CONVENTIONS.md, "Feed contract versions"), and the device changes still apply. A node
given a newer version than its own rejects the message with the documented reason, logged,
and keeps its table.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from certgate.feed import FEED_VERSION, MIN_FEED_VERSION, FeedError
from certgate.pki import identity
from certgate.tunnel import admission
from certgate.tunnel.config import TunnelState
from certgate.tunnel.sync import FeedFollower
from tests.support import RunningConsole
from tests.tunnel.conftest import (
    COMPLIANT,
    Device,
    create_group,
    enroll_device,
    raw_batch,
    set_compliance,
    setup_node,
    tunnel_client,
)

NEW_RULES = {"default": "deny", "rules": [{"action": "allow", "cidrs": ["10.0.0.0/8"]}]}
NEWER = f"feed version 2 is newer than this node's {MIN_FEED_VERSION}: upgrade the node"


@pytest.fixture
def group(sqlite_console: RunningConsole) -> str:
    return create_group(sqlite_console, COMPLIANT)


@pytest.fixture
def node(sqlite_console: RunningConsole, group: str, tmp_path: Path) -> TunnelState:
    return setup_node(sqlite_console, group, tmp_path / "old-node")


@pytest.fixture
def device(sqlite_console: RunningConsole, group: str) -> Device:
    return enroll_device(sqlite_console, group)


def old_node(state: TunnelState) -> FeedFollower:
    return FeedFollower(state, state_dir=state.state_dir, feed_version=MIN_FEED_VERSION)


def payload(token: bytes) -> dict[str, Any]:
    """A signed message's payload, read without verifying (the follower verifies)."""
    body = token.split(b".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
    return decoded


def patch_server_rules(console: RunningConsole, group: str, rules: dict[str, Any]) -> None:
    with console.client(console.admins["root"]) as admin:
        admin.patch(
            f"/api/v1/groups/{group}/settings", json={"server_rules": rules}
        ).raise_for_status()


def batch_of_version(state: TunnelState, after: int, version: int) -> bytes:
    with tunnel_client(state) as client:
        response = client.get(
            state.trust.feed.feed_path, params={"after": after, "wait": 0, "version": version}
        )
    assert response.status_code == 200, response.text
    return response.content


def refuses(follower: FeedFollower, device: Device) -> admission.DenyReason | None:
    """What admission says of the device's Per-App Tunnel certificate with the follower's
    table and freshness (None: admitted)."""
    leaf = admission.PeerIdentity(
        device.thumbprint, identity.device(device.uid, follower.state.group_id), time.time() + 3600
    )
    decision = admission.admit(
        leaf,
        follower.table.lookup(device.thumbprint),
        admission.Mode.PER_APP,
        admission.AdmissionRequest(follower.is_fresh(), app_bundle_id="com.example.mail"),
        time.time(),
        follower.state.group_id,
    )
    return decision.reason


def test_a_version_1_node_applies_a_compliance_change_after_a_policy_change(
    sqlite_console: RunningConsole, node: TunnelState, device: Device
) -> None:
    async def scenario() -> None:
        async with old_node(node) as follower:
            await follower.bootstrap()
            assert follower.table.policy is None  # a version 1 page carries none
            assert refuses(follower, device) is None
            before = follower.table.seq
            await asyncio.to_thread(patch_server_rules, sqlite_console, node.group_id, NEW_RULES)
            await asyncio.to_thread(set_compliance, sqlite_console, device, "noncompliant")
            as_old = payload(await asyncio.to_thread(raw_batch, node, before))
            as_new = payload(await asyncio.to_thread(batch_of_version, node, before, 2))
            while follower.table.seq < as_old["to_seq"]:
                assert await follower.poll_once(wait=5) is not None
            assert follower.table.policy is None and follower.status()["feed_version"] == 1
            assert refuses(follower, device) is admission.DenyReason.NONCOMPLIANT
        # The same seqs, without the policy operation: a gap inside the batch.
        assert "version" not in as_old and as_new["version"] == 2
        assert (as_old["from_seq"], as_old["to_seq"]) == (as_new["from_seq"], as_new["to_seq"])
        assert [e["op"] for e in as_new["entries"]] == ["policy", "upsert"]
        assert [e["op"] for e in as_old["entries"]] == ["upsert"]
        assert len(as_old["entries"]) < as_old["to_seq"] - as_old["from_seq"] + 1

    asyncio.run(scenario())


def test_a_version_1_node_rejects_a_newer_message_and_keeps_its_table(
    sqlite_console: RunningConsole,
    node: TunnelState,
    device: Device,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A console that answers a newer version than asked (a fault a real console does not
    make: the test asks the console for version 2 itself and hands the answer over)."""

    async def scenario() -> None:
        async with old_node(node) as follower:
            await follower.bootstrap()
            kept = follower.table.seq, list(follower.table.to_snapshot())
            await asyncio.to_thread(set_compliance, sqlite_console, device, "noncompliant")
            newer = await asyncio.to_thread(batch_of_version, node, kept[0], 2)
            with caplog.at_level(logging.WARNING), pytest.raises(FeedError, match=NEWER):
                await follower.accept_batch(newer)
            assert (follower.table.seq, list(follower.table.to_snapshot())) == kept
            assert refuses(follower, device) is None  # the change is not half-read
        assert f"rejected feed batch: {NEWER}; keeping seq {kept[0]}" in caplog.text

    asyncio.run(scenario())


def test_a_snapshot_page_of_a_newer_version_is_rejected_too(
    node: TunnelState, caplog: pytest.LogCaptureFixture
) -> None:
    with tunnel_client(node) as client:
        response = client.get(node.trust.feed.snapshot_path, params={"format": 2, "version": 2})
    assert response.status_code == 200, response.text

    async def scenario() -> None:
        async with old_node(node) as follower:
            with caplog.at_level(logging.WARNING), pytest.raises(FeedError, match=NEWER):
                await follower.accept_snapshot(response.content)
            assert follower.table.seq == 0 and len(follower.table) == 0

    asyncio.run(scenario())
    assert f"rejected feed snapshot: {NEWER}" in caplog.text


def test_a_node_cannot_be_pinned_to_a_version_it_does_not_speak(node: TunnelState) -> None:
    for version in (MIN_FEED_VERSION - 1, FEED_VERSION + 1):
        with pytest.raises(ValueError, match=f"feed version {version} is not one"):
            FeedFollower(node, state_dir=node.state_dir, feed_version=version)
