"""Tests for the node's side of a tunnel-identity rotation (certgate.tunnel.rotation and
FeedFollower's trust operations), against a real console over mTLS.

The trust operations are the console's own, from real signed batches; tampered ones are
those operations with one field replaced (the checks run on the operation, after the
batch signature)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from certgate import jws
from certgate.errors import ConfigError, SignatureError
from certgate.feed import RotationPhase, TrustUpdate, decode_op
from certgate.pki.thumbprint import thumbprint
from certgate.tunnel import rotation
from certgate.tunnel.config import TunnelState, load_state
from certgate.tunnel.service import renewal_warnings
from certgate.tunnel.sync import FeedChange, FeedFollower
from tests.support import RunningConsole
from tests.tunnel.conftest import (
    COMPLIANT,
    create_group,
    enroll_device,
    raw_batch,
    raw_snapshot,
    setup_node,
)

pytestmark = pytest.mark.integration  # a real console process


@pytest.fixture
def group(sqlite_console: RunningConsole) -> str:
    return create_group(sqlite_console, COMPLIANT)


@pytest.fixture
def node(sqlite_console: RunningConsole, group: str, tmp_path: Path) -> TunnelState:
    return setup_node(sqlite_console, group, tmp_path / "node")


def step(console: RunningConsole, group: str, path: str, **body: Any) -> dict[str, Any]:
    with console.client(console.admins["root"]) as client:
        response = client.post(
            f"/api/v1/groups/{group}/rotations/tunnel-identity{path}", json=body or None
        )
    assert response.status_code in (200, 201), response.text
    shown: dict[str, Any] = response.json()
    return shown


def trust_ops(state: TunnelState, after: int) -> list[TrustUpdate]:
    """The trust operations of the console's signed batch after ``after`` (version 3)."""
    payload = jws.verify(raw_batch(state, after, 3), state.console_identity, jws.TYP_BATCH)
    ops = [decode_op(e, "op", 3) for e in payload["entries"] if e["op"] == "trust"]
    return [op for op in ops if isinstance(op, TrustUpdate)]


class Identities:
    """An ``on_identity`` callback recording the states it was given (or refusing them)."""

    def __init__(self, refuse: bool = False) -> None:
        self.given: list[TunnelState] = []
        self.refuse = refuse

    def __call__(self, state: TunnelState) -> None:
        if self.refuse:
            raise ConfigError("the data plane refused the new context")
        self.given.append(state)


def _ignore(_: FeedChange) -> None:
    pass


@pytest.fixture
def files_before(node: TunnelState) -> Iterator[dict[str, bytes]]:
    yield {p.name: p.read_bytes() for p in node.state_dir.iterdir() if p.is_file()}


def test_prepare_is_held_switch_is_used_and_stored_finish_is_a_no_op(
    sqlite_console: RunningConsole, group: str, node: TunnelState
) -> None:
    identities = Identities()
    old = node.tunnel_thumbprint

    async def scenario() -> None:
        async with FeedFollower(node, state_dir=node.state_dir) as f:
            f.subscribe(_ignore, identities)
            await f.accept_snapshot(raw_snapshot(node))
            new = step(sqlite_console, group, "", overlap_s=0)["new"]["thumbprint"]
            await f.poll_once(wait=5)
            assert f.status()["next_tunnel_identity"] == new
            assert (f.state.tunnel_thumbprint, identities.given) == (old, [])
            assert load_state(node.state_dir).tunnel_thumbprint == old

            step(sqlite_console, group, "/switch")
            await f.poll_once(wait=5)
            assert [s.tunnel_thumbprint for s in identities.given] == [new]
            assert f.state.tunnel_thumbprint == new and f.status()["tunnel_identity"] == new
            stored = load_state(node.state_dir)  # what a restart serves, verified as at setup
            assert stored.tunnel_thumbprint == new and stored.tunnel_key is not None
            assert stored.trust.issued_at >= node.trust.issued_at

            # The next call presents the new identity: the console accepts it, and then
            # sees no node on the old one.
            await f.poll_once(wait=0)
            finished = step(sqlite_console, group, "/finish")
            assert finished["phase"] == "finished"
            await f.poll_once(wait=5)  # the finish step: nothing left to do
            assert len(identities.given) == 1 and f.status()["identity_error"] is None

    asyncio.run(scenario())


def test_a_refused_identity_keeps_the_one_in_use(
    sqlite_console: RunningConsole,
    group: str,
    node: TunnelState,
    files_before: dict[str, bytes],
) -> None:
    async def scenario() -> None:
        async with FeedFollower(node, state_dir=node.state_dir) as f:
            f.subscribe(_ignore, Identities(refuse=True))
            await f.accept_snapshot(raw_snapshot(node))
            step(sqlite_console, group, "")
            step(sqlite_console, group, "/switch")
            seq = f.table.seq
            await f.poll_once(wait=5)
            assert f.table.seq > seq  # the batch applied; only the identity was refused
            assert f.state.tunnel_thumbprint == node.tunnel_thumbprint
            assert "the data plane refused" in str(f.status()["identity_error"])
        for name in ("tunnel.pem", "tunnel.key", "trust.jws"):
            assert (node.state_dir / name).read_bytes() == files_before[name]

    asyncio.run(scenario())


def test_a_version_2_node_never_receives_a_trust_operation(
    sqlite_console: RunningConsole, group: str, node: TunnelState
) -> None:
    step(sqlite_console, group, "")
    payload = jws.verify(raw_batch(node, 0, 2), node.console_identity, jws.TYP_BATCH)
    assert payload["version"] == 2
    # The seq moves on (the node stays gapless), without the operation it cannot read.
    assert payload["to_seq"] >= 1 and all(e["op"] != "trust" for e in payload["entries"])
    assert trust_ops(node, 0)  # the same feed, read at version 3, has it


@pytest.fixture
def switch_op(sqlite_console: RunningConsole, group: str, node: TunnelState) -> TrustUpdate:
    step(sqlite_console, group, "")
    step(sqlite_console, group, "/switch")
    ops = trust_ops(node, 0)
    assert [op.phase for op in ops] == [RotationPhase.PREPARE, RotationPhase.SWITCH]
    return ops[-1]


def test_next_identity_checks_the_pair_as_setup_does(
    node: TunnelState, switch_op: TrustUpdate
) -> None:
    identity = rotation.next_identity(node, switch_op)
    assert identity.thumbprint("tunnel-identity") != node.tunnel_thumbprint
    assert identity.state.group_id == node.group_id
    assert "tunnel.key" not in repr(identity)  # the files (with the key) are never shown
    assert not rotation.is_current(node, switch_op)
    assert rotation.is_current(identity.state, switch_op)


def test_a_key_sealed_for_another_certificate_does_not_open(
    node: TunnelState, switch_op: TrustUpdate
) -> None:
    other = dataclasses.replace(switch_op, certificate=(node.state_dir / "tunnel.pem").read_text())
    with pytest.raises(ConfigError, match="does not open"):
        rotation.next_identity(node, other)


def test_a_trust_config_naming_another_identity_is_refused(
    node: TunnelState, switch_op: TrustUpdate
) -> None:
    stale = dataclasses.replace(switch_op, trust=(node.state_dir / "trust.jws").read_text())
    with pytest.raises(ConfigError, match="does not verify: trust config names a different tunnel"):
        rotation.next_identity(node, stale)


def test_another_groups_node_cannot_open_the_key(
    sqlite_console: RunningConsole, switch_op: TrustUpdate, tmp_path: Path
) -> None:
    stranger = setup_node(sqlite_console, create_group(sqlite_console, COMPLIANT), tmp_path / "x")
    with pytest.raises(ConfigError, match="does not open"):
        rotation.next_identity(stranger, switch_op)


def console_step(console: RunningConsole, group: str, path: str, **body: Any) -> dict[str, Any]:
    with console.client(console.admins["root"]) as client:
        response = client.post(
            f"/api/v1/groups/{group}/rotations/console-identity{path}", json=body or None
        )
    assert response.status_code in (200, 201), response.text
    shown: dict[str, Any] = response.json()
    return shown


def test_console_identity_announced_then_pinned_at_switch(
    sqlite_console: RunningConsole, group: str, node: TunnelState
) -> None:
    old = thumbprint(node.console_identity)

    async def scenario() -> None:
        async with FeedFollower(node, state_dir=node.state_dir) as f:
            f.subscribe(_ignore, Identities())
            await f.accept_snapshot(raw_snapshot(node))
            new = console_step(sqlite_console, group, "", overlap_s=0)["new"]["thumbprint"]
            await f.poll_once(wait=5)
            assert f.status()["next_console_identity"] == new
            assert f.status()["console_identity"] == old
            console_step(sqlite_console, group, "/switch")
            seq = f.table.seq
            await f.poll_once(wait=5)  # the switch step, signed by the old identity
            assert f.table.seq > seq
            assert f.status()["console_identity"] == new
            assert thumbprint(load_state(node.state_dir).console_identity) == new
            enroll_device(sqlite_console, group)  # a batch the new identity signs
            assert await f.poll_once(wait=5) is not None
            assert f.status()["last_error"] is None

    asyncio.run(scenario())


def test_the_feed_up_to_the_switch_stays_signed_by_the_old_identity(
    sqlite_console: RunningConsole, group: str, node: TunnelState
) -> None:
    console_step(sqlite_console, group, "")
    console_step(sqlite_console, group, "/switch")
    enroll_device(sqlite_console, group)
    before = jws.verify(raw_batch(node, 0, 3), node.console_identity, jws.TYP_BATCH)
    ops = [decode_op(e, "op", 3) for e in before["entries"]]
    switch = [op for op in ops if isinstance(op, TrustUpdate)][-1]
    assert switch.phase is RotationPhase.SWITCH  # the batch ends with the switch step
    assert before["entries"][-1]["op"] == "trust"
    after = raw_batch(node, before["to_seq"], 3)
    with pytest.raises(SignatureError):  # signed by the new identity only
        jws.verify(after, node.console_identity, jws.TYP_BATCH)
    announced = rotation.next_identity(node, switch).state.console_identity
    assert jws.verify(after, announced, jws.TYP_BATCH)["entries"]


def test_a_console_identity_whose_trust_config_it_did_not_sign_is_refused(
    sqlite_console: RunningConsole, group: str, node: TunnelState
) -> None:
    console_step(sqlite_console, group, "")
    (prepare,) = trust_ops(node, 0)
    forged = dataclasses.replace(prepare, trust=(node.state_dir / "trust.jws").read_text())
    with pytest.raises(ConfigError, match="does not verify"):
        rotation.next_identity(node, forged)


def test_certificates_in_use_and_their_renewal_window(node: TunnelState) -> None:
    now = time.time()
    fresh = {c.name: c for c in rotation.certificates_in_use(node, now)}
    assert set(fresh) == {
        "tunnel-identity",
        "console-identity",
        "device-root",
        "secure-channel-root",
        "root",
    }
    assert not any(c.renewal_due for c in fresh.values())
    end = fresh["tunnel-identity"].not_after
    late = {c.name: c for c in rotation.certificates_in_use(node, end - 10 * 86400)}
    assert late["tunnel-identity"].renewal_due
    warnings = renewal_warnings({"certificates": [c.to_dict() for c in late.values()]})
    assert "tunnel-identity expires in 10 days: rotate it" in warnings[0]
    assert renewal_warnings({"certificates": [c.to_dict() for c in fresh.values()]}) == []
