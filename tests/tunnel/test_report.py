"""Tests for certgate.tunnel.report: a node reports its live tunnels to a real console.

The scenario runs a real node in this process (``runner.build``: the follower over mTLS,
the data plane on loopback) with a real Per-App Tunnel open through it: the report lands
in the console, a dry-run names the tunnel, and the real change then closes exactly it.
Failures and bounds use a stand-in console (``FeedFollower(transport=...)``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from sqlalchemy import select

from certgate.console.store.models import DenialCount, TunnelNode
from certgate.pki.keys import PrivateKey
from certgate.tlsconf import client_context
from certgate.tunnel import report
from certgate.tunnel.config import TunnelState
from certgate.tunnel.metrics import denial_totals
from certgate.tunnel.report import Reporter, bounded
from certgate.tunnel.runner import RunOptions, build
from certgate.tunnel.service import Endpoint, TunnelService
from certgate.tunnel.sync import FeedFollower
from tests.console.ui.support import sign_in, web_admin
from tests.support import RunningConsole, make_csr
from tests.tunnel.conftest import create_group, setup_node

APP = "com.example.mail"
LOCAL_RULES = {"default": "deny", "rules": [{"action": "allow", "cidrs": ["127.0.0.0/8"]}]}


def live(n: int) -> list[dict[str, Any]]:
    return [
        {
            "thumbprint": f"{i:064x}",
            "device_uid": "d" * 32,
            "mode": "per_app",
            "app": APP,
            "host": "intranet.test",
            "port": 443,
            "addresses": ["10.1.2.3"],
            "since": 1.0,
        }
        for i in range(n)
    ]


class Observed:
    """A stand-in service: fixed live tunnels and a healthy status."""

    def __init__(self, tunnels: list[dict[str, Any]]) -> None:
        self.tunnels = tunnels

    def live_tunnels(self) -> list[dict[str, Any]]:
        return self.tunnels

    def health(self) -> tuple[int, dict[str, Any]]:
        status = {"status": "ok", "policy_version": 3, "table_seq": 9, "restart_required": []}
        sync = {
            "age_s": 1.5,
            "device_roots": ["ab" * 32],
            "secure_channel_roots": ["cd" * 32],
            "roots": ["ef" * 32],
        }
        return 200, {**status, "sync": sync}


def stand_in(
    state: TunnelState, tmp_path: Path, answer: Callable[[httpx.Request], httpx.Response]
) -> FeedFollower:
    transport = httpx.MockTransport(answer)
    return FeedFollower(state, state_dir=tmp_path / "stand-in", transport=transport)


@pytest.fixture(scope="module")
def node_state(sqlite_console: RunningConsole, tmp_path_factory: pytest.TempPathFactory) -> Any:
    settings = {"initial_compliance": "compliant", "server_rules": LOCAL_RULES}
    group = create_group(sqlite_console, settings)
    state = setup_node(sqlite_console, group, tmp_path_factory.mktemp("node"), "node-a")
    return group, state


# Bounds and failures


def test_bounded_cuts_by_count_and_by_size() -> None:
    assert len(bounded(live(50), max_tunnels=20)) == 20
    kept = bounded(live(1000), max_bytes=20_000)
    assert 0 < len(kept) < 1000 and len(json.dumps(kept, separators=(",", ":"))) <= 20_000
    assert kept == live(1000)[: len(kept)]
    assert bounded([], max_bytes=10) == []


def test_the_body_says_when_the_list_was_cut(node_state: Any, tmp_path: Path) -> None:
    _, state = node_state
    seen: list[httpx.Request] = []
    follower = stand_in(state, tmp_path, lambda r: seen.append(r) or httpx.Response(204))
    reporter = Reporter("node-a", Observed(live(report.MAX_REPORT_TUNNELS + 5)), follower)
    body = reporter.body()
    assert body["live_total"] == report.MAX_REPORT_TUNNELS + 5
    assert len(body["live"]) < body["live_total"]
    assert body["status"] == {
        "policy_version": 3,
        "table_seq": 9,
        "fresh": True,
        "age_s": 1.5,
        "restart_required": [],
        "device_roots": ["ab" * 32],
        "secure_channel_roots": ["cd" * 32],
        "roots": ["ef" * 32],
    }
    assert asyncio.run(reporter.report_once())
    assert len(seen[0].content) <= report.MAX_REPORT_BYTES + 1000  # the list, plus status


def test_failures_never_raise_and_are_logged_once_a_minute(
    node_state: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, state = node_state
    follower = stand_in(state, tmp_path, lambda r: httpx.Response(503, text="down"))
    reporter = Reporter("node-a", Observed(live(1)), follower)
    caplog.set_level(logging.DEBUG, logger="certgate.tunnel.report")

    async def three() -> list[bool]:
        return [await reporter.report_once() for _ in range(3)]

    assert asyncio.run(three()) == [False, False, False]
    levels = [r.levelno for r in caplog.records if "report to the console failed" in r.message]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "503" in caplog.records[0].message and reporter.failures == 3


def test_the_loop_reports_every_interval_until_cancelled(node_state: Any, tmp_path: Path) -> None:
    _, state = node_state
    seen: list[httpx.Request] = []
    follower = stand_in(state, tmp_path, lambda r: seen.append(r) or httpx.Response(204))
    reporter = Reporter("node-a", Observed([]), follower, interval=0.01)

    async def scenario() -> None:
        task = asyncio.get_running_loop().create_task(reporter.run())
        while len(seen) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert {r.url.path for r in seen} == {"/api/v1/tunnel/report"}
    assert {r.headers["certgate-node"] for r in seen} == {state.node_name}


# A real node, a real tunnel, a real console


def enroll_with_key(console: RunningConsole, group: str) -> tuple[str, x509.Certificate, Any]:
    """A device of ``group`` with its Per-App Tunnel certificate and private key."""
    user, password = f"u{secrets.token_hex(4)}", secrets.token_urlsafe(12)
    with console.client(console.admins["root"]) as admin:
        body = {"username": user, "password": password}
        made = admin.post(f"/api/v1/groups/{group}/enrollment-users", json=body)
        assert made.status_code == 201, made.text
    with console.client() as client:
        body = {"username": user, "password": password, "platform": "ios", "name": user}
        enrolled = client.post("/api/v1/enroll", json=body)
    assert enrolled.status_code == 201, enrolled.text
    csr, key = make_csr()
    with console.client(api_key=enrolled.json()["credential"]) as device:
        profile = device.post("/api/v1/device/profile", json={"csr": csr.decode()})
    assert profile.status_code == 201, profile.text
    cert = x509.load_pem_x509_certificate(profile.json()["certificate"].encode())
    return enrolled.json()["device_uid"], cert, key


@asynccontextmanager
async def running_node(state: TunnelState) -> AsyncIterator[tuple[TunnelService, FeedFollower]]:
    anywhere = Endpoint("127.0.0.1", 0)
    options = RunOptions(state.state_dir, proxy=anywhere, per_app=anywhere, admin=None)
    service, follower = build(state, options)
    await follower.bootstrap()
    await service.start()
    try:
        yield service, follower
    finally:
        await service.stop(drain_s=0)
        await follower.aclose()


async def open_tunnel(
    state: TunnelState, port: int, cert: x509.Certificate, key: PrivateKey, origin: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    tls = client_context([state.root], chain=[cert], key=key)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname="localhost"
    )
    writer.write(
        f"CONNECT 127.0.0.1:{origin} HTTP/1.1\r\nHost: 127.0.0.1:{origin}\r\n"
        f"Certgate-App: {APP}\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An origin that keeps the connection until the tunnel ends it."""
    await reader.read()
    writer.close()


async def ended(reader: asyncio.StreamReader) -> bool:
    """The tunnel was cut: a reset (or, had it raced, an end of stream)."""
    try:
        return await reader.read(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


def stored_report(console: RunningConsole, group: str) -> dict[str, Any]:
    with console.local() as (session, _):
        node = session.execute(
            select(TunnelNode).where(TunnelNode.group_id == group, TunnelNode.name == "node-a")
        ).scalar_one()
        assert node.report is not None and node.reported_at is not None
        return node.report


def put_compliance(console: RunningConsole, uid: str, dry_run: bool) -> httpx.Response:
    with console.client(console.admins["root"]) as admin:
        return admin.put(
            f"/api/v1/devices/{uid}/compliance",
            params={"dry_run": "true"} if dry_run else None,
            json={"status": "noncompliant"},
        )


def test_a_reported_tunnel_is_named_by_a_dry_run_and_closed_by_the_change(
    sqlite_console: RunningConsole, node_state: Any
) -> None:
    group, state = node_state
    uid, cert, key = enroll_with_key(sqlite_console, group)

    async def scenario() -> None:
        origin = await asyncio.start_server(hold, "127.0.0.1", 0)
        origin_port = origin.sockets[0].getsockname()[1]
        async with running_node(state) as (service, follower):
            port = service.bound["per_app"]
            reader, writer = await open_tunnel(state, port, cert, key, origin_port)
            assert await Reporter(state.node_name, service, follower).report_once()
            [reported] = stored_report(sqlite_console, group)["live"]
            assert reported["device_uid"] == uid and reported["port"] == origin_port
            assert reported["addresses"] == ["127.0.0.1"] and reported["app"] == APP
            dry = await asyncio.to_thread(put_compliance, sqlite_console, uid, True)
            assert dry.status_code == 200, dry.text
            [named] = dry.json()["live_tunnels"]
            assert (named["node"], named["device_uid"]) == ("node-a", uid)
            assert named["destination"] == f"127.0.0.1:{origin_port}"
            assert named["reason"] == "noncompliant"
            assert service.live_tunnels() != []  # the dry-run changed nothing
            real = await asyncio.to_thread(put_compliance, sqlite_console, uid, False)
            assert real.status_code == 200, real.text
            await follower.poll_once(wait=5)
            assert service.live_tunnels() == []
            assert await ended(reader)
            writer.close()
        origin.close()
        await origin.wait_closed()

    asyncio.run(asyncio.wait_for(scenario(), 60))


async def refused_connect(state: TunnelState, port: int, cert: x509.Certificate, key: Any) -> bytes:
    """A CONNECT the group's server rules deny (10.0.0.0/8 is not allowed); the status line."""
    tls = client_context([state.root], chain=[cert], key=key)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname="localhost"
    )
    writer.write(
        b"CONNECT 10.9.9.9:443 HTTP/1.1\r\nHost: 10.9.9.9:443\r\n"
        + f"Certgate-App: {APP}\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return head.split(b"\r\n")[0]


def test_denials_by_reason_reach_the_console_as_a_time_series(
    sqlite_console: RunningConsole, node_state: Any
) -> None:
    """Totals since start in each report; the console stores the differences (a second
    report without new denials adds nothing) and the dashboard charts them."""
    group, state = node_state
    _, cert, key = enroll_with_key(sqlite_console, group)

    async def scenario() -> dict[str, int]:
        async with running_node(state) as (service, follower):
            reporter = Reporter(
                state.node_name,
                service,
                follower,
                denials=lambda: denial_totals(service.metrics.registry),
            )
            await follower.poll_once(wait=1)  # the device enrolled after the node's snapshot
            for _ in range(2):
                status = await refused_connect(state, service.bound["per_app"], cert, key)
                assert not status.startswith(b"HTTP/1.1 200"), status
            assert await reporter.report_once()
            assert await reporter.report_once()  # the same totals: nothing new
            return denial_totals(service.metrics.registry)

    totals = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert totals == {"destination_denied": 2}
    assert stored_report(sqlite_console, group)["denials"] == totals
    with sqlite_console.local() as (session, _):
        rows = session.execute(select(DenialCount).where(DenialCount.group_id == group)).scalars()
        stored = {row.reason: row.count for row in rows}
    assert stored == totals
    who = web_admin(sqlite_console, "read-only", group)
    with sign_in(sqlite_console, who) as browser:
        page = browser.get("/ui/")
    assert page.status_code == 200
    chart = page.text.split('id="tunnel-denials"')[1].split("</section>")[0]
    [reason] = totals
    assert (
        f"<title>{reason}: 2</title>" in chart and f'{reason} <span class="muted">2</span>' in chart
    )
