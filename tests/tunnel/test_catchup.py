"""Tests for nodes that missed rotation steps (issue #11): snapshot pages of feed version 4
carry the trust operations in use at their seq, and the FeedFollower takes them before it
serves the table, against a real console over mTLS (this module has its own console: its
last test rotates the instance-wide Device Root).

A node "down" is a follower that does not poll while the console rotates; it comes back
with its persisted table (the feed then sends it to a snapshot when a batch is signed by a
console identity it does not pin) or without one (the state directory's table removed)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from certgate import jws
from certgate.console.services import ca
from certgate.console.services.groups import console_key_label, group_certificates
from certgate.errors import SignatureError
from certgate.feed import (
    CONSOLE_IDENTITY,
    DEVICE_ROOT,
    TUNNEL_IDENTITY,
    FeedError,
    RotationPhase,
    snapshot_trust,
)
from certgate.pki.thumbprint import thumbprint
from certgate.tlsconf import server_context
from certgate.tunnel.config import TunnelState, load_state
from certgate.tunnel.persist import JOURNAL_FILE, SNAPSHOT_FILE
from certgate.tunnel.sync import FeedChange, FeedFollower, Resynchronise
from tests.pki.conftest import shared_hierarchy
from tests.support import RunningConsole
from tests.tunnel.conftest import (
    COMPLIANT,
    create_group,
    enroll_device,
    setup_node,
    tunnel_client,
)
from tests.tunnel.test_rotation import Identities

pytestmark = pytest.mark.integration  # a real console process


def _ignore(_: FeedChange) -> None:
    pass


def rotate(console: RunningConsole, group: str, kind: str, path: str = "") -> dict[str, Any]:
    """One rotation step by the API (finish forced: the node under test is "down")."""
    with console.client(console.admins["root"]) as client:
        response = client.post(
            f"/api/v1/groups/{group}/rotations/{kind}{path}",
            json={"overlap_s": 0} if path == "" else None,
            params={"force": "true"} if path == "/finish" else None,
        )
    assert response.status_code in (200, 201), response.text
    shown: dict[str, Any] = response.json()
    return shown


def raw_page(state: TunnelState, version: int) -> bytes:
    with tunnel_client(state) as client:
        response = client.get(
            state.trust.feed.snapshot_path, params={"format": 2, "version": version}
        )
    assert response.status_code == 200, response.text
    return response.content


def page_trust(console: RunningConsole, group: str, state: TunnelState) -> list[tuple[str, str]]:
    """(kind, phase) of the trust operations of the group's first page, version 4."""
    with console.local() as (session, _):
        current, _ = group_certificates(session, group)
    payload = jws.verify(raw_page(state, 4), current, jws.TYP_SNAPSHOT_V2)
    return [(op.kind, op.phase.value) for op in snapshot_trust(payload["trust"], "trust", 4)]


def lose_table(state: TunnelState) -> None:
    for name in (SNAPSHOT_FILE, JOURNAL_FILE):
        (state.state_dir / name).unlink(missing_ok=True)


async def synced(state: TunnelState) -> None:
    """The node at the feed's seq now, its table persisted; then "down"."""
    async with FeedFollower(state, state_dir=state.state_dir) as f:
        await f.bootstrap()
        while await f.poll_once(wait=0) is not None:
            pass


@pytest.fixture
def group(sqlite_console: RunningConsole) -> str:
    return create_group(sqlite_console, COMPLIANT)


@pytest.fixture
def node(sqlite_console: RunningConsole, group: str, tmp_path: Path) -> TunnelState:
    state = setup_node(sqlite_console, group, tmp_path / "node")
    asyncio.run(synced(state))
    return state


def test_pages_of_version_4_carry_the_steps_in_use_and_version_3_none(
    sqlite_console: RunningConsole, group: str, node: TunnelState, tmp_path: Path
) -> None:
    console = sqlite_console
    assert page_trust(console, group, node) == []
    rotate(console, group, CONSOLE_IDENTITY)
    assert page_trust(console, group, node) == [(CONSOLE_IDENTITY, "prepare")]
    rotate(console, group, CONSOLE_IDENTITY, "/switch")
    rotate(console, group, TUNNEL_IDENTITY)
    assert page_trust(console, group, node) == [
        (CONSOLE_IDENTITY, "switch"),
        (TUNNEL_IDENTITY, "prepare"),
    ]
    rotate(console, group, CONSOLE_IDENTITY, "/finish")
    rotate(console, group, TUNNEL_IDENTITY, "/switch")
    assert page_trust(console, group, node) == [
        (CONSOLE_IDENTITY, "finish"),
        (TUNNEL_IDENTITY, "switch"),
    ]
    rotate(console, group, TUNNEL_IDENTITY, "/finish")
    fresh = setup_node(console, group, tmp_path / "fresh", "node-b")  # node-a's is retired
    assert page_trust(console, group, fresh) == [(CONSOLE_IDENTITY, "finish")]
    # A version 3 node gets the page it always got (exact keys: no trust list).
    v3 = jws.verify(raw_page(fresh, 3), fresh.console_identity, jws.TYP_SNAPSHOT_V2)
    assert v3["version"] == 3 and "trust" not in v3


def test_a_node_down_for_a_whole_console_identity_rotation_adopts_the_new_one(
    sqlite_console: RunningConsole, group: str, node: TunnelState
) -> None:
    console = sqlite_console
    new = rotate(console, group, CONSOLE_IDENTITY)["new"]["thumbprint"]
    rotate(console, group, CONSOLE_IDENTITY, "/switch")
    rotate(console, group, CONSOLE_IDENTITY, "/finish")  # the old key is gone now
    enroll_device(console, group)  # a change the new identity signs

    async def scenario() -> None:
        async with FeedFollower(load_state(node.state_dir), state_dir=node.state_dir) as f:
            f.subscribe(_ignore, Identities())
            seq = f.table.seq
            with pytest.raises(Resynchronise, match="does not pin yet"):
                await f.poll_once(wait=0)  # signed by the new identity: resynchronise
            assert f.table.seq == seq and f.status()["action_required"] is None
            await f.bootstrap()  # the snapshot, verified with it, names it
            assert f.table.seq > seq
            assert f.status()["console_identity"] == new
            assert f.status()["identity_error"] is None
            device = enroll_device(console, group)
            changes = await f.poll_once(wait=5)  # the feed signed by the new one, followed
            assert changes is not None and device.thumbprint in changes.touched

    asyncio.run(scenario())
    assert thumbprint(load_state(node.state_dir).console_identity) == new  # a restart pins it


def test_a_node_without_its_table_takes_both_identities_from_one_snapshot(
    sqlite_console: RunningConsole, group: str, node: TunnelState
) -> None:
    """A console identity finished and a tunnel identity switched while the node was down:
    each one's trust config names the other, so the node takes them together."""
    console = sqlite_console
    new_console = rotate(console, group, CONSOLE_IDENTITY)["new"]["thumbprint"]
    rotate(console, group, CONSOLE_IDENTITY, "/switch")
    rotate(console, group, CONSOLE_IDENTITY, "/finish")
    new_tunnel = rotate(console, group, TUNNEL_IDENTITY)["new"]["thumbprint"]
    rotate(console, group, TUNNEL_IDENTITY, "/switch")
    lose_table(node)
    identities = Identities()

    async def scenario() -> None:
        async with FeedFollower(load_state(node.state_dir), state_dir=node.state_dir) as f:
            f.subscribe(_ignore, identities)
            await f.bootstrap()
            assert f.status()["console_identity"] == new_console
            assert f.status()["tunnel_identity"] == new_tunnel
            assert [s.tunnel_thumbprint for s in identities.given] == [new_tunnel]
            enroll_device(console, group)
            assert await f.poll_once(wait=5) is not None  # presenting the new identity

    asyncio.run(scenario())
    stored = load_state(node.state_dir)
    assert (thumbprint(stored.console_identity), stored.tunnel_thumbprint) == (
        new_console,
        new_tunnel,
    )
    with console.client(console.admins["root"]) as client:
        shown = client.get(f"/api/v1/groups/{group}/rotations").json()
    running = next(r for r in shown if r["kind"] == TUNNEL_IDENTITY)
    assert [n["presents"] for n in running["nodes"]] == ["new"]


def test_a_node_whose_tunnel_identity_was_retired_says_what_to_run(
    sqlite_console: RunningConsole, group: str, node: TunnelState
) -> None:
    """The console never hands the new key to a retired identity: the node cannot recover
    by itself, and says what to run (status, which /healthz shows) while failing closed."""
    console = sqlite_console
    rotate(console, group, TUNNEL_IDENTITY)
    rotate(console, group, TUNNEL_IDENTITY, "/switch")
    rotate(console, group, TUNNEL_IDENTITY, "/finish")

    async def scenario() -> str | None:
        async with FeedFollower(load_state(node.state_dir), state_dir=node.state_dir) as f:
            await run_until_action_required(f)  # the first refusal comes at once
            assert f.state.tunnel_thumbprint == node.tunnel_thumbprint
            said: str | None = f.status()["action_required"]
            return said

    said = asyncio.run(scenario())
    assert said is not None and "retired by rotation" in said
    assert f"run 'certgate tunnel setup' for group {group} again" in said


def signed_by(console: RunningConsole, signer_group: str, payload: dict[str, Any]) -> str:
    """``payload`` signed by ``signer_group``'s current console identity (a real key)."""
    with console.local() as (session, pki):
        cert, _ = group_certificates(session, signer_group)
        key = pki.unseal(session, console_key_label(signer_group))
        chain = [cert, pki.certs[ca.SECURE_CHANNEL_ROOT]]
    body = {k: v for k, v in payload.items() if k not in ("iat", "exp")}
    return jws.sign(body, key, chain, jws.TYP_SNAPSHOT_V2, 600)


def test_a_console_identity_the_node_cannot_verify_is_refused_with_what_to_run(
    sqlite_console: RunningConsole, group: str, node: TunnelState
) -> None:
    console = sqlite_console
    state = load_state(node.state_dir)
    payload = jws.verify(raw_page(state, 4), state.console_identity, jws.TYP_SNAPSHOT_V2)
    stranger = create_group(console, COMPLIANT)  # another group's console identity signs
    forged = signed_by(console, stranger, payload)

    async def scenario() -> None:
        async with FeedFollower(state, state_dir=node.state_dir) as f:
            seq = f.table.seq
            with pytest.raises(SignatureError):
                await f.accept_snapshot(forged)
            assert f.table.seq == seq and f.state.console_identity == state.console_identity
            said = f.status()["action_required"]
            assert "cannot be trusted here" in said and stranger in said
            assert f"run 'certgate tunnel setup' for group {group} again" in said

    asyncio.run(scenario())


def test_a_snapshot_signed_by_a_successor_it_never_names_is_refused(
    sqlite_console: RunningConsole, group: str, node: TunnelState
) -> None:
    """The new identity is the group's, but only a trust operation that names it (checked
    as at setup) makes the node pin it: without one the page is refused."""
    console = sqlite_console
    rotate(console, group, CONSOLE_IDENTITY)
    rotate(console, group, CONSOLE_IDENTITY, "/switch")
    state = load_state(node.state_dir)
    with console.local() as (session, _):
        current, _ = group_certificates(session, group)
    payload = jws.verify(raw_page(state, 4), current, jws.TYP_SNAPSHOT_V2)
    assert [op["kind"] for op in payload["trust"]] == [CONSOLE_IDENTITY]
    unnamed = signed_by(console, group, {**payload, "trust": []})

    async def scenario() -> None:
        async with FeedFollower(state, state_dir=node.state_dir) as f:
            with pytest.raises(FeedError, match="which it never names"):
                await f.accept_snapshot(unnamed)
            assert f.state.console_identity == state.console_identity
            await f.accept_snapshot(raw_page(state, 4))  # the console's own page: taken
            assert f.state.console_identity == current

    asyncio.run(scenario())
    rotate(console, group, CONSOLE_IDENTITY, "/finish")


def test_device_roots_come_with_a_snapshot_during_and_after_the_overlap(
    sqlite_console: RunningConsole, group: str, node: TunnelState, tmp_path: Path
) -> None:
    """Last in this module: the Device Root rotation is the instance's."""
    console = sqlite_console
    old = thumbprint(node.device_root)
    new = rotate(console, group, DEVICE_ROOT)["new"]["thumbprint"]
    late = setup_node(console, group, tmp_path / "late", "node-b")  # set up mid-overlap
    assert [thumbprint(r) for r in late.device_roots] == [old, new]
    lose_table(node)

    async def resync(state: TunnelState) -> list[str]:
        async with FeedFollower(state, state_dir=state.state_dir) as f:
            f.subscribe(_ignore, Identities())
            await f.bootstrap()
            roots: list[str] = f.status()["device_roots"]
            return roots

    assert asyncio.run(resync(load_state(node.state_dir))) == [old, new]  # mid-overlap
    rotate(console, group, DEVICE_ROOT, "/switch")
    rotate(console, group, DEVICE_ROOT, "/finish")
    lose_table(node)
    assert asyncio.run(resync(load_state(node.state_dir))) == [new]
    assert [thumbprint(r) for r in load_state(node.state_dir).device_roots] == [new]
    assert page_trust(console, group, node) == [(DEVICE_ROOT, RotationPhase.FINISH.value)]


def test_a_console_chain_that_reaches_no_pinned_root_is_refused_with_what_to_run(
    node: TunnelState,
) -> None:
    """A console whose TLS chain ends at no Root the node pins (here another instance's
    hierarchy, on a real TLS listener; for real a node down for two Root rotations): the
    node takes nothing, stays stale (fails closed) and says what to run."""
    stranger = shared_hierarchy().leaves["tunnel"]
    context = server_context(stranger.chain, stranger.key)

    async def scenario() -> tuple[str | None, bool]:
        server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        elsewhere = dataclasses.replace(node, console_url=f"https://127.0.0.1:{port}")
        lose_table(node)  # nothing persisted: it must reach the console to serve anything
        async with server, FeedFollower(elsewhere, state_dir=node.state_dir) as f:
            await run_until_action_required(f)  # the first handshake fails at once
            return f.status()["action_required"], f.is_fresh()

    said, fresh = asyncio.run(scenario())
    assert said is not None and "certificate verify failed" in said
    assert thumbprint(node.root) in said
    assert f"run 'certgate tunnel setup' for group {node.group_id} again" in said
    assert not fresh


async def run_until_action_required(follower: FeedFollower) -> None:
    """Run ``follower`` until it says what to run, for at most 30 s."""
    task = asyncio.create_task(follower.run())
    try:
        for _ in range(300):
            if follower.status()["action_required"]:
                return
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
