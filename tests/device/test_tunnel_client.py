"""The Per-App Tunnel client: the CONNECT exchange as byte transcripts and fuzz, then the
asyncio shell against the real data plane (trust, group identity, refusals)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certgate.device.state import CertifiedKey
from certgate.device.tunnel_client import (
    NEED_DATA,
    ConnectHandshake,
    Established,
    Refused,
    TunnelClient,
    TunnelError,
    TunnelRefused,
    TunnelUnreachable,
)
from certgate.pki.authority import Issuer
from certgate.pki.keys import load_private_key_pem
from certgate.tunnel.table import DeviceTable
from tests.device.harness import BROWSER, PAGE, counting_origin
from tests.tunnel.dataplane import GROUP, PKI, Client, ServiceThread, StaticSource, make_service

REQUEST = (
    b"CONNECT intranet.test:443 HTTP/1.1\r\nHost: intranet.test:443\r\n"
    b"Certgate-App: com.example.browser\r\n\r\n"
)
DENIAL = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 23\r\n"
    b"Connection: close\r\n\r\ncertgate: app_mismatch\n"
)


def handshake() -> ConnectHandshake:
    exchange = ConnectHandshake(BROWSER, "intranet.test", 443)
    assert exchange.request() == REQUEST
    return exchange


def feed(exchange: ConnectHandshake, *chunks: bytes) -> object:
    outcome: object = NEED_DATA
    for chunk in chunks:
        exchange.receive_data(chunk)
        outcome = exchange.next_outcome()
    return outcome


def test_ipv6_destinations_use_brackets() -> None:
    request = ConnectHandshake(BROWSER, "::1", 8080).request()
    assert request.startswith(b"CONNECT [::1]:8080 HTTP/1.1\r\nHost: [::1]:8080\r\n")


def test_200_establishes_and_keeps_the_bytes_after_the_head() -> None:
    outcome = feed(handshake(), b"HTTP/1.1 200 Connection established\r\n\r\nhello")
    assert outcome == Established(b"hello")


def test_200_split_byte_by_byte() -> None:
    response = b"HTTP/1.1 200 Connection established\r\n\r\n"
    exchange = handshake()
    outcomes = [feed(exchange, response[i : i + 1]) for i in range(len(response))]
    assert outcomes[:-1] == [NEED_DATA] * (len(response) - 1)
    assert outcomes[-1] == Established(b"")


def test_denial_carries_the_certgate_reason() -> None:
    assert feed(handshake(), DENIAL) == Refused(403, "app_mismatch")


def test_denial_cut_short_keeps_the_status_and_phrase() -> None:
    assert feed(handshake(), DENIAL[:-10], b"") == Refused(403, "app")
    assert feed(handshake(), DENIAL.split(b"\r\n\r\n")[0] + b"\r\n\r\n", b"") == Refused(
        403, "Forbidden"
    )


def test_informational_responses_are_skipped() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"
    assert feed(handshake(), answer) == Established(b"")


@pytest.mark.parametrize("answer", [b"", b"SSH-2.0-OpenSSH\r\n", b"HTTP/1.1 2000 Huh\r\n\r\n"])
def test_garbage_or_silence_is_a_tunnel_error(answer: bytes) -> None:
    exchange = handshake()
    with pytest.raises(TunnelError):
        feed(exchange, answer, b"")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_any_answer_fails_cleanly(chunks: list[bytes]) -> None:
    exchange = handshake()
    try:
        for chunk in [*chunks, b""]:
            exchange.receive_data(chunk)
            outcome = exchange.next_outcome()
            if outcome is not NEED_DATA:
                assert isinstance(outcome, Established | Refused)
                return
    except TunnelError:
        pass


# -- the asyncio shell against the real data plane -----------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def device(pki: PKI) -> Client:
    return pki.client_cert("device")


@pytest.fixture(scope="module")
def tunnel(pki: PKI, device: Client) -> Iterator[ServiceThread]:
    source = StaticSource(DeviceTable.from_snapshot(1, [device.entry()]))
    with ServiceThread(make_service(pki, source)) as running:
        yield running


def client_for(
    pki: PKI, device: Client, tunnel: ServiceThread, group: str = GROUP, trust: object = None
) -> TunnelClient:
    identity = CertifiedKey(load_private_key_pem(device.key_path.read_bytes()), device.cert)
    endpoints = [("127.0.0.1", tunnel.service.bound["per_app"])]
    return TunnelClient.for_identity(endpoints, trust or [pki.scr, pki.root], identity, group)  # type: ignore[arg-type]


async def fetch(client: TunnelClient, port: int) -> bytes:
    upstream = await client.open(BROWSER, "localhost", port)
    upstream.writer.write(b"GET / HTTP/1.1\r\nHost: intranet\r\nConnection: close\r\n\r\n")
    data = upstream.initial + await upstream.reader.read()
    upstream.writer.close()
    return data


def test_open_relays_through_the_tunnel(pki: PKI, device: Client, tunnel: ServiceThread) -> None:
    with counting_origin() as origin:
        answer = asyncio.run(fetch(client_for(pki, device, tunnel), origin.server_address[1]))
    assert answer.endswith(PAGE)


def test_another_groups_tunnel_is_not_trusted(
    pki: PKI, device: Client, tunnel: ServiceThread
) -> None:
    client = client_for(pki, device, tunnel, group="other-group")
    with pytest.raises(TunnelUnreachable, match="not urn:certgate:tunnel:group:other-group"):
        asyncio.run(fetch(client, 9))


def test_a_tunnel_outside_the_profile_trust_is_refused(
    pki: PKI, device: Client, tunnel: ServiceThread, tmp_path_factory: pytest.TempPathFactory
) -> None:
    stranger = PKI(tmp_path_factory.mktemp("stranger"))
    client = client_for(pki, device, tunnel, trust=[stranger.scr, stranger.root])
    with pytest.raises(TunnelUnreachable, match="tunnel certificate rejected"):
        asyncio.run(fetch(client, 9))


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_device_cert_from_another_ca_is_refused(
    pki: PKI, tunnel: ServiceThread, version: ssl.TLSVersion
) -> None:
    # Issued by the Secure Channel Root, a sibling of the Device Root under the same root.
    sibling = pki.client_cert("sibling", issuer=Issuer(pki.scr, pki.scr_key))
    client = client_for(pki, sibling, tunnel)
    client.context.maximum_version = version
    with pytest.raises(TunnelError, match="device certificate refused"):
        asyncio.run(fetch(client, 9))


def test_an_unknown_device_is_refused_with_the_tunnels_reason(
    pki: PKI, tunnel: ServiceThread
) -> None:
    unknown = pki.client_cert("unknown")
    with pytest.raises(TunnelRefused) as refused:
        asyncio.run(fetch(client_for(pki, unknown, tunnel), 9))
    assert (refused.value.status, refused.value.reason) == (403, "unknown_thumbprint")
