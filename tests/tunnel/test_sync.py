"""Tests for certgate.tunnel.sync: a FeedFollower against a real console over mTLS.

Forged messages are real ones: signed by the console for another group, replayed, cut
short, signed by an unknown key, or verified with the clock past their expiry.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from certgate import jws
from certgate.errors import SignatureError
from certgate.feed import FEED_VERSION, ComplianceStatus, EnrollmentStatus, Entry, FeedError
from certgate.pki.keys import generate_key
from certgate.tunnel import snapshot
from certgate.tunnel.config import TunnelState
from certgate.tunnel.persist import TableStore
from certgate.tunnel.sync import FeedChange, FeedFollower, FeedUnavailable
from certgate.tunnel.table import SequenceGap, SequenceReplay
from tests.pki.conftest import shared_hierarchy
from tests.support import RunningConsole
from tests.tunnel.conftest import (
    COMPLIANT,
    Clock,
    Device,
    console_stopped,
    create_group,
    enroll_device,
    raw_batch,
    raw_snapshot,
    set_compliance,
    setup_node,
)
from tests.tunnel.test_snapshot import ENTRIES, cursor, page

T = TypeVar("T")
WAIT_LIMIT_S = 20.0


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Reported:
    """An ``on_change`` callback that records the changes the follower reports."""

    def __init__(self) -> None:
        self.calls: list[FeedChange] = []
        self.event = asyncio.Event()

    def __call__(self, change: FeedChange) -> None:
        self.calls.append(change)
        self.event.set()

    @property
    def summary(self) -> list[tuple[str, tuple[str, ...] | None]]:
        return [(change.cause, change.thumbprints) for change in self.calls]


def follower(
    state: TunnelState, on_change: Callable[[FeedChange], None], **options: Any
) -> FeedFollower:
    return FeedFollower(state, on_change, state_dir=state.state_dir, **options)


def in_force(entry: Entry | None) -> bool:
    """The entry as the console published it for an admissible device (the verdict itself
    is admission's; tests/tunnel/test_enforcement.py)."""
    return entry is not None and (
        entry.enrollment_status,
        entry.compliance_status,
        entry.blocked,
    ) == (EnrollmentStatus.ENROLLED, ComplianceStatus.COMPLIANT, False)


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (bounded) until ``condition`` holds; the bound is a hang guard, not a timing."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def in_thread(call: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(call, *args)


def feed_seq(console: RunningConsole, group_id: str) -> int:
    with console.client(console.admins["root"]) as client:
        seq: int = client.get(f"/api/v1/groups/{group_id}").json()["feed_seq"]
    return seq


@pytest.fixture
def group(console: RunningConsole) -> str:
    return create_group(console, COMPLIANT)


@pytest.fixture
def node(console: RunningConsole, group: str, tmp_path: Path) -> TunnelState:
    return setup_node(console, group, tmp_path / "node")


@pytest.fixture
def device(console: RunningConsole, group: str) -> Device:
    return enroll_device(console, group)


def snapshot_of(f: FeedFollower) -> tuple[int, list[dict[str, object]]]:
    return f.table.seq, sorted(f.table.to_snapshot(), key=lambda e: str(e["thumbprint"]))


def test_bootstrap_serves_the_console_snapshot(
    console: RunningConsole, node: TunnelState, device: Device
) -> None:
    async def scenario() -> None:
        async with follower(node, Reported()) as f:
            assert not f.is_fresh() and f.table.lookup(device.thumbprint) is None
            await f.bootstrap()
            entry = f.table.lookup(device.thumbprint)
            assert entry is not None and entry.device_uid == device.uid and in_force(entry)
            status = f.status()
            assert status["fresh"] is True and status["last_error"] is None
            assert status["seq"] == feed_seq(console, node.group_id) == f.table.seq
            assert status["entries"] == 1 and status["console_url"] == console.url

    run(scenario())


def test_compliance_change_is_applied_and_reported(
    console: RunningConsole, node: TunnelState, device: Device
) -> None:
    reported = Reported()

    async def scenario() -> None:
        async with follower(node, reported) as f:
            await f.bootstrap()
            set_compliance(console, device, "noncompliant")
            changes = await f.poll_once(wait=5)
            assert changes is not None and changes.touched == (device.thumbprint,)
            entry = f.table.lookup(device.thumbprint)
            assert entry is not None and entry.compliance_status is ComplianceStatus.NONCOMPLIANT
            set_compliance(console, device, "compliant")  # judged again too: admission decides
            assert await f.poll_once(wait=5) is not None
            assert reported.summary == [
                ("snapshot", None),
                ("batch", (device.thumbprint,)),
                ("batch", (device.thumbprint,)),
            ]
            assert f.is_fresh()

    run(scenario())


def test_run_follows_the_long_poll_and_sends_the_node_name(
    console: RunningConsole, node: TunnelState, device: Device
) -> None:
    reported = Reported()

    def last_seen() -> datetime:
        with console.client(console.admins["root"]) as client:
            nodes = client.get(f"/api/v1/groups/{node.group_id}/tunnel/nodes").json()
        seen = next(n["last_seen_at"] for n in nodes if n["name"] == node.node_name)
        return datetime.fromisoformat(seen)

    async def scenario() -> None:
        seen_at_setup = await in_thread(last_seen)
        async with follower(node, reported) as f:
            task = asyncio.create_task(f.run())
            await eventually(lambda: f.table.lookup(device.thumbprint) is not None)
            await in_thread(set_compliance, console, device, "noncompliant")
            await eventually(lambda: len(reported.calls) == 2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert reported.summary == [("snapshot", None), ("batch", (device.thumbprint,))]
        assert await in_thread(last_seen) > seen_at_setup  # Certgate-Node header

    run(scenario())


def test_batch_of_another_group_is_rejected(
    console: RunningConsole,
    node: TunnelState,
    device: Device,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = create_group(console, COMPLIANT)
    other_node = setup_node(console, other, tmp_path / "other")
    enroll_device(console, other)
    foreign_batch, foreign_snapshot = raw_batch(other_node, 0), raw_snapshot(other_node)

    async def scenario() -> None:
        async with follower(node, Reported()) as f:
            await f.bootstrap()
            before = snapshot_of(f)
            with pytest.raises(SignatureError, match="does not verify with the pinned"):
                await f.accept_batch(foreign_batch)
            with pytest.raises(SignatureError, match="does not verify with the pinned"):
                await f.accept_snapshot(foreign_snapshot)
            assert snapshot_of(f) == before

    caplog.set_level(logging.WARNING, "certgate.tunnel.sync")
    run(scenario())
    assert "rejected feed batch: signature does not verify" in caplog.text
    assert "rejected feed snapshot: signature does not verify" in caplog.text


def test_replayed_batch_and_older_snapshot_are_rejected(
    console: RunningConsole, node: TunnelState, device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with follower(node, Reported()) as f:
            await f.bootstrap()
            old_snapshot = raw_snapshot(node)
            set_compliance(console, device, "noncompliant")
            token = raw_batch(node, f.table.seq)
            await f.accept_batch(token)
            set_compliance(console, device, "compliant")
            await f.poll_once(wait=5)
            before = snapshot_of(f)
            with pytest.raises(SequenceReplay, match="already applied"):
                await f.accept_batch(token)
            with pytest.raises(SequenceReplay, match="behind the table"):
                await f.accept_snapshot(old_snapshot)
            assert snapshot_of(f) == before
            entry = f.table.lookup(device.thumbprint)
            assert entry is not None and in_force(entry)  # the old "noncompliant" did not return

    caplog.set_level(logging.WARNING, "certgate.tunnel.sync")
    run(scenario())
    assert "rejected feed batch" in caplog.text and "already applied" in caplog.text
    assert "rejected feed snapshot: snapshot seq" in caplog.text


def test_truncated_unknown_signer_and_expired_batches_are_rejected(
    console: RunningConsole, node: TunnelState, device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    late = Clock(time.time() + 2 * jws.CLOCK_SKEW_S + 3600)

    async def scenario() -> None:
        async with follower(node, Reported()) as f:
            await f.bootstrap()
            set_compliance(console, device, "noncompliant")
            token = raw_batch(node, f.table.seq)
            payload = jws.verify(token, node.console_identity, jws.TYP_BATCH)
            impostor = jws.sign(payload, generate_key(), [node.console_identity], jws.TYP_BATCH, 60)
            before = snapshot_of(f)
            for forged, reason in [
                (token[: len(token) // 2], "does not verify"),
                (token[:-1], "does not verify"),
                (impostor.encode(), "does not verify"),
            ]:
                with pytest.raises(SignatureError, match=reason):
                    await f.accept_batch(forged)
                assert snapshot_of(f) == before
        async with follower(node, Reported(), clock=late) as f:
            with pytest.raises(SignatureError, match="expired"):
                await f.accept_batch(token)
            assert f.table.lookup(device.thumbprint) is not None
            entry = f.table.lookup(device.thumbprint)
            assert entry is not None and in_force(entry)

    caplog.set_level(logging.WARNING, "certgate.tunnel.sync")
    run(scenario())
    assert caplog.text.count("rejected feed batch") == 4
    assert "expired" in caplog.text


def test_gap_resynchronises_from_a_snapshot(
    console: RunningConsole, group: str, node: TunnelState, device: Device
) -> None:
    reported = Reported()

    async def scenario() -> None:
        async with follower(node, reported) as f:
            await f.bootstrap()
            set_compliance(console, device, "noncompliant")
            skipped = feed_seq(console, group)
            newcomer = enroll_device(console, group)
            with pytest.raises(SequenceGap):
                await f.accept_batch(raw_batch(node, skipped))
            await f.fetch_snapshot()
            assert f.table.seq == feed_seq(console, group)
            assert f.table.lookup(newcomer.thumbprint) is not None
            # Every live tunnel is judged again after a swap (the service does the judging).
            assert reported.summary == [("snapshot", None), ("snapshot", None)]

    run(scenario())


def test_restart_with_the_console_down_serves_the_persisted_table(
    console: RunningConsole,
    group: str,
    node: TunnelState,
    device: Device,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = enroll_device(console, group)

    async def before_restart() -> tuple[int, list[dict[str, object]]]:
        async with follower(node, Reported()) as f:
            await f.bootstrap()
            set_compliance(console, other, "noncompliant")
            assert await f.poll_once(wait=5) is not None
            return snapshot_of(f)

    async def after_restart(expected: tuple[int, list[dict[str, object]]]) -> FeedFollower:
        async with follower(node, Reported()) as f:
            assert snapshot_of(f) == expected
            assert f.is_fresh()  # the last exchange time was persisted too
            with pytest.raises(httpx.ConnectError):
                await f.poll_once(wait=0)
            assert snapshot_of(f) == expected
            return f

    expected = run(before_restart())
    journal = node.state_dir / "table.journal"
    assert journal.stat().st_size > 0
    with console_stopped(console):
        revived = run(after_restart(expected))
        entry = revived.table.lookup(device.thumbprint)
        assert entry is not None and in_force(entry)
        entry = revived.table.lookup(other.thumbprint)
        assert entry is not None and not in_force(entry)
        with journal.open("ab") as handle:  # a crash in the middle of an append
            handle.write(b'0badc0de {"from_seq":9,"to_')
        caplog.set_level(logging.INFO, "certgate.tunnel")
        run(after_restart(expected))
    assert "ignoring the rest" in caplog.text and "torn journal tail ignored" in caplog.text


def test_journal_is_compacted_into_a_snapshot(
    console: RunningConsole, node: TunnelState, device: Device
) -> None:
    async def scenario() -> None:
        async with follower(node, Reported(), compact_after_bytes=1) as f:
            await f.bootstrap()
            set_compliance(console, device, "noncompliant")
            await f.poll_once(wait=5)
            info = TableStore(node.state_dir).describe()
            assert (info.snapshot_seq, info.journal_bytes) == (f.table.seq, 0)

    run(scenario())


def test_staleness_budget_fails_closed_and_recovers(
    console: RunningConsole, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    group = create_group(console, {"feed": {"long_poll_s": 1, "max_staleness_s": 10}})
    node = setup_node(console, group, tmp_path / "node")
    clock = Clock(time.time())
    caplog.set_level(logging.INFO, "certgate.tunnel.sync")

    async def follow_until(f: FeedFollower, condition: Callable[[], bool]) -> None:
        task = asyncio.create_task(f.run())
        try:
            await eventually(condition)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    async def scenario(during: Callable[[FeedFollower], Awaitable[None]]) -> None:
        async with follower(node, Reported(), clock=clock) as f:
            await during(f)

    async def outage(f: FeedFollower) -> None:
        assert f.max_staleness_s == 10 and f.is_fresh()
        clock.advance(11)
        await follow_until(f, lambda: f.status()["consecutive_failures"] >= 1)
        status = f.status()
        assert not f.is_fresh() and status["fresh"] is False and status["age_s"] >= 11
        assert "ConnectError" in status["last_error"]

    async def recovery(f: FeedFollower) -> None:
        assert not f.is_fresh()
        await follow_until(f, f.is_fresh)
        assert f.status()["last_error"] is None

    async def first(f: FeedFollower) -> None:
        await f.bootstrap()

    run(scenario(first))
    with console_stopped(console):
        run(scenario(outage))
    run(scenario(recovery))
    assert "device list is STALE" in caplog.text
    assert "device list fresh again" in caplog.text


def test_damaged_persisted_table_is_replaced_by_a_console_snapshot(
    console: RunningConsole, node: TunnelState, device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    async def sync_once() -> None:
        async with follower(node, Reported()) as f:
            await f.bootstrap()

    async def restart() -> None:
        async with follower(node, Reported()) as f:
            assert f.table.lookup(device.thumbprint) is None and not f.is_fresh()
            await f.bootstrap()
            assert f.table.lookup(device.thumbprint) is not None and f.is_fresh()

    run(sync_once())
    snapshot = node.state_dir / "table.snapshot"
    snapshot.write_bytes(snapshot.read_bytes()[:-1])
    caplog.set_level(logging.WARNING, "certgate.tunnel.sync")
    run(restart())
    assert "persisted device table unusable" in caplog.text


def test_failing_callback_does_not_stop_the_sync(
    console: RunningConsole, node: TunnelState, device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_: FeedChange) -> None:
        raise RuntimeError("data plane bug")

    async def scenario() -> None:
        async with follower(node, broken) as f:
            await f.bootstrap()
            set_compliance(console, device, "noncompliant")
            assert await f.poll_once(wait=5) is not None
            entry = f.table.lookup(device.thumbprint)
            assert entry is not None and not in_force(entry)

    run(scenario())
    assert "on_change callback failed" in caplog.text


def test_failed_journal_write_is_repaired_by_a_full_snapshot(
    console: RunningConsole,
    node: TunnelState,
    device: Device,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def disk_full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    async def scenario() -> tuple[int, list[dict[str, object]]]:
        async with follower(node, Reported()) as f:
            await f.bootstrap()
            with monkeypatch.context() as patch:
                patch.setattr(TableStore, "append_batch", disk_full)
                set_compliance(console, device, "noncompliant")
                await f.poll_once(wait=5)
            set_compliance(console, device, "compliant")
            await f.poll_once(wait=5)
            info = TableStore(node.state_dir).describe()
            assert (info.snapshot_seq, info.journal_bytes) == (f.table.seq, 0)
            return snapshot_of(f)

    expected = run(scenario())
    assert "could not persist the device table: [Errno 28]" in caplog.text
    assert snapshot_of(follower(node, Reported())) == expected


def test_paged_snapshot_is_assembled_from_every_page(
    console: RunningConsole, node: TunnelState, group: str, tmp_path: Path
) -> None:
    devices = [enroll_device(console, group) for _ in range(3)]

    async def scenario() -> None:
        paged = FeedFollower(node, Reported(), state_dir=tmp_path / "paged", snapshot_page=1)
        async with paged as f:
            await f.fetch_snapshot()
            assert len(f.table) == 3
            for device in devices:
                assert f.table.lookup(device.thumbprint) is not None
            assert f.table.seq == feed_seq(console, group)

    run(scenario())


# Format 2 pages signed by a console identity the test holds: the content checks behind
# the signature (cursor chain, seq, bounds), served by a stand-in console.


class PageServer:
    """A stand-in console answering snapshot requests with the given signed pages."""

    def __init__(self, pages: list[bytes]) -> None:
        self.pages = pages
        self.asked: list[dict[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.asked.append(dict(request.url.params))
        return httpx.Response(200, content=self.pages[len(self.asked) - 1])


def signed_pages(
    node: TunnelState, leaf: Any, pages: list[tuple[int, list[dict[str, Any]]]]
) -> list[bytes]:
    """(seq, entries) pages signed by ``leaf``, chained by cursor as a console does."""
    tokens, after = [], ""
    for number, (seq, entries) in enumerate(pages):
        following = cursor(entries[-1]) if number + 1 < len(pages) else None
        body = page(entries, after, following, seq) | {"group_id": node.group_id}
        del body["iat"], body["exp"]
        tokens.append(jws.sign(body, leaf.key, leaf.chain, jws.TYP_SNAPSHOT_V2, 60).encode())
        after = following or ""
    return tokens


def stand_in(node: TunnelState, tmp_path: Path, server: PageServer, **options: Any) -> FeedFollower:
    leaf = shared_hierarchy().leaves["console"]
    trusting = dataclasses.replace(node, console_identity=leaf.cert)
    transport = httpx.MockTransport(server)
    return FeedFollower(
        trusting, Reported(), state_dir=tmp_path / "stand-in", transport=transport, **options
    )


def test_paged_snapshot_asks_for_format_2_and_follows_the_cursors(
    node: TunnelState, tmp_path: Path
) -> None:
    leaf = shared_hierarchy().leaves["console"]
    server = PageServer(signed_pages(node, leaf, [(5, ENTRIES[:4]), (6, ENTRIES[4:])]))

    async def scenario() -> None:
        async with stand_in(node, tmp_path, server, snapshot_page=8) as f:
            await f.fetch_snapshot()
            assert (f.table.seq, len(f.table)) == (5, len(ENTRIES)) and f.is_fresh()

    run(scenario())
    assert server.asked == [
        {"format": "2", "limit": "8", "version": str(FEED_VERSION)},
        {"format": "2", "limit": "8", "version": str(FEED_VERSION), "after": cursor(ENTRIES[3])},
    ]


@pytest.mark.parametrize(
    ("pages", "limit", "reason"),
    [
        ([(5, ENTRIES[:4]), (4, ENTRIES[4:])], 8, "snapshot page of seq 4 follows one of seq 5"),
        ([(5, ENTRIES[:9])], 8, "snapshot page holds 9 entries; asked for at most 8"),
        # the second page, chained after ENTRIES[5], restarts from the first entry
        ([(5, ENTRIES[4:6]), (5, ENTRIES[:4])], 8, "entries[0] is not after the page's cursor"),
    ],
)
def test_a_signed_page_that_breaks_the_paging_rules_is_rejected(
    node: TunnelState,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    pages: list[tuple[int, list[dict[str, Any]]]],
    limit: int,
    reason: str,
) -> None:
    leaf = shared_hierarchy().leaves["console"]
    tokens = signed_pages(node, leaf, pages)

    async def scenario() -> None:
        async with stand_in(node, tmp_path, PageServer(tokens), snapshot_page=limit) as f:
            with pytest.raises(FeedError, match=re.escape(reason)):
                await f.fetch_snapshot()
            assert (f.table.seq, len(f.table), f.is_fresh()) == (0, 0, False)

    caplog.set_level(logging.WARNING, "certgate.tunnel.sync")
    run(scenario())
    assert f"rejected feed snapshot: {reason}" in caplog.text


def test_an_oversized_page_is_refused_before_it_is_parsed(
    node: TunnelState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    leaf = shared_hierarchy().leaves["console"]
    tokens = signed_pages(node, leaf, [(5, ENTRIES)])
    monkeypatch.setattr(snapshot, "max_token_bytes", lambda limit: len(tokens[0]) - 1)

    async def scenario() -> None:
        async with stand_in(node, tmp_path, PageServer(tokens)) as f:
            with pytest.raises(FeedUnavailable, match=f"exceeds {len(tokens[0]) - 1} bytes"):
                await f.fetch_snapshot()
            assert len(f.table) == 0

    run(scenario())


def test_a_tampered_snapshot_page_is_rejected(
    console: RunningConsole, node: TunnelState, device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    token = raw_snapshot(node)
    header, payload, signature = token.split(b".")
    body = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    body["entries"]["attributes"]["values"][0][3] = "compliant"  # what a forger would change
    body["entries"]["attributes"]["values"][0][4] = False
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=")

    async def scenario() -> None:
        async with follower(node, Reported()) as f:
            with pytest.raises(SignatureError, match="does not verify with the pinned"):
                await f.accept_snapshot(b".".join([header, forged, signature]))
            assert len(f.table) == 0
            await f.accept_snapshot(token)
            assert f.table.lookup(device.thumbprint) is not None

    caplog.set_level(logging.WARNING, "certgate.tunnel.sync")
    run(scenario())
    assert "rejected feed snapshot: signature does not verify" in caplog.text
