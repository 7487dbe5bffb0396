"""SOCKS5 (RFC 1928), sans-IO: the server side, plus a tiny client for tests and the agent.

Only what the tunnel needs: authentication method 0x00 (none), the CONNECT and UDP
ASSOCIATE commands, to IPv4, IPv6 or domain-name destinations. The server is h11-shaped:
``receive_data(bytes)``, ``next_event()`` returning :class:`Greeting` /
:class:`ConnectRequest` / :class:`UDPAssociateRequest` / ``NEED_DATA``, and
``send(event) -> bytes`` for :class:`MethodSelection` and :class:`CommandReply`. The UDP
request header that wraps every relayed datagram (RFC 1928 §7) has its own pair,
:func:`parse_udp_datagram` and :func:`encode_udp_datagram`.
Input errors raise a :class:`Socks5Error` whose ``reply`` is the REP code to answer with
(None during the greeting, where the only safe answer is to close the connection).

Fields are checked in wire order as soon as their byte arrives, so a request fails the
same way whether it comes in one segment or one byte at a time.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum

from certgate.errors import BadRequest
from certgate.protocol.events import NEED_DATA, ConnectionClosed, NeedData, ReceiveBuffer
from certgate.protocol.http_proxy import canonical_hostname

__all__ = [
    "NEED_DATA",
    "SOCKS_VERSION",
    "AddressType",
    "BadVersion",
    "ClientReplyParser",
    "Command",
    "CommandNotSupported",
    "CommandReply",
    "ConnectRequest",
    "ConnectionClosed",
    "Greeting",
    "InvalidAddress",
    "MalformedMessage",
    "Method",
    "MethodSelection",
    "NeedData",
    "ReplyCode",
    "Role",
    "Socks5Error",
    "Socks5Server",
    "State",
    "UDPAssociateRequest",
    "UDPDatagram",
    "UnsupportedAddressType",
    "choose_method",
    "client_connect",
    "client_greeting",
    "client_udp_associate",
    "encode_udp_datagram",
    "error_reply",
    "parse_udp_datagram",
]

SOCKS_VERSION = 0x05


class Method(IntEnum):
    """Authentication methods (RFC 1928 §3); only NO_AUTHENTICATION is implemented."""

    NO_AUTHENTICATION = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE_METHODS = 0xFF


class Command(IntEnum):
    """CMD field of a request (RFC 1928 §4)."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(IntEnum):
    """ATYP field (RFC 1928 §5)."""

    IPV4 = 0x01
    DOMAIN_NAME = 0x03
    IPV6 = 0x04


class ReplyCode(IntEnum):
    """REP field of a reply (RFC 1928 §6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED_BY_RULESET = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class _Default(Enum):
    DEFAULT = "default"


_DEFAULT = _Default.DEFAULT


class Socks5Error(BadRequest):
    """Bad SOCKS5 input. ``reply`` is the REP code to send, or None to just close."""

    default_reply: ReplyCode | None = ReplyCode.GENERAL_FAILURE

    def __init__(self, message: str, *, reply: ReplyCode | _Default | None = _DEFAULT) -> None:
        super().__init__(message)
        self.reply: ReplyCode | None = self.default_reply if reply is _DEFAULT else reply


class BadVersion(Socks5Error):
    """The VER field is not 0x05."""


class MalformedMessage(Socks5Error):
    """A field holds a value RFC 1928 does not allow (reserved byte, zero lengths...)."""


class InvalidAddress(Socks5Error):
    """The destination is not a valid hostname or the port is zero."""


class CommandNotSupported(Socks5Error):
    """BIND or an unknown command (REP 0x07)."""

    default_reply = ReplyCode.COMMAND_NOT_SUPPORTED


class UnsupportedAddressType(Socks5Error):
    """An ATYP other than IPv4, domain name or IPv6 (REP 0x08)."""

    default_reply = ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED


@dataclass(frozen=True, slots=True)
class Greeting:
    """Version identifier/method selection message (RFC 1928 §3)."""

    methods: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A CONNECT request (RFC 1928 §4); ``host`` is canonical (see canonical_hostname)."""

    host: str
    port: int
    atyp: AddressType


@dataclass(frozen=True, slots=True)
class UDPAssociateRequest:
    """A UDP ASSOCIATE request (RFC 1928 §4, §7): where the client expects to send its
    datagrams from (often 0.0.0.0:0, unknown); the reply names the relay's address."""

    host: str
    port: int
    atyp: AddressType


@dataclass(frozen=True, slots=True)
class UDPDatagram:
    """One datagram of an association with its destination or source (RFC 1928 §7)."""

    host: str
    port: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MethodSelection:
    """The server's METHOD selection message (RFC 1928 §3)."""

    method: int


@dataclass(frozen=True, slots=True)
class CommandReply:
    """A reply (RFC 1928 §6); the bound address defaults to 0.0.0.0:0 when undisclosed."""

    code: ReplyCode
    bound_host: str = "0.0.0.0"
    bound_port: int = 0


class State(Enum):
    GREETING = "greeting"  # server: waiting for the client's greeting
    METHOD_SELECTION = "method-selection"  # server: must send it; client: waiting for it
    REQUEST = "request"  # server: waiting for the CONNECT request
    REPLY = "reply"  # server: must send it; client: waiting for it
    DONE = "done"  # tunnel established; further bytes are payload
    CLOSED = "closed"  # refused, or the peer went away: close the connection
    ERROR = "error"  # the peer broke the protocol


class Role(Enum):
    SERVER = "server"
    CLIENT = "client"


_Request = ConnectRequest | UDPAssociateRequest
_Event = Greeting | _Request | MethodSelection | CommandReply | ConnectionClosed

# Where each role may meet a clean end of stream: between messages it is waiting for.
_BOUNDARIES = {
    Role.SERVER: (State.GREETING, State.REQUEST),
    Role.CLIENT: (State.METHOD_SELECTION, State.REPLY),
}


def _next_state(role: Role, state: State, event: _Event) -> State:
    """Every legal transition of both roles, in one place; anything else is a bug."""
    match role, state, event:
        case Role.SERVER, State.GREETING, Greeting():
            return State.METHOD_SELECTION
        case Role.SERVER, State.METHOD_SELECTION, MethodSelection(method=0x00):
            return State.REQUEST
        case Role.CLIENT, State.METHOD_SELECTION, MethodSelection(method=0x00):
            return State.REPLY  # the client sends its request right after
        case _, State.METHOD_SELECTION, MethodSelection(method=0xFF):
            return State.CLOSED  # RFC 1928 §3: no acceptable method, the client closes
        case Role.SERVER, State.REQUEST, ConnectRequest() | UDPAssociateRequest():
            return State.REPLY
        case _, State.REPLY, CommandReply(code=ReplyCode.SUCCEEDED):
            return State.DONE
        case _, State.REPLY, CommandReply():
            return State.CLOSED  # RFC 1928 §6: a failure reply ends the connection
        case _, _, ConnectionClosed() if state in _BOUNDARIES[role]:
            return State.CLOSED
    raise RuntimeError(f"{role.value}: {type(event).__name__} not expected in {state.name}")


class _Reader:
    """A cursor over the buffer that reports a shortage (None) instead of raising."""

    def __init__(self, data: bytearray) -> None:
        self._data = data
        self.offset = 0

    def byte(self) -> int | None:
        if self.offset >= len(self._data):
            return None
        self.offset += 1
        return self._data[self.offset - 1]

    def take(self, count: int) -> bytes | None:
        if self.offset + count > len(self._data):
            return None
        self.offset += count
        return bytes(self._data[self.offset - count : self.offset])


_ParseStep = Callable[[_Reader], _Event | None]


class _Endpoint(ReceiveBuffer):
    """State and error bookkeeping shared by the server and the client parser."""

    def __init__(self, role: Role, state: State) -> None:
        super().__init__()
        self._role = role
        self._state = state
        self._error: Socks5Error | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def trailing_data(self) -> bytes:
        """Bytes after the handshake, once DONE: payload to relay as-is."""
        if self._state is not State.DONE:
            raise RuntimeError(f"no trailing data in state {self._state.name}")
        return bytes(self._buffer)

    def _advance(self, event: _Event) -> None:
        self._state = _next_state(self._role, self._state, event)

    def _run(self, parse: _ParseStep) -> _Event | NeedData:
        """Parse one message from the buffer, consuming its bytes only once it is whole."""
        reader = _Reader(self._buffer)
        try:
            event = parse(reader)
            if event is None:
                return self._out_of_data()
        except Socks5Error as exc:
            if self._role is Role.CLIENT:
                exc.reply = None  # a client has no reply to send: it just closes
            self._error, self._state = exc, State.ERROR
            raise
        del self._buffer[: reader.offset]
        self._advance(event)
        return event

    def _out_of_data(self) -> ConnectionClosed | NeedData:
        if not self._eof:
            return NEED_DATA
        if not self._buffer and self._state in _BOUNDARIES[self._role]:
            self._advance(ConnectionClosed())
            return ConnectionClosed()
        raise MalformedMessage("connection closed in the middle of a message", reply=None)

    def _check_not_failed(self) -> None:
        if self._error is not None:
            raise self._error
        if self._state is State.DONE:
            raise RuntimeError("handshake complete: read trailing_data and relay")


class Socks5Server(_Endpoint):
    """The server side of one SOCKS5 handshake (h11-style sans-IO)."""

    def __init__(self) -> None:
        super().__init__(Role.SERVER, State.GREETING)
        self._offered: tuple[int, ...] = ()

    def next_event(self) -> Greeting | _Request | ConnectionClosed | NeedData:
        self._check_not_failed()
        if self._state is State.CLOSED:
            return ConnectionClosed()
        if self._state is State.GREETING:
            event = self._run(_parse_greeting)
        elif self._state is State.REQUEST:
            event = self._run(_parse_request)
        else:
            raise RuntimeError(f"state {self._state.name}: the server must send first")
        assert isinstance(event, Greeting | _Request | ConnectionClosed | NeedData)
        if isinstance(event, Greeting):
            self._offered = event.methods
        return event

    def send(self, event: MethodSelection | CommandReply) -> bytes:
        """Encode ``event`` and advance; raises RuntimeError if it is not our turn."""
        if isinstance(event, MethodSelection):
            data = _encode_method_selection(event, self._offered)
        else:
            data = _encode_reply(event)
        self._advance(event)
        return data


class ClientReplyParser(_Endpoint):
    """The client side: parses the server's method selection, then its reply."""

    def __init__(self) -> None:
        super().__init__(Role.CLIENT, State.METHOD_SELECTION)

    def next_event(self) -> MethodSelection | CommandReply | ConnectionClosed | NeedData:
        self._check_not_failed()
        if self._state is State.CLOSED:
            return ConnectionClosed()
        step = _parse_method_selection if self._state is State.METHOD_SELECTION else _parse_reply
        event = self._run(step)
        assert isinstance(event, MethodSelection | CommandReply | ConnectionClosed | NeedData)
        return event


def choose_method(greeting: Greeting) -> MethodSelection:
    """No authentication if offered, otherwise 0xFF (RFC 1928 §3: the client must close)."""
    if Method.NO_AUTHENTICATION in greeting.methods:
        return MethodSelection(Method.NO_AUTHENTICATION)
    return MethodSelection(Method.NO_ACCEPTABLE_METHODS)


def error_reply(error: Socks5Error) -> bytes:
    """The bytes to answer ``error`` with before closing (empty: just close)."""
    if error.reply is None:
        return b""
    return _encode_reply(CommandReply(error.reply))


def client_greeting(methods: tuple[int, ...] = (Method.NO_AUTHENTICATION,)) -> bytes:
    """RFC 1928 §3 greeting offering ``methods`` (1-255 of them)."""
    if not 1 <= len(methods) <= 255 or not all(0 <= m <= 0xFF for m in methods):
        raise ValueError("a greeting offers 1-255 methods, each one byte")
    return bytes((SOCKS_VERSION, len(methods), *methods))


def client_udp_associate(host: str = "0.0.0.0", port: int = 0) -> bytes:
    """A UDP ASSOCIATE request (RFC 1928 §4), as a client sends it."""
    return bytes((SOCKS_VERSION, Command.UDP_ASSOCIATE, 0x00)) + _encode_address(host, port)


def client_connect(host: str, port: int) -> bytes:
    """RFC 1928 §4 CONNECT request; Unicode names are sent as IDNA A-labels."""
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535")
    host = host.removeprefix("[").removesuffix("]")
    return bytes((SOCKS_VERSION, Command.CONNECT, 0x00)) + _encode_address(host, port)


# --- parsing: fields in wire order, each checked as soon as its byte is available ---------


def _expect_version(value: int, reply: ReplyCode | None) -> None:
    if value != SOCKS_VERSION:
        raise BadVersion(f"expected SOCKS version 5, got {value:#04x}", reply=reply)


def _parse_greeting(reader: _Reader) -> Greeting | None:
    """RFC 1928 §3: VER, NMETHODS (1-255), METHODS."""
    if (version := reader.byte()) is None:
        return None
    _expect_version(version, reply=None)
    if (count := reader.byte()) is None:
        return None
    if count == 0:
        raise MalformedMessage("greeting offers no methods", reply=None)
    methods = reader.take(count)
    return None if methods is None else Greeting(tuple(methods))


def _parse_request(reader: _Reader) -> _Request | None:
    """RFC 1928 §4: VER, CMD, RSV, ATYP, DST.ADDR, DST.PORT."""
    if (version := reader.byte()) is None:
        return None
    _expect_version(version, reply=ReplyCode.GENERAL_FAILURE)
    if (command := reader.byte()) is None:
        return None
    if command not in (Command.CONNECT, Command.UDP_ASSOCIATE):
        raise CommandNotSupported(f"command {command:#04x} is not supported")
    atyp = _parse_reserved_and_atyp(reader)
    # For UDP ASSOCIATE the address is only where the client expects to send from, which
    # the relay MAY use (§7); clients send placeholders (PySocks: the domain "0"), so it is
    # read but not validated as a destination. Port 0: the client does not know yet.
    associate = command == Command.UDP_ASSOCIATE
    address = None if atyp is None else _parse_address(reader, atyp, strict=not associate)
    if atyp is None or address is None:
        return None
    if associate:
        return UDPAssociateRequest(*address, atyp)
    if address[1] == 0:
        raise InvalidAddress("destination port 0")
    return ConnectRequest(*address, atyp)


def parse_udp_datagram(data: bytes) -> UDPDatagram:
    """RFC 1928 §7: RSV (2), FRAG, ATYP, DST.ADDR, DST.PORT, DATA. Fragments (FRAG != 0)
    are refused: §7 lets an implementation that does not reassemble drop them. Errors carry
    no reply: a bad datagram is dropped, never answered."""
    try:
        return _parse_udp_datagram(data)
    except Socks5Error as exc:
        exc.reply = None
        raise


def _parse_udp_datagram(data: bytes) -> UDPDatagram:
    reader = _Reader(bytearray(data))
    reserved, frag = reader.take(2), reader.byte()
    if reserved is None or frag is None:
        raise MalformedMessage("UDP request header cut short")
    if reserved != b"\x00\x00":
        raise MalformedMessage(f"UDP reserved bytes are {reserved.hex()}, not 0000")
    if frag != 0:
        raise MalformedMessage(f"fragmented datagram (FRAG {frag:#04x})")
    atyp = reader.byte()
    if atyp is None or atyp not in _ADDRESS_TYPES:
        raise UnsupportedAddressType(f"address type {atyp!r} is not supported")
    address = _parse_address(reader, AddressType(atyp))
    if address is None:
        raise MalformedMessage("UDP request header cut short")
    if address[1] == 0:
        raise InvalidAddress("destination port 0")
    return UDPDatagram(*address, data[reader.offset :])


def encode_udp_datagram(datagram: UDPDatagram) -> bytes:
    """The UDP request header (RFC 1928 §7, FRAG 0) and the data."""
    return b"\x00\x00\x00" + _encode_address(datagram.host, datagram.port) + datagram.data


def _parse_method_selection(reader: _Reader) -> MethodSelection | None:
    """RFC 1928 §3: VER, METHOD; we only ever offer no authentication."""
    if (version := reader.byte()) is None:
        return None
    _expect_version(version, reply=None)
    if (method := reader.byte()) is None:
        return None
    if method not in (Method.NO_AUTHENTICATION, Method.NO_ACCEPTABLE_METHODS):
        raise MalformedMessage(f"server selected method {method:#04x}", reply=None)
    return MethodSelection(method)


def _parse_reply(reader: _Reader) -> CommandReply | None:
    """RFC 1928 §6: VER, REP, RSV, ATYP, BND.ADDR, BND.PORT."""
    if (version := reader.byte()) is None:
        return None
    _expect_version(version, reply=None)
    if (code := reader.byte()) is None:
        return None
    if code not in _REPLY_CODES:
        raise MalformedMessage(f"unassigned reply code {code:#04x}", reply=None)
    atyp = _parse_reserved_and_atyp(reader)
    address = None if atyp is None else _parse_address(reader, atyp)
    if address is None:
        return None
    return CommandReply(ReplyCode(code), *address)


_REPLY_CODES = frozenset(code.value for code in ReplyCode)
_ADDRESS_TYPES = frozenset(atyp.value for atyp in AddressType)


def _parse_reserved_and_atyp(reader: _Reader) -> AddressType | None:
    if (reserved := reader.byte()) is None:
        return None
    if reserved != 0x00:
        raise MalformedMessage(f"reserved byte is {reserved:#04x}, not 0x00")
    if (atyp := reader.byte()) is None:
        return None
    if atyp not in _ADDRESS_TYPES:
        raise UnsupportedAddressType(f"address type {atyp:#04x} is not supported")
    return AddressType(atyp)


def _parse_address(
    reader: _Reader, atyp: AddressType, strict: bool = True
) -> tuple[str, int] | None:
    """RFC 1928 §5 address, then the port in network byte order."""
    if atyp is AddressType.DOMAIN_NAME:
        host = _parse_domain(reader, strict)
    else:
        packed = reader.take(4 if atyp is AddressType.IPV4 else 16)
        host = None if packed is None else str(ipaddress.ip_address(packed))
    port = None if host is None else reader.take(2)
    if host is None or port is None:
        return None
    return host, int.from_bytes(port, "big")


def _parse_domain(reader: _Reader, strict: bool = True) -> str | None:
    """One length octet (1-255) then the name, which must be an ASCII/IDNA hostname
    (``strict``; otherwise any bytes, kept as latin-1 text)."""
    if (length := reader.byte()) is None:
        return None
    if length == 0:
        raise InvalidAddress("empty domain name")
    if (raw := reader.take(length)) is None:
        return None
    if not strict:
        return raw.decode("latin-1")
    try:
        return canonical_hostname(raw.decode("ascii"))
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise InvalidAddress(f"invalid domain name {raw[:64]!r}") from exc


# --- encoding -----------------------------------------------------------------------------


def _encode_method_selection(event: MethodSelection, offered: tuple[int, ...]) -> bytes:
    if event.method not in (Method.NO_AUTHENTICATION, Method.NO_ACCEPTABLE_METHODS):
        raise ValueError(f"method {event.method:#04x} is not implemented")
    if event.method == Method.NO_AUTHENTICATION and event.method not in offered:
        raise ValueError("cannot select a method the client did not offer")
    return bytes((SOCKS_VERSION, event.method))


def _encode_reply(reply: CommandReply) -> bytes:
    """RFC 1928 §6: VER, REP, RSV, ATYP, BND.ADDR, BND.PORT."""
    code = ReplyCode(reply.code)
    return bytes((SOCKS_VERSION, code, 0x00)) + _encode_address(reply.bound_host, reply.bound_port)


def _encode_address(host: str, port: int) -> bytes:
    """ATYP, address and port for an IP literal or hostname; raises ValueError if invalid."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range 0-65535")
    port_bytes = port.to_bytes(2, "big")
    if "%" not in host:  # scoped IPv6 addresses (fe80::1%eth0) cannot be sent
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            atyp = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
            return bytes((atyp,)) + address.packed + port_bytes
    name = canonical_hostname(host.encode("idna").decode("ascii")).encode("ascii")
    return bytes((AddressType.DOMAIN_NAME, len(name))) + name + port_bytes
