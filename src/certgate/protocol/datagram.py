"""UDP datagrams inside a Per-App Tunnel byte stream. Sans-IO.

A UDP tunnel starts as any Per-App Tunnel connection does: ``CONNECT host:port`` naming
the app, plus ``Certgate-Transport: udp``. After ``200`` both directions carry frames::

    flow id   4 bytes, unsigned, network byte order
    length    2 bytes, unsigned, network byte order (at most the decoder's bound)
    payload   length bytes: one UDP datagram, kept whole (an empty one is valid)

A flow is one local sender (the device side's source address) to the CONNECT's
destination; the tunnel gives each flow its own upstream socket, so replies come back to
the sender that asked. Frames of different flows interleave freely. Flows have no open or
close frame: either side forgets a flow that stayed idle, and a frame for an unknown flow
opens it again. A frame over the bound is a protocol error that ends the tunnel: the
stream cannot be resynchronised after it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from certgate.errors import BadRequest
from certgate.protocol.events import NEED_DATA, NeedData

__all__ = [
    "HEADER_BYTES",
    "MAX_DATAGRAM",
    "NEED_DATA",
    "TRANSPORT_HEADER",
    "UDP",
    "Datagram",
    "DatagramDecoder",
    "FrameError",
    "encode",
]

TRANSPORT_HEADER = "Certgate-Transport"
UDP = "udp"
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4 (RFC 791 total length - headers)
MAX_FLOW_ID = 2**32 - 1
_HEADER = struct.Struct("!IH")
HEADER_BYTES = _HEADER.size


class FrameError(BadRequest):
    """The byte stream is not a valid frame sequence; the tunnel must end."""


@dataclass(frozen=True, slots=True)
class Datagram:
    flow: int
    payload: bytes


def encode(flow: int, payload: bytes, max_datagram: int = MAX_DATAGRAM) -> bytes:
    """One frame; raises FrameError for a flow id or payload out of bounds."""
    if not 0 <= flow <= MAX_FLOW_ID:
        raise FrameError(f"flow id {flow} out of range")
    if len(payload) > max_datagram:
        raise FrameError(f"datagram of {len(payload)} bytes over the bound {max_datagram}")
    return _HEADER.pack(flow, len(payload)) + payload


class DatagramDecoder:
    """Bytes in (``receive_data``), datagrams out (``next_event``), h11-style."""

    def __init__(self, max_datagram: int = MAX_DATAGRAM) -> None:
        if not 0 <= max_datagram <= MAX_DATAGRAM:
            raise ValueError(f"max_datagram must be within 0-{MAX_DATAGRAM}")
        self.max_datagram = max_datagram
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buffer)

    def next_event(self) -> Datagram | NeedData:
        if len(self._buffer) < HEADER_BYTES:
            return NEED_DATA
        flow, length = _HEADER.unpack_from(self._buffer)
        if length > self.max_datagram:
            raise FrameError(f"frame of {length} bytes over the bound {self.max_datagram}")
        end = HEADER_BYTES + length
        if len(self._buffer) < end:
            return NEED_DATA
        payload = bytes(self._buffer[HEADER_BYTES:end])
        del self._buffer[:end]
        return Datagram(flow, payload)
