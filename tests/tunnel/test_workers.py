"""Tests for certgate.tunnel.workers: what the supervisor's hello tells a worker, and its
first table. (Real
worker processes are exercised in tests/integration/test_workers.py.)"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from certgate.tunnel.server import Limits
from certgate.tunnel.shared_table import MappedFiles, SharedTable
from certgate.tunnel.table import DeviceTable
from certgate.tunnel.udp import UDPLimits
from certgate.tunnel.workers import _first_table, encode_message, limits_of


def test_the_limits_reach_a_worker_whole_udp_bounds_included() -> None:
    limits = Limits(connect_timeout_s=3.0, udp=UDPLimits(max_flows=7, flow_idle_s=2.0))
    received = limits_of(json.loads(json.dumps(asdict(limits))))  # as over the socketpair
    assert received == limits
    assert isinstance(received.udp, UDPLimits)  # a worker's UDP relay reads its fields


def test_a_worker_whose_first_table_is_gone_takes_its_successor(tmp_path: Path) -> None:
    """The follower may replace the generation a hello names before the worker maps it (a
    snapshot at start-up): the worker waits for the next path on its channel, keeping the
    messages read meanwhile, instead of exiting."""
    table = DeviceTable.from_snapshot(3, [], home=MappedFiles(tmp_path))
    assert table.path is not None
    gone = str(tmp_path / "table-0.map")
    change = {"type": "change", "policy": None, "thumbprints": [], "signed_at": 1.0}

    async def scenario() -> tuple[SharedTable, list[dict[str, Any]]]:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=theirs)
        ours.sendall(encode_message(change))
        ours.sendall(encode_message({"type": "table", "path": gone}))  # replaced again
        ours.sendall(encode_message({"type": "table", "path": str(table.path)}))
        try:
            return await asyncio.wait_for(_first_table({"table": gone}, reader), 10)
        finally:
            ours.close()
            writer.close()

    mapped, held = asyncio.run(scenario())
    try:
        assert mapped.seq == 3 and held == [change]
    finally:
        mapped.close()
        table.close()


def test_a_worker_whose_supervisor_left_before_a_table_stops(tmp_path: Path) -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=theirs)
        ours.close()
        try:
            await asyncio.wait_for(_first_table({"table": str(tmp_path / "gone.map")}, reader), 10)
        finally:
            writer.close()

    with pytest.raises(ConnectionError, match="before a table was mapped"):
        asyncio.run(scenario())
