"""Tests for certgate.tunnel.kdcproxy: KDC addresses, frames and their bound, the policy's
``kerberos`` field in the feed, and the forwarding to KDCs over real loopback sockets
(TCP and UDP stand-ins answering like a KDC: the codec and a real MIT KDC are exercised
end to end in tests/integration/test_kdc_proxy.py)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from kdcproxy import codec
from kdcproxy.parse_pyasn1 import ASREQ, ProxyMessage
from pyasn1.codec.der.encoder import encode as der_encode

from certgate.feed import InvalidEntry, PolicyUpdate
from certgate.tunnel.kdcproxy import (
    KDC_PROXY_HOST,
    KDCAddress,
    KDCLimits,
    KDCProxyError,
    ask_kdcs,
    decode,
    frame,
    frame_need,
)
from certgate.tunnel.rules import Transport
from certgate.tunnel.service import TLS_BACKENDS
from certgate.tunnel.table import DeviceTable
from tests.support import free_port
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

LIMITS = KDCLimits(max_message=1024, kdc_timeout_s=2.0)
REQUEST = frame(b"\x6a\x03kdc-request")  # length-prefixed, as KKDCP carries it
REPLY = b"\x6b\x03kdc-reply"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kdc.corp.test", KDCAddress(Transport.TCP, "kdc.corp.test", 88)),
        ("tcp/10.0.0.5:8888", KDCAddress(Transport.TCP, "10.0.0.5", 8888)),
        ("udp/10.0.0.5", KDCAddress(Transport.UDP, "10.0.0.5", 88)),
        ("[::1]:750", KDCAddress(Transport.TCP, "::1", 750)),
    ],
)
def test_kdc_addresses_parse_in_krb5_conf_spelling(text: str, expected: KDCAddress) -> None:
    assert KDCAddress.parse(text) == expected
    assert KDCAddress.parse(expected.text) == expected  # what the feed carries reads back


@pytest.mark.parametrize("text", ["", "http/kdc:88", "kdc:0", "kdc:65536", "kdc:x", 88, None])
def test_malformed_kdc_addresses_are_refused(text: object) -> None:
    with pytest.raises(ValueError, match="KDC"):
        KDCAddress.parse(text)


def test_a_frame_is_complete_only_with_its_whole_message() -> None:
    framed = frame(b"x" * 10)
    assert frame_need(b"", 1024) == 4
    assert frame_need(framed[:2], 1024) == 2
    assert frame_need(framed[:7], 1024) == 7
    assert frame_need(framed, 1024) == 0


def test_a_frame_over_the_bound_is_refused_from_its_length_alone() -> None:
    with pytest.raises(KDCProxyError) as caught:
        frame_need(struct.pack("!I", 1025), 1024)
    assert (caught.value.status, caught.value.reason) == (413, "too_large")


@pytest.mark.parametrize("message", [b"", b"\x30\x03\x02\x01\x05", b"not DER at all"])
def test_what_is_not_a_kdc_proxy_message_is_a_bad_request(message: bytes) -> None:
    with pytest.raises(KDCProxyError) as caught:
        decode(message)
    assert (caught.value.status, caught.value.reason) == (400, "bad_request")


# The policy's kerberos field in the feed


def test_the_kerberos_field_round_trips_and_is_absent_when_empty() -> None:
    served = policy(kerberos={"CORP.TEST": ["kdc1.corp.test", "udp/10.0.0.5:88"]})
    assert served.kerberos == {"CORP.TEST": ("tcp/kdc1.corp.test:88", "udp/10.0.0.5:88")}
    assert policy(**served.encode()) == served
    assert "kerberos" not in policy().encode()
    assert policy().kerberos == {}


def test_settings_without_kdcs_publish_no_kerberos_field() -> None:
    settings = {
        "server_rules": {"default": "deny", "rules": []},
        "device_rules": {"default": "block", "rules": []},
        "feed": {"long_poll_s": 25, "max_staleness_s": 300},
        "tunnel": {"proxy_port": 2020, "per_app_port": 8443},
        "kerberos": {"UNSET.TEST": []},
    }
    assert "kerberos" not in PolicyUpdate.from_settings(1, settings).encode()


@pytest.mark.parametrize(
    "kerberos",
    [{}, [], {"CORP.TEST": []}, {"CORP.TEST": ["ftp/kdc"]}, {"bad realm": ["kdc"]}],
)
def test_a_malformed_kerberos_field_rejects_the_policy(kerberos: object) -> None:
    with pytest.raises(InvalidEntry, match="kerberos"):
        policy(kerberos=kerberos)


# Forwarding, over real loopback sockets


@pytest.fixture
def tcp_kdc() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        yield port


async def serve_tcp(reply: bytes) -> tuple[asyncio.Server, int, list[bytes]]:
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (length,) = struct.unpack("!I", await reader.readexactly(4))
        seen.append(await reader.readexactly(length))
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


def allow_all(kdc: KDCAddress, addresses: tuple[object, ...]) -> str | None:
    return None


def test_a_tcp_kdc_gets_the_request_and_its_reply_comes_back_framed() -> None:
    async def scenario() -> tuple[bytes, list[bytes]]:
        server, port, seen = await serve_tcp(frame(REPLY))
        async with server:
            return await ask_kdcs(REQUEST, (f"tcp/127.0.0.1:{port}",), allow_all, LIMITS), seen

    answer, seen = asyncio.run(scenario())
    assert answer == frame(REPLY)
    assert seen == [REQUEST[4:]]


def test_a_udp_kdc_gets_the_bare_message_and_its_datagram_comes_back_framed() -> None:
    async def scenario() -> tuple[bytes, bytes]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as kdc:
            kdc.bind(("127.0.0.1", 0))
            kdc.setblocking(False)
            loop = asyncio.get_running_loop()
            port = kdc.getsockname()[1]
            asking = asyncio.create_task(
                ask_kdcs(REQUEST, (f"udp/127.0.0.1:{port}",), allow_all, LIMITS)
            )
            datagram, client = await loop.sock_recvfrom(kdc, 2048)
            await loop.sock_sendto(kdc, REPLY, client)
            return await asking, datagram

    answer, datagram = asyncio.run(scenario())
    assert answer == frame(REPLY)
    assert datagram == REQUEST[4:]


def test_a_kdc_reply_over_the_bound_is_not_relayed() -> None:
    async def scenario() -> bytes:
        server, port, _ = await serve_tcp(struct.pack("!I", 4096) + b"x" * 4096)
        async with server:
            return await ask_kdcs(REQUEST, (f"127.0.0.1:{port}",), allow_all, LIMITS)

    with pytest.raises(KDCProxyError) as caught:
        asyncio.run(scenario())
    assert caught.value.reason == "kdc_unreachable"
    assert "reply of 4096 bytes (max 1024)" in caught.value.detail


def test_kdcs_the_rules_refuse_are_never_asked_and_the_next_one_answers() -> None:
    async def scenario() -> tuple[bytes, list[bytes], list[bytes]]:
        denied, denied_port, denied_seen = await serve_tcp(frame(b"wrong"))
        allowed, allowed_port, allowed_seen = await serve_tcp(frame(REPLY))

        def rules(kdc: KDCAddress, addresses: tuple[object, ...]) -> str | None:
            return "refused by rule 0" if kdc.port == denied_port else None

        kdcs = (f"127.0.0.1:{denied_port}", f"127.0.0.1:{allowed_port}")
        async with denied, allowed:
            answer = await ask_kdcs(REQUEST, kdcs, rules, LIMITS)
        return answer, denied_seen, allowed_seen

    answer, denied_seen, allowed_seen = asyncio.run(scenario())
    assert answer == frame(REPLY)
    assert denied_seen == [] and allowed_seen == [REQUEST[4:]]


def test_only_refused_kdcs_is_a_destination_denial() -> None:
    def deny(kdc: KDCAddress, addresses: tuple[object, ...]) -> str:
        return "server traffic rules refuse tcp to 127.0.0.1:88"

    with pytest.raises(KDCProxyError) as caught:
        asyncio.run(ask_kdcs(REQUEST, ("127.0.0.1",), deny, LIMITS))
    assert (caught.value.status, caught.value.reason) == (403, "destination_denied")


def test_an_unreachable_kdc_is_a_bad_gateway() -> None:
    closed = free_port()
    with pytest.raises(KDCProxyError) as caught:
        asyncio.run(ask_kdcs(REQUEST, (f"127.0.0.1:{closed}",), allow_all, LIMITS))
    assert (caught.value.status, caught.value.reason) == (502, "kdc_unreachable")


def test_a_silent_kdc_times_out_within_its_bound(tcp_kdc: int) -> None:
    quick = KDCLimits(max_message=1024, kdc_timeout_s=0.5)
    with pytest.raises(KDCProxyError) as caught:
        asyncio.run(ask_kdcs(REQUEST, (f"127.0.0.1:{tcp_kdc}",), allow_all, quick))
    assert "timed out" in caught.value.detail


# The node serving the exchange: real TLS, both data-plane backends


def kkdcp_request(realm: str) -> bytes:
    """A KDC-PROXY-MESSAGE (MS-KKDCP 2.2.2) for ``realm`` around a minimal AS-REQ, built
    with the ASN.1 types of PyPI kdcproxy (what the node decodes it with)."""
    message = ProxyMessage()
    message["message"] = frame(der_encode(ASREQ()))
    message["realm"] = realm
    return bytes(der_encode(message))


def ask_node(pki: PKI, device: Client, port: int, realm: str) -> bytes:
    """A KDC proxy exchange with the node on ``port`` as ``device``: the CONNECT head,
    then the frame in two TLS records of its own; everything the node answered."""
    request = frame(kkdcp_request(realm))
    raw = socket.create_connection(("127.0.0.1", port), 10)
    with tls_client(pki, device, ssl.TLSVersion.TLSv1_3).wrap_socket(
        raw, server_hostname="localhost"
    ) as tls:
        tls.sendall(
            f"CONNECT {KDC_PROXY_HOST}:88 HTTP/1.1\r\nHost: x\r\n"
            f"Certgate-App: {APP}\r\n\r\n".encode()
        )
        for piece in (request[:3], request[3:]):  # one TLS record each
            tls.sendall(piece)
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    return answer


@pytest.mark.parametrize("backend", TLS_BACKENDS)
def test_a_frame_sent_after_the_head_is_read_through_tls(backend: str, tmp_path: Path) -> None:
    """A cascade front end sends its own CONNECT head, then the device's frame in records
    of their own: the node reads them through its TLS end on either backend (on pyOpenSSL
    the bare socket holds TLS records, not the frame)."""
    pki = PKI(tmp_path)
    device = pki.client_cert("kdc-device")
    source = StaticSource(DeviceTable.from_snapshot(1, [device.entry()]))
    with ServiceThread(make_service(pki, source, backend=backend)) as running:
        server, port, seen = running.call(serve_tcp(frame(REPLY)))
        source.policy = policy(kerberos={"CORP.TEST": [f"tcp/127.0.0.1:{port}"]})
        answer = ask_node(pki, device, running.service.bound["per_app"], "CORP.TEST")
        server.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    assert body == frame(codec.encode(frame(REPLY)))
    assert seen == [der_encode(ASREQ())]  # the KDC got the bare AS-REQ, length-prefixed
