"""Transcripts, error vectors and fuzzing for the sans-IO SOCKS5 codec (RFC 1928)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.provisional import domains

from certgate.errors import BadRequest
from certgate.protocol import socks5
from certgate.protocol.socks5 import (
    NEED_DATA,
    AddressType,
    BadVersion,
    ClientReplyParser,
    CommandNotSupported,
    CommandReply,
    ConnectionClosed,
    ConnectRequest,
    Greeting,
    InvalidAddress,
    MalformedMessage,
    Method,
    MethodSelection,
    ReplyCode,
    Socks5Error,
    Socks5Server,
    State,
    UDPAssociateRequest,
    UDPDatagram,
    UnsupportedAddressType,
    choose_method,
    client_connect,
    client_greeting,
    client_udp_associate,
    encode_udp_datagram,
    error_reply,
    parse_udp_datagram,
)

FUZZ = settings(max_examples=300, deadline=None)

NO_AUTH_GREETING = b"\x05\x01\x00"
NULL_BOUND = b"\x01\x00\x00\x00\x00\x00\x00"  # ATYP IPv4, 0.0.0.0, port 0


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def serve(chunks: Iterable[bytes], *, eof: bool = False) -> tuple[Any, ...]:
    """Run a server that accepts what it can; the transcript of events, bytes out and end."""
    server = Socks5Server()
    pending = [chunk for chunk in chunks if chunk] + ([b""] if eof else [])
    transcript: list[Any] = []
    try:
        while pending and server.state in (State.GREETING, State.REQUEST):
            server.receive_data(pending.pop(0))
            _serve_available(server, transcript)
    except Socks5Error as exc:
        return (*transcript, (type(exc), exc.reply))
    for chunk in pending:
        server.receive_data(chunk)
    rest = server.trailing_data if server.state is State.DONE else None
    return (*transcript, server.state, rest)


def _serve_available(server: Socks5Server, transcript: list[Any]) -> None:
    while server.state in (State.GREETING, State.REQUEST):
        event = server.next_event()
        if event is NEED_DATA:
            return
        transcript.append(event)
        if isinstance(event, ConnectionClosed):
            return
        if isinstance(event, Greeting):
            transcript.append(server.send(choose_method(event)))
        else:
            transcript.append(server.send(CommandReply(ReplyCode.SUCCEEDED)))


SPLITS = {
    "whole": lambda data: [data],
    "bytewise": bytewise,
    "halves": lambda data: [data[: len(data) // 2], data[len(data) // 2 :]],
}


def _request(atyp_and_address: bytes, port: bytes = b"\x01\xbb", command: int = 1) -> bytes:
    return bytes((5, command, 0)) + atyp_and_address + port


SUCCESS_REPLY = b"\x05\x00\x00" + NULL_BOUND

# (client bytes, expected transcript): events and server output in order, then end state.
TRANSCRIPTS: list[tuple[bytes, tuple[Any, ...]]] = [
    (
        NO_AUTH_GREETING + _request(b"\x01\xc0\x00\x02\x01") + b"\x16\x03\x01",
        (
            Greeting((0,)),
            b"\x05\x00",
            ConnectRequest("192.0.2.1", 443, AddressType.IPV4),
            SUCCESS_REPLY,
            State.DONE,
            b"\x16\x03\x01",
        ),
    ),
    (
        b"\x05\x03\x02\x01\x00" + _request(b"\x03\x0bExample.COM", b"\x00\x50"),
        (
            Greeting((2, 1, 0)),
            b"\x05\x00",
            ConnectRequest("example.com", 80, AddressType.DOMAIN_NAME),
            SUCCESS_REPLY,
            State.DONE,
            b"",
        ),
    ),
    (
        NO_AUTH_GREETING + _request(b"\x04" + bytes(15) + b"\x01", b"\xff\xff"),
        (
            Greeting((0,)),
            b"\x05\x00",
            ConnectRequest("::1", 65535, AddressType.IPV6),
            SUCCESS_REPLY,
            State.DONE,
            b"",
        ),
    ),
    (
        NO_AUTH_GREETING + _request(b"\x03\x16xn--bcher-kva.example."),
        (
            Greeting((0,)),
            b"\x05\x00",
            ConnectRequest("xn--bcher-kva.example", 443, AddressType.DOMAIN_NAME),
            SUCCESS_REPLY,
            State.DONE,
            b"",
        ),
    ),
    (
        NO_AUTH_GREETING + _request(b"\x03\x0810.1.2.3"),  # IP literal sent as a name
        (
            Greeting((0,)),
            b"\x05\x00",
            ConnectRequest("10.1.2.3", 443, AddressType.DOMAIN_NAME),
            SUCCESS_REPLY,
            State.DONE,
            b"",
        ),
    ),
    (
        b"\x05\x02\x02\x01",  # no acceptable method: 0xFF, then the client must close
        (Greeting((2, 1)), b"\x05\xff", State.CLOSED, None),
    ),
    (NO_AUTH_GREETING, (Greeting((0,)), b"\x05\x00", State.REQUEST, None)),
    (b"\x05\x02\x00", (State.GREETING, None)),
    (
        NO_AUTH_GREETING + _request(b"\x03\x05ab"),
        (Greeting((0,)), b"\x05\x00", State.REQUEST, None),
    ),
]


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize(("data", "expected"), TRANSCRIPTS)
def test_server_transcripts(data: bytes, expected: tuple[Any, ...], split: str) -> None:
    assert serve(SPLITS[split](data)) == expected


HANDSHAKE = (Greeting((0,)), b"\x05\x00")
GENERAL = ReplyCode.GENERAL_FAILURE

# (client bytes, expected error, the REP code the shell must send, or None to just close)
ERROR_CASES: list[tuple[bytes, type[Socks5Error], ReplyCode | None]] = [
    # greeting (RFC 1928 §3)
    (b"\x04\x01\x00", BadVersion, None),
    (b"GET / HTTP/1.1\r\n", BadVersion, None),
    (b"\x00", BadVersion, None),
    (b"\x05\x00", MalformedMessage, None),
    # request header (RFC 1928 §4)
    (NO_AUTH_GREETING + b"\x04\x01\x00\x01", BadVersion, GENERAL),
    (NO_AUTH_GREETING + b"\x05\x02", CommandNotSupported, ReplyCode.COMMAND_NOT_SUPPORTED),
    (NO_AUTH_GREETING + b"\x05\x00", CommandNotSupported, ReplyCode.COMMAND_NOT_SUPPORTED),
    (NO_AUTH_GREETING + b"\x05\xff", CommandNotSupported, ReplyCode.COMMAND_NOT_SUPPORTED),
    (NO_AUTH_GREETING + b"\x05\x01\x01", MalformedMessage, GENERAL),
    (NO_AUTH_GREETING + b"\x05\x01\x00\x00", UnsupportedAddressType, ReplyCode(8)),
    (NO_AUTH_GREETING + b"\x05\x01\x00\x02", UnsupportedAddressType, ReplyCode(8)),
    (NO_AUTH_GREETING + b"\x05\x01\x00\x05", UnsupportedAddressType, ReplyCode(8)),
    # destination (RFC 1928 §5)
    (NO_AUTH_GREETING + _request(b"\x01\x7f\x00\x00\x01", b"\x00\x00"), InvalidAddress, GENERAL),
    (NO_AUTH_GREETING + b"\x05\x01\x00\x03\x00", InvalidAddress, GENERAL),
    (NO_AUTH_GREETING + _request(b"\x03\x04a..b"), InvalidAddress, GENERAL),
    (NO_AUTH_GREETING + _request(b"\x03\x03-ab"), InvalidAddress, GENERAL),
    (NO_AUTH_GREETING + _request(b"\x03\x03a b"), InvalidAddress, GENERAL),
    (NO_AUTH_GREETING + _request(b"\x03\x03a_b"), InvalidAddress, GENERAL),
    (NO_AUTH_GREETING + _request(b"\x03\x05127.1"), InvalidAddress, GENERAL),
    (NO_AUTH_GREETING + _request(b"\x03\x03::1"), InvalidAddress, GENERAL),
    (NO_AUTH_GREETING + _request(b"\x03\x05\xc3\xa9.fr"), InvalidAddress, GENERAL),
    (NO_AUTH_GREETING + _request(b"\x03\x02a\x00"), InvalidAddress, GENERAL),
    (NO_AUTH_GREETING + _request(b"\x03\x07xn--zz."), InvalidAddress, GENERAL),
    (NO_AUTH_GREETING + _request(b"\x03\xff" + b"a." * 127 + b"b"), InvalidAddress, GENERAL),
]


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize(("data", "error", "reply"), ERROR_CASES)
def test_server_rejects(
    data: bytes, error: type[Socks5Error], reply: ReplyCode | None, split: str
) -> None:
    transcript = serve(SPLITS[split](data))
    assert transcript[-1] == (error, reply)
    assert transcript[:-1] in ((), HANDSHAKE)


@pytest.mark.parametrize(
    ("error", "wire"),
    [
        (BadVersion("greeting", reply=None), b""),
        (CommandNotSupported("bind"), b"\x05\x07\x00" + NULL_BOUND),
        (UnsupportedAddressType("atyp"), b"\x05\x08\x00" + NULL_BOUND),
        (MalformedMessage("rsv"), b"\x05\x01\x00" + NULL_BOUND),
    ],
)
def test_error_reply(error: Socks5Error, wire: bytes) -> None:
    assert error_reply(error) == wire


def test_errors_are_bad_requests_carrying_a_reply_code() -> None:
    for error in (BadVersion, MalformedMessage, InvalidAddress):
        assert issubclass(error, Socks5Error)
        assert error("x").reply is ReplyCode.GENERAL_FAILURE
    assert CommandNotSupported("x").reply is ReplyCode.COMMAND_NOT_SUPPORTED
    assert UnsupportedAddressType("x").reply is ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
    assert issubclass(Socks5Error, BadRequest)


def _server_awaiting_reply() -> Socks5Server:
    server = Socks5Server()
    server.receive_data(NO_AUTH_GREETING + _request(b"\x01\x0a\x00\x00\x01"))
    greeting = server.next_event()
    assert isinstance(greeting, Greeting)
    server.send(choose_method(greeting))
    assert isinstance(server.next_event(), ConnectRequest)
    return server


@pytest.mark.parametrize("code", list(ReplyCode))
def test_reply_encoding_for_every_code(code: ReplyCode) -> None:
    server = _server_awaiting_reply()
    assert server.send(CommandReply(code)) == bytes((5, code, 0)) + NULL_BOUND
    assert server.state is (State.DONE if code is ReplyCode.SUCCEEDED else State.CLOSED)


@pytest.mark.parametrize(
    ("host", "port", "wire"),
    [
        ("10.9.8.7", 1080, b"\x01\x0a\x09\x08\x07\x04\x38"),
        ("2001:db8::2", 1, b"\x04\x20\x01\x0d\xb8" + bytes(10) + b"\x00\x02\x00\x01"),
        ("Gw.Example", 443, b"\x03\x0agw.example\x01\xbb"),
    ],
)
def test_reply_bound_address(host: str, port: int, wire: bytes) -> None:
    reply = _server_awaiting_reply().send(CommandReply(ReplyCode.SUCCEEDED, host, port))
    assert reply == b"\x05\x00\x00" + wire


@pytest.mark.parametrize(("host", "port"), [("a..b", 1), ("fe80::1%eth0", 1), ("1.2.3.4", 65536)])
def test_reply_refuses_unencodable_bound_address(host: str, port: int) -> None:
    server = _server_awaiting_reply()
    with pytest.raises(ValueError):
        server.send(CommandReply(ReplyCode.SUCCEEDED, host, port))
    assert server.state is State.REPLY


def test_server_refuses_out_of_turn_calls() -> None:
    server = Socks5Server()
    with pytest.raises(RuntimeError, match="not expected in GREETING"):
        server.send(CommandReply(ReplyCode.SUCCEEDED))
    server.receive_data(b"\x05\x01\x02")
    greeting = server.next_event()
    with pytest.raises(RuntimeError, match="must send first"):
        server.next_event()
    with pytest.raises(ValueError, match="did not offer"):
        server.send(MethodSelection(Method.NO_AUTHENTICATION))
    with pytest.raises(ValueError, match="not implemented"):
        server.send(MethodSelection(Method.USERNAME_PASSWORD))
    assert isinstance(greeting, Greeting)
    assert server.send(choose_method(greeting)) == b"\x05\xff"
    assert server.next_event() == ConnectionClosed()


def test_done_server_hands_over_payload() -> None:
    server = _server_awaiting_reply()
    server.receive_data(b"early")
    with pytest.raises(RuntimeError, match="no trailing data"):
        _ = server.trailing_data
    server.send(CommandReply(ReplyCode.SUCCEEDED))
    server.receive_data(b" bytes")
    assert server.trailing_data == b"early bytes"
    with pytest.raises(RuntimeError, match="handshake complete"):
        server.next_event()


def test_server_errors_are_sticky() -> None:
    server = Socks5Server()
    server.receive_data(b"\x04")
    with pytest.raises(BadVersion) as first:
        server.next_event()
    assert server.state is State.ERROR
    with pytest.raises(BadVersion) as again:
        server.next_event()
    assert again.value is first.value


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", (ConnectionClosed(), State.CLOSED, None)),
        (NO_AUTH_GREETING, (*HANDSHAKE, ConnectionClosed(), State.CLOSED, None)),
        (b"\x05", ((MalformedMessage, None),)),
        (NO_AUTH_GREETING + b"\x05\x01\x00\x01\x7f", (*HANDSHAKE, (MalformedMessage, None))),
    ],
)
def test_server_eof(data: bytes, expected: tuple[Any, ...]) -> None:
    assert serve([data], eof=True) == expected


def test_receive_after_eof_is_a_bug() -> None:
    server = Socks5Server()
    server.receive_data(b"")
    with pytest.raises(RuntimeError, match="after EOF"):
        server.receive_data(b"\x05")


# --- client side --------------------------------------------------------------------------


def test_client_greeting() -> None:
    assert client_greeting() == b"\x05\x01\x00"
    assert client_greeting((0, 2)) == b"\x05\x02\x00\x02"


@pytest.mark.parametrize("methods", [(), tuple(range(256)), (256,), (-1,)])
def test_client_greeting_refuses_impossible_offers(methods: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        client_greeting(methods)


@pytest.mark.parametrize(
    ("host", "port", "wire"),
    [
        ("192.0.2.1", 443, b"\x01\xc0\x00\x02\x01\x01\xbb"),
        ("2001:db8::1", 80, b"\x04\x20\x01\x0d\xb8" + bytes(11) + b"\x01\x00\x50"),
        ("[::1]", 22, b"\x04" + bytes(15) + b"\x01\x00\x16"),
        ("Mail.Example.org.", 25, b"\x03\x10mail.example.org\x00\x19"),
        ("bücher.example", 443, b"\x03\x15xn--bcher-kva.example\x01\xbb"),
    ],
)
def test_client_connect(host: str, port: int, wire: bytes) -> None:
    assert client_connect(host, port) == b"\x05\x01\x00" + wire


@pytest.mark.parametrize(
    ("host", "port"),
    [("a.com", 0), ("a.com", 65536), ("a..com", 1), ("a_b", 1), ("", 1), ("x" * 64, 1)],
)
def test_client_connect_refuses_bad_destinations(host: str, port: int) -> None:
    with pytest.raises(ValueError):
        client_connect(host, port)


def read_replies(chunks: Iterable[bytes], *, eof: bool = False) -> tuple[Any, ...]:
    parser = ClientReplyParser()
    pending = [chunk for chunk in chunks if chunk] + ([b""] if eof else [])
    transcript: list[Any] = []
    try:
        while pending and parser.state in (State.METHOD_SELECTION, State.REPLY):
            parser.receive_data(pending.pop(0))
            while parser.state in (State.METHOD_SELECTION, State.REPLY):
                event = parser.next_event()
                if event is NEED_DATA:
                    break
                transcript.append(event)
    except Socks5Error as exc:
        return (*transcript, (type(exc), exc.reply))
    for chunk in pending:
        parser.receive_data(chunk)
    rest = parser.trailing_data if parser.state is State.DONE else None
    return (*transcript, parser.state, rest)


CLIENT_TRANSCRIPTS: list[tuple[bytes, tuple[Any, ...]]] = [
    (
        b"\x05\x00" + SUCCESS_REPLY + b"payload",
        (MethodSelection(0), CommandReply(ReplyCode.SUCCEEDED), State.DONE, b"payload"),
    ),
    (
        b"\x05\x00\x05\x05\x00\x03\x02gw\x04\x38",
        (
            MethodSelection(0),
            CommandReply(ReplyCode.CONNECTION_REFUSED, "gw", 1080),
            State.CLOSED,
            None,
        ),
    ),
    (b"\x05\xff", (MethodSelection(0xFF), State.CLOSED, None)),
    (b"\x05\x00\x05\x00\x00\x04", (MethodSelection(0), State.REPLY, None)),
    (b"\x04\x00", ((BadVersion, None),)),
    (b"\x05\x02", ((MalformedMessage, None),)),
    (b"\x05\x00\x04\x00", (MethodSelection(0), (BadVersion, None))),
    (b"\x05\x00\x05\x09", (MethodSelection(0), (MalformedMessage, None))),
    (b"\x05\x00\x05\x00\x01", (MethodSelection(0), (MalformedMessage, None))),
    (b"\x05\x00\x05\x00\x00\x07", (MethodSelection(0), (UnsupportedAddressType, None))),
    (b"\x05\x00\x05\x00\x00\x03\x02-x", (MethodSelection(0), (InvalidAddress, None))),
]


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize(("data", "expected"), CLIENT_TRANSCRIPTS)
def test_client_reply_parser(data: bytes, expected: tuple[Any, ...], split: str) -> None:
    assert read_replies(SPLITS[split](data)) == expected


def test_client_reply_parser_eof() -> None:
    assert read_replies([b""], eof=True) == (ConnectionClosed(), State.CLOSED, None)
    assert read_replies([b"\x05"], eof=True) == ((MalformedMessage, None),)


# --- properties ---------------------------------------------------------------------------


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


SEEDS = [case[0] for case in TRANSCRIPTS + ERROR_CASES]


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, max(0, len(data) - 1)))
        data[position : position + 1] = bytes((draw(st.integers(0, 255)),))
    return bytes(data)


@FUZZ
@given(st.binary(max_size=300) | mutated_messages(), st.booleans())
def test_fuzz_server_fails_only_with_socks5_errors(data: bytes, eof: bool) -> None:
    serve([data], eof=eof)  # catches Socks5Error only: anything else fails the test


@FUZZ
@given(st.binary(max_size=300) | mutated_messages(), st.booleans())
def test_fuzz_client_fails_only_with_socks5_errors(data: bytes, eof: bool) -> None:
    read_replies([data], eof=eof)  # catches Socks5Error only: anything else fails the test


@FUZZ
@given(st.binary(max_size=200) | mutated_messages(), st.lists(st.integers(0, 400), max_size=6))
def test_outcome_does_not_depend_on_segmentation(data: bytes, cuts: list[int]) -> None:
    assert serve(_split(data, cuts)) == serve([data])
    assert serve(bytewise(data)) == serve([data])
    assert read_replies(_split(data, cuts)) == read_replies([data])


@FUZZ
@given(st.lists(st.integers(0, 255), min_size=1, max_size=255))
def test_greeting_round_trip(methods: list[int]) -> None:
    server = Socks5Server()
    server.receive_data(client_greeting(tuple(methods)))
    assert server.next_event() == Greeting(tuple(methods))


_DESTINATIONS = st.one_of(
    st.ip_addresses(v=4).map(lambda a: (str(a), str(a), AddressType.IPV4)),
    st.ip_addresses(v=6).map(lambda a: (str(a), str(a), AddressType.IPV6)),
    domains(max_length=253).map(lambda d: (d, d.lower(), AddressType.DOMAIN_NAME)),
)


@FUZZ
@given(_DESTINATIONS, st.integers(1, 65535), st.binary(max_size=8))
def test_connect_round_trip(
    destination: tuple[str, str, AddressType], port: int, payload: bytes
) -> None:
    host, canonical, atyp = destination
    wire = client_greeting() + client_connect(host, port) + payload
    assert serve([wire]) == (
        *HANDSHAKE,
        ConnectRequest(canonical, port, atyp),
        SUCCESS_REPLY,
        State.DONE,
        payload,
    )


@FUZZ
@given(st.sampled_from(list(ReplyCode)), _DESTINATIONS, st.integers(0, 65535))
def test_reply_round_trip(
    code: ReplyCode, destination: tuple[str, str, AddressType], port: int
) -> None:
    host, canonical, _ = destination
    reply = _server_awaiting_reply().send(CommandReply(code, host, port))
    end = State.DONE if code is ReplyCode.SUCCEEDED else State.CLOSED
    assert read_replies([b"\x05\x00" + reply]) == (
        MethodSelection(0),
        CommandReply(code, canonical, port),
        end,
        b"" if end is State.DONE else None,
    )


def test_public_surface() -> None:
    for name in socks5.__all__:
        assert hasattr(socks5, name), name
    defined = {
        name
        for name, value in vars(socks5).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == socks5.__name__
    }
    assert defined <= set(socks5.__all__)


# -- UDP ASSOCIATE (RFC 1928 §4, §7) -------------------------------------------------------


def test_udp_associate_transcript() -> None:
    server = Socks5Server()
    server.receive_data(NO_AUTH_GREETING + client_udp_associate())
    assert server.next_event() == Greeting((0,))
    assert server.send(MethodSelection(0)) == b"\x05\x00"
    assert server.next_event() == UDPAssociateRequest("0.0.0.0", 0, AddressType.IPV4)
    reply = server.send(CommandReply(ReplyCode.SUCCEEDED, "127.0.0.1", 4242))
    assert reply == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x10\x92"
    assert server.state is State.DONE
    assert client_udp_associate() == b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"


def test_udp_associate_takes_a_placeholder_address() -> None:
    """PySocks names the domain "0" and its local port: advisory (§7), so accepted."""
    server = Socks5Server()
    server.receive_data(NO_AUTH_GREETING + b"\x05\x03\x00\x03\x010\x9c\x40")
    assert server.next_event() == Greeting((0,))
    server.send(MethodSelection(0))
    assert server.next_event() == UDPAssociateRequest("0", 40000, AddressType.DOMAIN_NAME)


UDP_VECTORS = [
    (b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35dns?", UDPDatagram("127.0.0.1", 53, b"dns?")),
    (b"\x00\x00\x00\x03\x05a.com\x01\xbb", UDPDatagram("a.com", 443, b"")),
    (b"\x00\x00\x00\x04" + bytes(15) + b"\x01\x00\x35x", UDPDatagram("::1", 53, b"x")),
]


@pytest.mark.parametrize(("wire", "datagram"), UDP_VECTORS)
def test_udp_datagram_vectors(wire: bytes, datagram: UDPDatagram) -> None:
    assert parse_udp_datagram(wire) == datagram
    assert encode_udp_datagram(datagram) == wire


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"\x00\x00",
        b"\x00\x01\x00\x01\x7f\x00\x00\x01\x00\x35",  # reserved bytes set
        b"\x00\x00\x01\x01\x7f\x00\x00\x01\x00\x35",  # a fragment
        b"\x00\x00\x00\x02\x7f\x00\x00\x01\x00\x35",  # no such ATYP
        b"\x00\x00\x00\x01\x7f\x00\x00",  # address cut short
        b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x00",  # port 0
        b"\x00\x00\x00\x03\x03a b\x00\x35",  # not a host name
    ],
)
def test_bad_udp_headers_are_refused(wire: bytes) -> None:
    with pytest.raises(Socks5Error) as caught:
        parse_udp_datagram(wire)
    assert caught.value.reply is None  # a datagram is dropped, never answered


@given(st.binary(max_size=300))
def test_udp_header_fuzz_fails_cleanly(data: bytes) -> None:
    try:
        datagram = parse_udp_datagram(data)
    except Socks5Error:
        return
    assert 1 <= datagram.port <= 65535
    assert encode_udp_datagram(datagram).endswith(datagram.data)
