"""One predicate for new and live tunnels: for every denial reason that a change can
cause, a new connection is refused with it AND a live tunnel of that certificate is closed
by a TCP reset (real TLS on loopback, both event loops).

Two reasons cannot arise for a live tunnel, so they are not in the table: ``wrong_group``
(the certificate's group and the tunnel's are fixed for the life of the tunnel) and
``invalid_app`` (the request's app name was checked when the tunnel was admitted and does
not change); tests/tunnel/test_admission.py covers them for new connections.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from certgate.tunnel.sync import FeedChange
from certgate.tunnel.table import DeviceTable
from tests.tunnel.dataplane import (
    APP,
    PKI,
    Client,
    Origin,
    ServiceThread,
    StaticSource,
    connect_request,
    make_service,
    policy,
    tls_client,
)


@dataclass(frozen=True)
class Case:
    reason: str
    status: int
    change: Callable[[StaticSource, Client], FeedChange | None]  # None: the sweeper notices


def _entry(**overrides: Any) -> Callable[[StaticSource, Client], FeedChange]:
    def change(source: StaticSource, client: Client) -> FeedChange:
        table = source.table
        applied = table.apply_batch(table.seq + 1, table.seq + 1, [client.entry(**overrides)])
        return FeedChange(applied.touched, time.time(), "batch")

    return change


def _deleted(source: StaticSource, client: Client) -> FeedChange:
    table, op = source.table, {**client.entry(), "op": "delete"}
    gone = {key: op[key] for key in ("op", "thumbprint", "device_uid", "group_id")}
    applied = table.apply_batch(table.seq + 1, table.seq + 1, [gone])
    return FeedChange(applied.touched, time.time(), "batch")


def _stale(source: StaticSource, client: Client) -> None:
    source.fresh = False


def _rules_deny(source: StaticSource, client: Client) -> FeedChange:
    source.policy = policy({"default": "deny", "rules": []}, version=2)
    return FeedChange(None, time.time(), "policy")


def _swapped(source: StaticSource, client: Client) -> FeedChange:
    source.table = DeviceTable(source.table.seq + 1)  # a snapshot without the device
    return FeedChange(None, time.time(), "snapshot")


CASES = {
    "noncompliant": Case("noncompliant", 403, _entry(compliance_status="noncompliant")),
    "compliance_unknown": Case("compliance_unknown", 403, _entry(compliance_status="unknown")),
    "blocked": Case("blocked", 403, _entry(blocked=True)),
    "unenrolled": Case("unenrolled", 403, _entry(enrollment_status="unenrolled")),
    "wiped": Case("wiped", 403, _entry(enrollment_status="wiped")),
    "expired": Case("expired", 403, _entry(not_after=int(time.time()) - 1)),
    "identity_mismatch": Case("identity_mismatch", 403, _entry(device_uid="0" * 32)),
    "wrong_kind": Case("wrong_kind", 403, _entry(app_bundle_id=None)),
    "app_mismatch": Case("app_mismatch", 403, _entry(app_bundle_id="com.example.mail")),
    "deleted": Case("unknown_thumbprint", 403, _deleted),
    "snapshot_without_it": Case("unknown_thumbprint", 403, _swapped),
    "stale_table": Case("stale_table", 503, _stale),
    "destination_denied": Case("destination_denied", 403, _rules_deny),
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def client(pki: PKI) -> Client:
    return pki.client_cert("app", app=APP)


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    with Origin() as running:
        yield running


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("name", list(CASES))
def test_a_denial_refuses_new_and_closes_live_tunnels(
    pki: PKI, client: Client, origin: Origin, name: str, loop: str, backend: str
) -> None:
    case = CASES[name]
    source = StaticSource(DeviceTable.from_snapshot(1, [client.entry()]))
    ctx = tls_client(pki, client, ssl.TLSVersion.TLSv1_3)
    request = f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with ServiceThread(make_service(pki, source, backend=backend), loop=loop) as tunnel:
        port = tunnel.service.bound["proxy"]
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as live,
        ):
            live.sendall(request)
            assert live.recv(4096).startswith(b"HTTP/1.1 200")
            change = tunnel.run(case.change, source, client)
            if change is None:
                tunnel.run(tunnel.service.sweep, time.monotonic(), time.time())
            else:
                tunnel.run(tunnel.service.on_change, change)
            # Not a clean end (b"" after close_notify): the TCP reset surfaces as an error.
            with pytest.raises((ConnectionResetError, ssl.SSLEOFError)):
                live.recv(4096)
        answer = connect_request(port, ctx, request)
        closed = tunnel.run(lambda: tunnel.service.metrics.closed_by_policy._metrics.copy())
    assert answer.startswith(f"HTTP/1.1 {case.status}".encode()), answer[:80]
    assert f"certgate: {case.reason}".encode() in answer
    assert any(labels[1] == case.reason for labels in closed)
