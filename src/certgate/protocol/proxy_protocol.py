"""PROXY protocol version 2 (HAProxy's doc/proxy-protocol.txt §2.2), sans-IO, receiver side.

A load balancer that relays a TCP connection prefixes it with a binary header naming the
client's real address. :class:`ProxyHeaderReader` takes bytes (``receive_data``) and
returns ``NEED_DATA`` or one :class:`ProxyHeader` (``next_event``); bytes after the header
(the relayed stream, e.g. a TLS ClientHello) are in ``trailing_data``. :func:`encode`
builds a header (for tests and for anything that relays).

Only version 2 is accepted: the text version 1 ("PROXY TCP4 ...", §2.1) is refused by
name, and so is anything that is not a v2 signature, as soon as the first differing byte
arrives, so a client speaking TLS straight away fails at once rather than after a timeout.
Input errors raise :class:`ProxyProtocolError` (a :class:`~certgate.errors.BadRequest`).
TLVs (§2.2.7) are returned undecoded; a CRC32C TLV is not verified (the spec makes checking
optional for receivers that do not implement it).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import Enum, IntEnum

from certgate.errors import BadRequest
from certgate.protocol.events import NEED_DATA, NeedData

__all__ = [
    "MAX_PAYLOAD",
    "NEED_DATA",
    "SIGNATURE",
    "Command",
    "Family",
    "NeedData",
    "ProxyHeader",
    "ProxyHeaderReader",
    "ProxyProtocolError",
    "ReaderState",
    "Transport",
    "client_address",
    "encode",
    "starts_like_header",
]

# §2.2: "\r\n\r\n\0\r\nQUIT\n", chosen so it can never start a valid text protocol message.
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "  # §2.1
_FIXED = 16  # signature, version/command, family/transport, length
VERSION_2 = 0x2
# Addresses plus TLVs. The spec allows 65535; a relaying load balancer sends well under
# 1 KiB (HAProxy's largest TLV set is a few hundred bytes), so more is refused, not buffered.
MAX_PAYLOAD = 4096


class ProxyProtocolError(BadRequest):
    """The bytes are not an acceptable PROXY v2 header; the message says which field."""


class Command(IntEnum):
    """Low nibble of byte 13 (§2.2)."""

    LOCAL = 0x0  # health checks and the like: use the real connection endpoints
    PROXY = 0x1  # relayed on behalf of another node: the addresses below are the client's


class Family(IntEnum):
    """High nibble of byte 14 (§2.2)."""

    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(IntEnum):
    """Low nibble of byte 14 (§2.2)."""

    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


# §2.2: the address block's size for each family (source and destination, then ports).
_ADDRESS_SIZE = {Family.UNSPEC: 0, Family.INET: 12, Family.INET6: 36, Family.UNIX: 216}


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A decoded header. ``source``/``destination`` are ``(ip, port)`` for INET and INET6
    with the PROXY command, ``None`` otherwise (LOCAL, UNSPEC: use the real endpoints;
    UNIX: there is no IP to report)."""

    command: Command
    family: Family
    transport: Transport
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()


class ReaderState(Enum):
    AWAITING_HEADER = "awaiting-header"
    DONE = "done"
    FAILED = "failed"


_TRANSITIONS: dict[ReaderState, frozenset[ReaderState]] = {
    ReaderState.AWAITING_HEADER: frozenset({ReaderState.DONE, ReaderState.FAILED}),
    ReaderState.DONE: frozenset(),
    ReaderState.FAILED: frozenset(),
}


class ProxyHeaderReader:
    """Reads exactly one PROXY v2 header from the start of a connection."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._eof = False
        self.state = ReaderState.AWAITING_HEADER
        self.trailing_data = b""

    def receive_data(self, data: bytes) -> None:
        """Buffer ``data``; ``b""`` means the peer closed its side."""
        if self.state is not ReaderState.AWAITING_HEADER:
            raise RuntimeError(f"receive_data in state {self.state.value}")
        if data:
            self._buffer += data
        else:
            self._eof = True

    def bytes_needed(self) -> int:
        """At least this many more bytes belong to the header, so a shell reading a socket
        can take exactly the header and leave the relayed stream in the kernel."""
        have = len(self._buffer)
        if have < _FIXED:
            return _FIXED - have
        length: int = struct.unpack_from("!H", self._buffer, 14)[0]
        return max(_FIXED + length - have, 0)

    def next_event(self) -> ProxyHeader | NeedData:
        """The header once complete; NEED_DATA before; raises ProxyProtocolError on bad input."""
        if self.state is not ReaderState.AWAITING_HEADER:
            raise RuntimeError(f"next_event in state {self.state.value}")
        try:
            result = self._parse()
        except ProxyProtocolError:
            self._move(ReaderState.FAILED)
            raise
        if result is NEED_DATA:
            if self._eof:
                self._move(ReaderState.FAILED)
                raise ProxyProtocolError(
                    f"connection closed after {len(self._buffer)} bytes of a PROXY v2 header"
                )
            return NEED_DATA
        self._move(ReaderState.DONE)
        return result

    def _move(self, new: ReaderState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"reader is {self.state.value}, cannot become {new.value}")
        self.state = new

    def _parse(self) -> ProxyHeader | NeedData:
        buffer = bytes(self._buffer)
        _check_signature(buffer)
        if len(buffer) < _FIXED:
            return NEED_DATA
        command, family, transport = _check_fixed(buffer[12], buffer[13])
        (length,) = struct.unpack_from("!H", buffer, 14)
        if length > MAX_PAYLOAD:
            raise ProxyProtocolError(f"PROXY v2 header of {length} bytes exceeds {MAX_PAYLOAD}")
        if len(buffer) < _FIXED + length:
            return NEED_DATA
        payload = buffer[_FIXED : _FIXED + length]
        self.trailing_data = buffer[_FIXED + length :]
        self._buffer.clear()
        return _decode_payload(command, family, transport, payload)


def starts_like_header(data: bytes) -> bool:
    """True when ``data`` (the first bytes of a connection) is, or begins, a v2 signature:
    what a peer that is not a load balancer must not send."""
    return bool(data) and SIGNATURE.startswith(data[: len(SIGNATURE)])


def client_address(header: ProxyHeader, peer: tuple[str, int]) -> tuple[str, int]:
    """Whom the connection is for: the relayed source, or the peer itself (LOCAL, UNSPEC,
    UNIX: §2.2 says to use the real connection endpoints)."""
    return header.source if header.source is not None else peer


def _check_signature(buffer: bytes) -> None:
    """Fail on the first byte that cannot begin a v2 signature (§2.2)."""
    seen = buffer[: len(SIGNATURE)]
    if SIGNATURE.startswith(seen):
        return
    if _V1_PREFIX.startswith(buffer[: len(_V1_PREFIX)]):
        raise ProxyProtocolError("PROXY protocol version 1 (text) is not accepted; send v2")
    raise ProxyProtocolError("no PROXY v2 header: the connection does not start with its signature")


def _check_fixed(version_command: int, family_transport: int) -> tuple[Command, Family, Transport]:
    """Bytes 13 and 14 (§2.2): version 2, a known command, family and transport."""
    if version_command >> 4 != VERSION_2:
        raise ProxyProtocolError(f"PROXY header version {version_command >> 4} is not 2")
    try:
        command = Command(version_command & 0x0F)
    except ValueError:
        raise ProxyProtocolError(f"unknown PROXY v2 command {version_command & 0x0F:#x}") from None
    try:
        family, transport = Family(family_transport >> 4), Transport(family_transport & 0x0F)
    except ValueError:
        raise ProxyProtocolError(
            f"unknown PROXY v2 address family/transport {family_transport:#04x}"
        ) from None
    return command, family, transport


def _decode_payload(
    command: Command, family: Family, transport: Transport, payload: bytes
) -> ProxyHeader:
    size = _ADDRESS_SIZE[family]
    if len(payload) < size:
        raise ProxyProtocolError(
            f"PROXY v2 {family.name} addresses need {size} bytes, the header has {len(payload)}"
        )
    tlvs = _decode_tlvs(payload[size:])
    if command is Command.LOCAL or family in (Family.UNSPEC, Family.UNIX):
        # §2.2: LOCAL and UNSPEC mean "use the real connection endpoints"; UNIX has no IP.
        return ProxyHeader(command, family, transport, tlvs=tlvs)
    if transport is not Transport.STREAM:
        raise ProxyProtocolError(f"a {transport.name} PROXY header on a TCP connection")
    source, destination = _decode_addresses(family, payload[:size])
    return ProxyHeader(command, family, transport, source, destination, tlvs)


def _decode_addresses(family: Family, block: bytes) -> tuple[tuple[str, int], tuple[str, int]]:
    """§2.2: source address, destination address, source port, destination port."""
    width = 4 if family is Family.INET else 16
    src = ipaddress.ip_address(block[:width])
    dst = ipaddress.ip_address(block[width : 2 * width])
    src_port, dst_port = struct.unpack_from("!HH", block, 2 * width)
    return (str(src), src_port), (str(dst), dst_port)


def _decode_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    """§2.2.7: type (1 byte), length (2 bytes, network order), value; they fill the rest."""
    tlvs: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyProtocolError("truncated TLV header in a PROXY v2 header")
        kind, length = data[offset], struct.unpack_from("!H", data, offset + 1)[0]
        end = offset + 3 + length
        if end > len(data):
            raise ProxyProtocolError(f"TLV {kind:#04x} runs past the end of the PROXY v2 header")
        tlvs.append((kind, data[offset + 3 : end]))
        offset = end
    return tuple(tlvs)


def encode(header: ProxyHeader) -> bytes:
    """The wire form of ``header`` (INET/INET6 addresses, or none for LOCAL/UNSPEC)."""
    block = b""
    if header.source is not None and header.destination is not None:
        src, dst = (
            ipaddress.ip_address(header.source[0]),
            ipaddress.ip_address(header.destination[0]),
        )
        if src.version != dst.version:
            raise ValueError("source and destination must be of the same address family")
        block = (
            src.packed + dst.packed + struct.pack("!HH", header.source[1], header.destination[1])
        )
    for kind, value in header.tlvs:
        block += struct.pack("!BH", kind, len(value)) + value
    if len(block) > 0xFFFF:
        raise ValueError("a PROXY v2 header carries at most 65535 bytes after its fixed part")
    fixed = struct.pack(
        "!BBH",
        VERSION_2 << 4 | header.command,
        header.family << 4 | header.transport,
        len(block),
    )
    return SIGNATURE + fixed + block
