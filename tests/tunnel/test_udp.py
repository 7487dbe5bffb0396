"""UDP over the Per-App Tunnel, on the real data plane: real TLS on loopback, a real UDP
echo server as the destination, frames written by hand (protocol.datagram)."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from certgate.protocol.datagram import NEED_DATA, Datagram, DatagramDecoder, encode
from certgate.tunnel.server import Limits
from certgate.tunnel.sync import FeedChange
from certgate.tunnel.table import DeviceTable
from certgate.tunnel.udp import UDPLimits
from tests.tunnel.dataplane import (
    APP,
    PKI,
    Client,
    ServiceThread,
    StaticSource,
    make_service,
    policy,
    tls_client,
)

UDP_RULES: dict[str, Any] = {
    "default": "deny",
    "rules": [{"action": "allow", "cidrs": ["127.0.0.0/8"], "protocols": ["udp"]}],
}
TCP_ONLY_RULES: dict[str, Any] = {
    "default": "allow",
    "rules": [{"action": "allow", "cidrs": ["127.0.0.0/8"]}],
}


class Echo:
    """A real UDP server on loopback: answers ``echo:<datagram>`` to whoever sent it and
    remembers the source ports it saw (one per tunnel flow)."""

    def __enter__(self) -> Echo:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.sources: set[int] = set()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        return self

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                data, source = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.sources.add(source[1])
            self.sock.sendto(b"echo:" + data, source)

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def device(pki: PKI) -> Client:
    return pki.client_cert("device")


@pytest.fixture
def echo() -> Iterator[Echo]:
    with Echo() as running:
        yield running


def open_udp(
    pki: PKI, device: Client, port: int, echo_port: int, transport: str = "udp"
) -> tuple[ssl.SSLSocket, bytes]:
    """A UDP tunnel to the echo server: the TLS socket and the tunnel's answer head."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    ctx = tls_client(pki, device, ssl.TLSVersion.TLSv1_3)
    tls = ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)
    tls.sendall(
        f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: x\r\nCertgate-App: {APP}\r\n"
        f"Certgate-Transport: {transport}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = tls.recv(4096)
        if not chunk:
            break
        head += chunk
    return tls, head


def read_datagrams(tls: ssl.SSLSocket, count: int, trailing: bytes = b"") -> list[Datagram]:
    decoder = DatagramDecoder()
    decoder.receive_data(trailing)
    found: list[Datagram] = []
    while len(found) < count:
        event = decoder.next_event()
        if event is NEED_DATA:
            chunk = tls.recv(65536)
            assert chunk, f"tunnel closed after {found}"
            decoder.receive_data(chunk)
        else:
            found.append(event)
    return found


def service(
    pki: PKI, device: Client, rules: dict[str, Any], loop: str = "asyncio", **udp: Any
) -> ServiceThread:
    source = StaticSource(DeviceTable.from_snapshot(1, [device.entry()]))
    limits = Limits(udp=UDPLimits(**udp))
    return ServiceThread(make_service(pki, source, rules, limits), loop=loop)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_flows_get_their_own_replies(pki: PKI, device: Client, echo: Echo, loop: str) -> None:
    with service(pki, device, UDP_RULES, loop) as tunnel:
        tls, head = open_udp(pki, device, tunnel.service.bound["per_app"], echo.port)
        with tls:
            assert head.startswith(b"HTTP/1.1 200"), head
            tls.sendall(encode(1, b"one") + encode(2, b"two") + encode(1, b""))
            replies = read_datagrams(tls, 3, head.partition(b"\r\n\r\n")[2])
            live = tunnel.run(tunnel.service.live_tunnels)
    assert sorted(replies, key=lambda d: (d.flow, d.payload)) == [
        Datagram(1, b"echo:"),
        Datagram(1, b"echo:one"),
        Datagram(2, b"echo:two"),
    ]
    assert len(echo.sources) == 2  # one upstream socket per flow
    assert [(t["transport"], t["port"]) for t in live] == [("udp", echo.port)]


def test_rules_that_name_only_tcp_refuse_udp(pki: PKI, device: Client, echo: Echo) -> None:
    with service(pki, device, TCP_ONLY_RULES) as tunnel:
        tls, answer = open_udp(pki, device, tunnel.service.bound["per_app"], echo.port)
        tls.close()
    assert answer.startswith(b"HTTP/1.1 403"), answer
    assert not echo.sources


def test_unknown_transport_is_a_bad_request(pki: PKI, device: Client, echo: Echo) -> None:
    with service(pki, device, UDP_RULES) as tunnel:
        tls, answer = open_udp(pki, device, tunnel.service.bound["per_app"], echo.port, "sctp")
        tls.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer


def test_an_oversized_frame_ends_the_tunnel(pki: PKI, device: Client, echo: Echo) -> None:
    with service(pki, device, UDP_RULES, max_datagram=512) as tunnel:
        tls, head = open_udp(pki, device, tunnel.service.bound["per_app"], echo.port)
        with tls:
            assert head.startswith(b"HTTP/1.1 200"), head
            tls.sendall(b"\x00\x00\x00\x01\x02\x01" + b"x" * 513)
            with pytest.raises((ConnectionResetError, ssl.SSLEOFError)):
                while tls.recv(4096):
                    pass
    assert not echo.sources


def test_idle_flows_are_closed_and_reopened(pki: PKI, device: Client, echo: Echo) -> None:
    with service(pki, device, UDP_RULES, flow_idle_s=0.2) as tunnel:
        tls, head = open_udp(pki, device, tunnel.service.bound["per_app"], echo.port)
        with tls:
            tls.sendall(encode(5, b"a"))
            read_datagrams(tls, 1, head.partition(b"\r\n\r\n")[2])
            deadline = time.monotonic() + 10
            while len(_open_flows(tunnel)) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _open_flows(tunnel) == []
            tls.sendall(encode(5, b"b"))  # the same flow id, after expiry: a new socket
            assert read_datagrams(tls, 1) == [Datagram(5, b"echo:b")]
    assert len(echo.sources) == 2


def _open_flows(tunnel: ServiceThread) -> list[int]:
    conns = tunnel.run(lambda: list(tunnel.service.shared.registry.all))
    return [flow for c in conns if c.udp is not None for flow in c.udp.flows]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_policy_change_closes_a_live_udp_tunnel(
    pki: PKI, device: Client, echo: Echo, loop: str
) -> None:
    with service(pki, device, UDP_RULES, loop) as tunnel:
        tls, head = open_udp(pki, device, tunnel.service.bound["per_app"], echo.port)
        with tls:
            tls.sendall(encode(1, b"x"))
            read_datagrams(tls, 1, head.partition(b"\r\n\r\n")[2])

            def tcp_only() -> None:
                tunnel.service.gate.source.policy = policy(TCP_ONLY_RULES, version=2)  # type: ignore[misc]
                tunnel.service.on_change(FeedChange(None, time.time(), "policy"))

            tunnel.run(tcp_only)
            with pytest.raises((ConnectionResetError, ssl.SSLEOFError)):
                while tls.recv(4096):
                    pass
        closed = tunnel.run(lambda: tunnel.service.metrics.closed_by_policy._metrics.copy())
    assert any(labels[1] == "destination_denied" for labels in closed)


def test_flows_past_the_bound_are_dropped(pki: PKI, device: Client, echo: Echo) -> None:
    with service(pki, device, UDP_RULES, max_flows=1) as tunnel:
        tls, head = open_udp(pki, device, tunnel.service.bound["per_app"], echo.port)
        with tls:
            tls.sendall(encode(1, b"first") + encode(2, b"dropped") + encode(1, b"again"))
            replies = read_datagrams(tls, 2, head.partition(b"\r\n\r\n")[2])
    assert replies == [Datagram(1, b"echo:first"), Datagram(1, b"echo:again")]
    assert len(echo.sources) == 1


def test_the_admission_event_names_the_transport(
    pki: PKI, device: Client, echo: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="certgate.tunnel"),
        service(pki, device, UDP_RULES) as tunnel,
    ):
        tls, head = open_udp(pki, device, tunnel.service.bound["per_app"], echo.port)
        tls.close()
    assert head.startswith(b"HTTP/1.1 200"), head
    admits = [r for r in caplog.records if r.getMessage().startswith("admit ")]
    assert len(admits) == 1 and "transport=udp" in admits[0].getMessage()
    fields = getattr(admits[0], "certgate_fields")  # noqa: B009 (set by logging extra=)
    assert fields["event"] == "admit" and fields["transport"] == "udp"
    assert fields["destination"] == f"127.0.0.1:{echo.port}"
