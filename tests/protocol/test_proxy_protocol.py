"""Byte vectors (built field by field from doc/proxy-protocol.txt §2.2) and fuzzing for the
sans-IO PROXY v2 reader."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from certgate.errors import BadRequest
from certgate.protocol.proxy_protocol import (
    MAX_PAYLOAD,
    NEED_DATA,
    SIGNATURE,
    Command,
    Family,
    ProxyHeader,
    ProxyHeaderReader,
    ProxyProtocolError,
    ReaderState,
    Transport,
    encode,
)

# §2.2: 12-byte signature, then version<<4|command, family<<4|transport, 16-bit length.
IPV4_PROXY = (
    SIGNATURE
    + bytes([0x21, 0x11, 0x00, 0x0C])
    + bytes([192, 168, 1, 10])  # source address
    + bytes([10, 0, 0, 1])  # destination address
    + (54321).to_bytes(2, "big")
    + (443).to_bytes(2, "big")
)
IPV6_PROXY = (
    SIGNATURE
    + bytes([0x21, 0x21, 0x00, 0x24])
    + ipaddress.ip_address("2001:db8::7").packed
    + ipaddress.ip_address("::1").packed
    + (40000).to_bytes(2, "big")
    + (5262).to_bytes(2, "big")
)
LOCAL = SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00])  # what a health check sends
UNIX_PROXY = SIGNATURE + bytes([0x21, 0x31, 0x00, 0xD8]) + b"/run/a".ljust(108, b"\0") * 2
# §2.2.7 TLVs after the addresses: PP2_TYPE_ALPN (0x01) "h2" and PP2_TYPE_NOOP (0x04).
WITH_TLVS = (
    SIGNATURE
    + bytes([0x21, 0x11, 0x00, 0x0C + 5 + 3])
    + IPV4_PROXY[16:]
    + bytes([0x01, 0x00, 0x02])
    + b"h2"
    + bytes([0x04, 0x00, 0x00])
)
CLIENT_HELLO_START = bytes([0x16, 0x03, 0x01, 0x02, 0x00])

VECTORS = [
    (
        IPV4_PROXY,
        ProxyHeader(
            Command.PROXY,
            Family.INET,
            Transport.STREAM,
            ("192.168.1.10", 54321),
            ("10.0.0.1", 443),
        ),
    ),
    (
        IPV6_PROXY,
        ProxyHeader(
            Command.PROXY,
            Family.INET6,
            Transport.STREAM,
            ("2001:db8::7", 40000),
            ("::1", 5262),
        ),
    ),
    (LOCAL, ProxyHeader(Command.LOCAL, Family.UNSPEC, Transport.UNSPEC)),
    (UNIX_PROXY, ProxyHeader(Command.PROXY, Family.UNIX, Transport.STREAM)),
    (
        WITH_TLVS,
        ProxyHeader(
            Command.PROXY,
            Family.INET,
            Transport.STREAM,
            ("192.168.1.10", 54321),
            ("10.0.0.1", 443),
            ((0x01, b"h2"), (0x04, b"")),
        ),
    ),
]


def read_all(data: bytes, chunk: int | None = None) -> tuple[ProxyHeader, bytes]:
    """The header and every byte after it, feeding ``data`` in pieces of ``chunk`` bytes."""
    reader = ProxyHeaderReader()
    step = chunk or len(data)
    for start in range(0, len(data), step):
        reader.receive_data(data[start : start + step])
        event = reader.next_event()
        if event is not NEED_DATA:
            assert isinstance(event, ProxyHeader)
            assert reader.state is ReaderState.DONE
            return event, reader.trailing_data + data[start + step :]
    raise AssertionError("no header")


@pytest.mark.parametrize(("wire", "expected"), VECTORS)
def test_vectors_decode_in_one_piece_and_byte_by_byte(wire: bytes, expected: ProxyHeader) -> None:
    assert read_all(wire) == (expected, b"")
    assert read_all(wire, chunk=1) == (expected, b"")


@pytest.mark.parametrize(("wire", "expected"), [v for v in VECTORS if v[1].family != Family.UNIX])
def test_encode_produces_the_vectors(wire: bytes, expected: ProxyHeader) -> None:
    assert encode(expected) == wire


def test_the_relayed_stream_after_the_header_is_kept() -> None:
    header, rest = read_all(IPV4_PROXY + CLIENT_HELLO_START)
    assert header.source == ("192.168.1.10", 54321)
    assert rest == CLIENT_HELLO_START


def test_a_partial_header_needs_data_then_eof_fails() -> None:
    reader = ProxyHeaderReader()
    reader.receive_data(IPV4_PROXY[:20])
    assert reader.next_event() is NEED_DATA
    reader.receive_data(b"")
    with pytest.raises(ProxyProtocolError, match="closed after 20 bytes"):
        reader.next_event()
    assert reader.state is ReaderState.FAILED


def _with(byte13: int, byte14: int, payload: bytes) -> bytes:
    return SIGNATURE + bytes([byte13, byte14]) + len(payload).to_bytes(2, "big") + payload


ERRORS = [
    (CLIENT_HELLO_START, "does not start with its signature"),
    (b"GET / HTTP/1.1\r\n", "does not start with its signature"),
    (b"PROXY TCP4 192.168.1.10 10.0.0.1 54321 443\r\n", "version 1"),
    (b"PROX", "version 1"),
    (_with(0x11, 0x11, IPV4_PROXY[16:]), "version 1 is not 2"),
    (_with(0x22, 0x11, IPV4_PROXY[16:]), "unknown PROXY v2 command 0x2"),
    (_with(0x21, 0x41, IPV4_PROXY[16:]), "family/transport 0x41"),
    (_with(0x21, 0x13, IPV4_PROXY[16:]), "family/transport 0x13"),
    (_with(0x21, 0x12, IPV4_PROXY[16:]), "DGRAM PROXY header on a TCP connection"),
    (_with(0x21, 0x11, bytes(8)), "INET addresses need 12 bytes"),
    (_with(0x21, 0x21, bytes(12)), "INET6 addresses need 36 bytes"),
    (_with(0x21, 0x11, IPV4_PROXY[16:] + b"\x01\x00"), "truncated TLV"),
    (_with(0x21, 0x11, IPV4_PROXY[16:] + b"\x01\x00\x05ab"), "runs past the end"),
    (
        SIGNATURE + bytes([0x21, 0x11]) + (MAX_PAYLOAD + 1).to_bytes(2, "big"),
        f"exceeds {MAX_PAYLOAD}",
    ),
]


@pytest.mark.parametrize(("wire", "message"), ERRORS)
def test_bad_headers_are_refused_by_field(wire: bytes, message: str) -> None:
    for chunk in (len(wire), 1):
        reader = ProxyHeaderReader()
        with pytest.raises(ProxyProtocolError, match=message):
            for i in range(0, len(wire), chunk):
                reader.receive_data(wire[i : i + chunk])
                reader.next_event()
            reader.receive_data(b"")
            reader.next_event()
        assert reader.state is ReaderState.FAILED


def test_a_tls_client_fails_on_its_first_byte() -> None:
    """A missing header is noticed at once, not after waiting for 16 bytes."""
    reader = ProxyHeaderReader()
    reader.receive_data(b"\x16")
    with pytest.raises(ProxyProtocolError):
        reader.next_event()


def test_errors_are_bad_requests_and_the_reader_is_single_use() -> None:
    assert issubclass(ProxyProtocolError, BadRequest)
    reader = ProxyHeaderReader()
    reader.receive_data(LOCAL)
    assert isinstance(reader.next_event(), ProxyHeader)
    with pytest.raises(RuntimeError):
        reader.receive_data(b"x")
    with pytest.raises(RuntimeError):
        reader.next_event()


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=32))
def test_arbitrary_bytes_fail_cleanly(data: bytes, chunk: int) -> None:
    reader = ProxyHeaderReader()
    try:
        for i in range(0, len(data), chunk):
            reader.receive_data(data[i : i + chunk])
            if reader.next_event() is not NEED_DATA:
                return
        reader.receive_data(b"")
        reader.next_event()
    except ProxyProtocolError:
        assert reader.state is ReaderState.FAILED


@given(st.binary(max_size=200))
def test_arbitrary_bytes_after_a_signature_fail_cleanly(tail: bytes) -> None:
    """Past the signature, so the fuzzing reaches the fixed fields, addresses and TLVs."""
    reader = ProxyHeaderReader()
    reader.receive_data(SIGNATURE + tail)
    try:
        event = reader.next_event()
    except ProxyProtocolError:
        return
    assert event is NEED_DATA or isinstance(event, ProxyHeader)


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
port = st.integers(min_value=0, max_value=65535)
tlv = st.tuples(st.integers(min_value=0, max_value=255), st.binary(max_size=40))


@given(
    st.one_of(
        st.tuples(st.just(Family.INET), st.tuples(ipv4, port), st.tuples(ipv4, port)),
        st.tuples(st.just(Family.INET6), st.tuples(ipv6, port), st.tuples(ipv6, port)),
    ),
    st.lists(tlv, max_size=5),
    st.binary(max_size=20),
)
def test_encode_then_read_round_trips(
    addresses: tuple[Family, tuple[str, int], tuple[str, int]],
    tlvs: list[tuple[int, bytes]],
    trailing: bytes,
) -> None:
    family, source, destination = addresses
    header = ProxyHeader(Command.PROXY, family, Transport.STREAM, source, destination, tuple(tlvs))
    assert read_all(encode(header) + trailing) == (header, trailing)
