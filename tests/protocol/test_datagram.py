"""Byte vectors and fuzzing for the UDP-in-tunnel frame codec."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from certgate.protocol.datagram import (
    NEED_DATA,
    Datagram,
    DatagramDecoder,
    FrameError,
    encode,
)


def test_encode_vectors() -> None:
    assert encode(1, b"abc") == b"\x00\x00\x00\x01\x00\x03abc"
    assert encode(0xFFFFFFFF, b"") == b"\xff\xff\xff\xff\x00\x00"


def test_decode_two_frames_split_anywhere() -> None:
    stream = b"\x00\x00\x00\x07\x00\x02hi" + b"\x00\x00\x01\x00\x00\x00"
    for cut in range(len(stream) + 1):
        decoder = DatagramDecoder()
        decoder.receive_data(stream[:cut])
        events = []
        while (event := decoder.next_event()) is not NEED_DATA:
            events.append(event)
        decoder.receive_data(stream[cut:])
        while (event := decoder.next_event()) is not NEED_DATA:
            events.append(event)
        assert events == [Datagram(7, b"hi"), Datagram(256, b"")]
        assert decoder.pending == 0


def test_partial_frame_waits() -> None:
    decoder = DatagramDecoder()
    decoder.receive_data(b"\x00\x00\x00\x01\x00\x05abc")
    assert decoder.next_event() is NEED_DATA
    assert decoder.pending == 9


def test_oversized_frame_is_refused_from_its_header() -> None:
    decoder = DatagramDecoder(max_datagram=512)
    decoder.receive_data(b"\x00\x00\x00\x01\x02\x01")  # 513 bytes announced, none sent
    with pytest.raises(FrameError, match="513 bytes over the bound 512"):
        decoder.next_event()


def test_encode_refuses_out_of_bounds() -> None:
    with pytest.raises(FrameError):
        encode(1, b"x" * 10, max_datagram=9)
    with pytest.raises(FrameError):
        encode(-1, b"")
    with pytest.raises(FrameError):
        encode(2**32, b"")
    with pytest.raises(ValueError):
        DatagramDecoder(max_datagram=70000)


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=300)), max_size=8))
def test_round_trip(frames: list[tuple[int, bytes]]) -> None:
    decoder = DatagramDecoder(max_datagram=300)
    decoder.receive_data(b"".join(encode(flow, payload) for flow, payload in frames))
    decoded = []
    while (event := decoder.next_event()) is not NEED_DATA:
        decoded.append(event)
    assert decoded == [Datagram(flow, payload) for flow, payload in frames]


@given(st.binary(max_size=400), st.integers(0, 300))
def test_arbitrary_bytes_fail_cleanly(data: bytes, bound: int) -> None:
    decoder = DatagramDecoder(max_datagram=bound)
    decoder.receive_data(data)
    consumed = 0
    try:
        while (event := decoder.next_event()) is not NEED_DATA:
            assert isinstance(event, Datagram)
            assert len(event.payload) <= bound
            consumed += 6 + len(event.payload)
    except FrameError:
        return
    assert consumed + decoder.pending == len(data)
