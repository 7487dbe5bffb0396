"""Transcripts, error vectors and fuzzing for the sans-IO HTTP forward-proxy parser."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certgate.errors import BadRequest
from certgate.protocol import http_proxy
from certgate.protocol.http_proxy import (
    NEED_DATA,
    AmbiguousFraming,
    ConnectionClosed,
    HeaderFieldsTooLarge,
    Headers,
    HTTPProxyError,
    HTTPProxyParser,
    InvalidAppHeader,
    InvalidTarget,
    MalformedRequest,
    ParserState,
    ProxyRequest,
    RequestLineTooLong,
    UnsupportedMethod,
    UnsupportedTransferCoding,
    UnsupportedVersion,
    app_of,
    canonical_hostname,
    error_response,
    origin_request_head,
    response_head,
)

FUZZ = settings(max_examples=300, deadline=None)

Outcome = tuple[Any, ...]


def drive(chunks: Iterable[bytes], *, eof: bool = False, **limits: int) -> Outcome:
    """Feed ``chunks``; the first event (with the trailing data) or error, comparable."""
    parser = HTTPProxyParser(**limits)
    # An empty chunk would mean EOF to receive_data, so only ``eof`` may produce one.
    pending = [chunk for chunk in chunks if chunk] + ([b""] if eof else [])
    try:
        while pending:
            parser.receive_data(pending.pop(0))
            event = parser.next_event()
            if isinstance(event, ProxyRequest):
                for chunk in pending:
                    parser.receive_data(chunk)
                return ("request", event, parser.trailing_data)
            if isinstance(event, ConnectionClosed):
                return ("closed",)
    except HTTPProxyError as exc:
        return ("error", type(exc), exc.status)
    return ("need-data",)


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


SPLITS = {
    "whole": lambda data: [data],
    "bytewise": bytewise,
    "halves": lambda data: [data[: len(data) // 2], data[len(data) // 2 :]],
}


def parse(data: bytes, split: str = "whole", **limits: int) -> tuple[ProxyRequest, bytes]:
    result = drive(SPLITS[split](data), **limits)
    assert result[0] == "request", result
    return result[1], result[2]


# (request bytes, expected ProxyRequest fields, expected trailing data)
VALID_CASES: list[tuple[bytes, dict[str, Any], bytes]] = [
    (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        {"method": "CONNECT", "host": "example.com", "port": 443, "scheme": None, "path": None},
        b"",
    ),
    (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n\x16\x03\x01\x00",
        {"host": "example.com", "port": 443},
        b"\x16\x03\x01\x00",
    ),
    (
        b"CONNECT [2001:DB8::1]:8443 HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\n\r\n",
        {"host": "2001:db8::1", "port": 8443},
        b"",
    ),
    (
        b"CONNECT 10.0.0.1:22 HTTP/1.0\r\n\r\n",
        {"host": "10.0.0.1", "port": 22, "version": "1.0"},
        b"",
    ),
    (
        b"CONNECT Intranet.Corp.:1 HTTP/1.1\r\nHost: intranet.corp\r\nContent-Length: 0\r\n\r\n",
        {"host": "intranet.corp", "port": 1, "content_length": 0},
        b"",
    ),
    (
        b"CONNECT xn--bcher-kva.example:65535 HTTP/1.1\r\nHost: x\r\n\r\n",
        {"host": "xn--bcher-kva.example", "port": 65535},
        b"",
    ),
    (
        b"GET http://Example.COM/a/b?c=d HTTP/1.1\r\nHost: example.com\r\n\r\n",
        {"method": "GET", "host": "example.com", "port": 80, "scheme": "http", "path": "/a/b?c=d"},
        b"",
    ),
    (
        b"GET HTTPS://example.com:8443 HTTP/1.1\r\nHost: example.com\r\n\r\n",
        {"scheme": "https", "port": 8443, "path": "/", "target": "HTTPS://example.com:8443"},
        b"",
    ),
    (
        b"GET http://example.com?q=1 HTTP/1.1\r\nHost: example.com\r\n\r\n",
        {"path": "/?q=1"},
        b"",
    ),
    (
        b"OPTIONS http://example.com HTTP/1.1\r\nHost: example.com\r\n\r\n",
        {"method": "OPTIONS", "path": "*"},  # RFC 9112 §3.2.4
        b"",
    ),
    (
        b"OPTIONS http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n",
        {"path": "/x"},
        b"",
    ),
    (
        b"HEAD http://[::1]:8080/ HTTP/1.0\r\n\r\n",
        {"method": "HEAD", "host": "::1", "port": 8080, "version": "1.0"},
        b"",
    ),
    (
        b"POST http://example.com/f HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        {"method": "POST", "content_length": 5, "chunked": False},
        b"hello",
    ),
    (
        b"PUT http://example.com/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n",
        {"method": "PUT", "content_length": None, "chunked": True},
        b"0\r\n",
    ),
    (
        b"PATCH http://example.com/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
        {"method": "PATCH", "content_length": 3},
        b"abc",
    ),
    (
        b"DELETE http://example.com/ HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n"
        b"Content-Length: 2\r\n\r\n",
        {"method": "DELETE", "content_length": 2},
        b"",
    ),
    (
        b"\r\nGET http://example.com/ HTTP/1.1\r\nHost:\r\n\r\n",  # RFC 9112 §2.2, §7.2 empty Host
        {"method": "GET", "headers": Headers((("Host", ""),))},
        b"",
    ),
    (
        b"GET http://example.com/ HTTP/1.1\r\nHost: a\r\nX-Obs:  caf\xe9\t \r\nX-Empty:\r\n\r\n",
        {"headers": Headers((("Host", "a"), ("X-Obs", "caf\xe9"), ("X-Empty", "")))},
        b"",
    ),
]


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize(("data", "expected", "trailing"), VALID_CASES)
def test_valid_request_heads(
    data: bytes, expected: dict[str, Any], trailing: bytes, split: str
) -> None:
    request, rest = parse(data, split)
    for field, value in expected.items():
        assert getattr(request, field) == value, field
    assert rest == trailing


def _post(*fields: bytes) -> bytes:
    return (
        b"POST http://a/ HTTP/1.1\r\nHost: a\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"
    )


def _connect(*fields: bytes) -> bytes:
    return (
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"
    )


# (request bytes, expected error, expected status)
ERROR_CASES: list[tuple[bytes, type[HTTPProxyError], int]] = [
    # request-line syntax (RFC 9112 §3)
    (b"GET http://a/ HTTP/2.0\r\n", UnsupportedVersion, 505),
    (b"GET http://a/ HTTP/0.9\r\n", UnsupportedVersion, 505),
    (b"GET http://a/ HTTP/1.1x\r\n", MalformedRequest, 400),
    (b"GET http://a/ http/1.1\r\n", MalformedRequest, 400),
    (b"GET  http://a/ HTTP/1.1\r\n", MalformedRequest, 400),
    (b"GET http://a/\tHTTP/1.1\r\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.1 \r\n", MalformedRequest, 400),
    (b"GET(x) http://a/ HTTP/1.1\r\n", MalformedRequest, 400),
    (b"\r\n\r\nGET http://a/ HTTP/1.1\r\n", MalformedRequest, 400),
    (b"GET http://a/\xff HTTP/1.1\r\n", InvalidTarget, 400),
    (b"GET http://a/\x7f HTTP/1.1\r\n", InvalidTarget, 400),
    # methods (RFC 9110 §9.1, §15.5.6, §15.6.2)
    (b"TRACE http://a/ HTTP/1.1\r\n", UnsupportedMethod, 405),
    (b"get http://a/ HTTP/1.1\r\n", UnsupportedMethod, 501),
    (b"BREW coffee://pot HTTP/1.1\r\n", UnsupportedMethod, 501),
    # request-target forms (RFC 9112 §3.2)
    (b"GET /index.html HTTP/1.1\r\n", InvalidTarget, 400),
    (b"OPTIONS * HTTP/1.1\r\n", InvalidTarget, 400),
    (b"GET example.com:80 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"GET ftp://a/ HTTP/1.1\r\n", InvalidTarget, 400),
    (b"GET 1http://a/ HTTP/1.1\r\n", InvalidTarget, 400),
    (b"GET http://user:pw@a/ HTTP/1.1\r\n", InvalidTarget, 400),
    (b"GET http://a/#frag HTTP/1.1\r\n", InvalidTarget, 400),
    (b"GET http:///x HTTP/1.1\r\n", InvalidTarget, 400),
    (b"GET http://a:/ HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT example.com HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT example.com: HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT example.com:0 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT example.com:65536 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT example.com:123456 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT example.com:+443 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT example.com:443:1 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT :443 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT http://a:443/ HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT ::1:443 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT [::1:443 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT [::1]443 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT [fe80::1%25eth0]:443 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT [v1.x]:443 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT [1.2.3.4]:443 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT 127.1:443 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT 0x7f.0.0.1:443 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT 010.0.0.1:443 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT under_score.com:443 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT -a.com:443 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT a..com:443 HTTP/1.1\r\n", InvalidTarget, 400),
    (b"CONNECT xn--a-\xc3.com:443 HTTP/1.1\r\n", InvalidTarget, 400),
    # header fields (RFC 9112 §5, RFC 9110 §5.5)
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: 1\r\n folded\r\n\r\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.1\r\n Host: a\r\n\r\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.1\r\nHost : a\r\n\r\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n: empty-name\r\n\r\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX(y): 1\r\n\r\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: a\nb\r\n\r\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.1\nHost: a\n\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.1\r\rHost: a\r\n\r\n", MalformedRequest, 400),
    (b"GET http://a/\x00 HTTP/1.1\r\n", MalformedRequest, 400),
    # Host (RFC 9112 §3.2)
    (b"GET http://a/ HTTP/1.1\r\n\r\n", MalformedRequest, 400),
    (b"CONNECT a:443 HTTP/1.1\r\nX: 1\r\n\r\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.1\r\nHost: a b\r\n\r\n", MalformedRequest, 400),
    (b"GET http://a/ HTTP/1.1\r\nHost: a:99999\r\n\r\n", MalformedRequest, 400),
    # framing / request smuggling (RFC 9112 §6.1-6.3, RFC 9110 §8.6)
    (_post(b"Content-Length: 3", b"Transfer-Encoding: chunked"), AmbiguousFraming, 400),
    (_post(b"Transfer-Encoding: chunked", b"Content-Length: 0"), AmbiguousFraming, 400),
    (_post(b"Content-Length: 5, 6"), AmbiguousFraming, 400),
    (_post(b"Content-Length: 5", b"Content-Length: 6"), AmbiguousFraming, 400),
    (_post(b"Content-Length: -1"), AmbiguousFraming, 400),
    (_post(b"Content-Length: 1e3"), AmbiguousFraming, 400),
    (_post(b"Content-Length: +5"), AmbiguousFraming, 400),
    (_post(b"Content-Length: 0x5"), AmbiguousFraming, 400),
    (_post(b"Content-Length:"), AmbiguousFraming, 400),
    (_post(b"Content-Length: 5,"), AmbiguousFraming, 400),
    (_post(b"Content-Length: 1234567890123456789"), AmbiguousFraming, 400),
    (_post(b"Transfer-Encoding: gzip"), AmbiguousFraming, 400),
    (_post(b"Transfer-Encoding: chunked, gzip"), AmbiguousFraming, 400),
    (_post(b"Transfer-Encoding:"), AmbiguousFraming, 400),
    (_post(b"Transfer-Encoding: gzip, chunked"), UnsupportedTransferCoding, 501),
    (_post(b"Transfer-Encoding: chunked", b"transfer-encoding: chunked"),
     UnsupportedTransferCoding, 501),
    (_post(b"Transfer-Encoding: chunked;x=1"), AmbiguousFraming, 400),
    (b"POST http://a/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", AmbiguousFraming, 400),
    (_connect(b"Content-Length: 5"), AmbiguousFraming, 400),
    (_connect(b"Transfer-Encoding: chunked"), AmbiguousFraming, 400),
    (_connect(b"Connection: Content-Length"), MalformedRequest, 400),
    (_connect(b"Connection: x, host"), MalformedRequest, 400),
]  # fmt: skip


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize(("data", "error", "status"), ERROR_CASES)
def test_rejected_request_heads(
    data: bytes, error: type[HTTPProxyError], status: int, split: str
) -> None:
    assert drive(SPLITS[split](data)) == ("error", error, status)


def test_request_line_limit_is_inclusive() -> None:
    line = b"CONNECT a:443 HTTP/1.1"
    head = line + b"\r\nHost: a\r\n\r\n"
    assert drive([head], max_request_line=len(line))[0] == "request"
    assert drive([head], max_request_line=len(line) - 1) == ("error", RequestLineTooLong, 414)


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_overlong_request_line_fails_before_its_end_arrives(split: str) -> None:
    data = b"GET http://a/" + b"x" * 200
    expected = ("error", RequestLineTooLong, 414)
    assert drive(SPLITS[split](data), max_request_line=100) == expected
    assert drive(SPLITS[split](data)) == ("need-data",)  # the 8 KiB default is not reached


def test_default_limits() -> None:
    assert HTTPProxyParser().max_header_bytes == 16 * 1024
    assert HTTPProxyParser().max_headers == 100
    assert HTTPProxyParser().max_request_line == 8 * 1024


def _head_with_block(block: bytes) -> bytes:
    return b"CONNECT a:443 HTTP/1.1\r\n" + block


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_header_block_limit_counts_every_field_line_and_the_final_crlf(split: str) -> None:
    block = b"Host: a\r\nX-Pad: " + b"p" * 50 + b"\r\n\r\n"
    data = _head_with_block(block)
    assert drive(SPLITS[split](data), max_header_bytes=len(block))[0] == "request"
    too_small = drive(SPLITS[split](data), max_header_bytes=len(block) - 1)
    assert too_small == ("error", HeaderFieldsTooLarge, 431)


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_endless_header_line_fails_at_the_limit(split: str) -> None:
    data = _head_with_block(b"Host: a\r\nX: " + b"v" * 500)
    assert drive(SPLITS[split](data), max_header_bytes=200) == ("error", HeaderFieldsTooLarge, 431)


def test_default_header_block_limit_is_16_kib() -> None:
    padding = b"X-Pad: " + b"p" * (16 * 1024) + b"\r\n"
    assert drive([_head_with_block(b"Host: a\r\n" + padding + b"\r\n")])[1] is HeaderFieldsTooLarge


def test_header_count_limit() -> None:
    fields = b"Host: a\r\n" + b"X: 1\r\n" * 2
    assert drive([_head_with_block(fields + b"\r\n")], max_headers=3)[0] == "request"
    assert drive([_head_with_block(fields + b"X: 1\r\n\r\n")], max_headers=3) == (
        "error",
        HeaderFieldsTooLarge,
        431,
    )


def test_default_header_count_limit_is_100() -> None:
    fields = b"Host: a\r\n" + b"X: 1\r\n" * 99
    assert drive([_head_with_block(fields + b"\r\n")])[0] == "request"
    assert drive([_head_with_block(fields + b"X: 1\r\n\r\n")])[1] is HeaderFieldsTooLarge


def test_parser_states_follow_the_head() -> None:
    parser = HTTPProxyParser()
    assert parser.state is ParserState.REQUEST_LINE
    parser.receive_data(b"CONNECT a:443 HTTP/1.1\r\nHo")
    assert parser.next_event() is NEED_DATA
    assert parser.state is ParserState.HEADERS
    parser.receive_data(b"st: a\r\n\r\nearly")
    assert isinstance(parser.next_event(), ProxyRequest)
    assert parser.state is ParserState.DONE
    parser.receive_data(b" bytes")
    assert parser.trailing_data == b"early bytes"
    with pytest.raises(RuntimeError, match="already been parsed"):
        parser.next_event()


def test_clean_close_before_a_request_is_not_an_error() -> None:
    parser = HTTPProxyParser()
    parser.receive_data(b"")
    assert parser.next_event() == ConnectionClosed()
    assert parser.next_event() == ConnectionClosed()
    assert parser.state is ParserState.CLOSED
    with pytest.raises(RuntimeError, match="after EOF"):
        parser.receive_data(b"GET")


@pytest.mark.parametrize("partial", [b"C", b"CONNECT a:443 HTTP/1.1\r\n", b"\r\n", b"X\r"])
def test_close_in_the_middle_of_a_head_is_malformed(partial: bytes) -> None:
    if partial == b"\r\n":
        assert drive([partial], eof=True) == ("closed",)  # only an ignorable empty line
    else:
        assert drive([partial], eof=True) == ("error", MalformedRequest, 400)


def test_errors_are_sticky() -> None:
    parser = HTTPProxyParser()
    parser.receive_data(b"TRACE http://a/ HTTP/1.1\r\n")
    with pytest.raises(UnsupportedMethod) as first:
        parser.next_event()
    assert parser.state is ParserState.ERROR
    with pytest.raises(UnsupportedMethod) as again:
        parser.next_event()
    assert again.value is first.value


def test_trailing_data_only_once_done() -> None:
    parser = HTTPProxyParser()
    parser.receive_data(b"CONNECT a:443 HTTP/1.1\r\n")
    with pytest.raises(RuntimeError, match="no trailing data"):
        _ = parser.trailing_data


def test_error_family() -> None:
    for error in (
        MalformedRequest,
        InvalidTarget,
        AmbiguousFraming,
        InvalidAppHeader,
        RequestLineTooLong,
        HeaderFieldsTooLarge,
        UnsupportedMethod,
        UnsupportedTransferCoding,
        UnsupportedVersion,
    ):
        assert issubclass(error, HTTPProxyError)
        assert issubclass(error, BadRequest)
    assert MalformedRequest("x").status == HTTPStatus.BAD_REQUEST
    assert MalformedRequest("x", status=HTTPStatus.FORBIDDEN).status == 403


# --- Headers ------------------------------------------------------------------------------


def test_headers_are_a_case_insensitive_multidict() -> None:
    headers = Headers((("Accept", "a"), ("X-Multi", "1"), ("x-multi", "2")))
    assert headers.get("ACCEPT") == "a"
    assert headers.get_all("X-MULTI") == ["1", "2"]
    assert headers.get("x-multi") == "1, 2"  # RFC 9110 §5.3 combination
    assert headers.get("missing") is None
    assert "accept" in headers
    assert "missing" not in headers
    assert 1 not in headers
    assert len(headers) == 3
    assert list(headers) == [("Accept", "a"), ("X-Multi", "1"), ("x-multi", "2")]
    assert headers.without(["X-MULTI"]) == Headers((("Accept", "a"),))


# --- app_of -------------------------------------------------------------------------------


def _connect_with(*fields: bytes) -> ProxyRequest:
    return parse(_connect(*fields))[0]


def test_app_of_names_the_bundle() -> None:
    assert app_of(_connect_with(b"Certgate-App: com.example.mail")) == "com.example.mail"
    assert app_of(_connect_with(b"certgate-app: Com.Example-2")) == "Com.Example-2"
    assert app_of(_connect_with()) is None


@pytest.mark.parametrize(
    "fields",
    [
        (b"Certgate-App: com.a", b"Certgate-App: com.b"),
        (b"Certgate-App: com.example:evil",),
        (b"Certgate-App: .com.example",),
        (b"Certgate-App:",),
        (b"Certgate-App: com example",),
        (b"Certgate-App: " + b"a" * 256,),
    ],
)
def test_app_of_rejects_bad_bundle_ids(fields: tuple[bytes, ...]) -> None:
    with pytest.raises(InvalidAppHeader) as caught:
        app_of(_connect_with(*fields))
    assert caught.value.status == 400


# --- forwarding: origin-form head ---------------------------------------------------------


def _forward(head: bytes, **kwargs: Any) -> bytes:
    return origin_request_head(parse(head)[0], **kwargs)


def _h11_server_view(data: bytes) -> h11.Request:
    """Parse with an independent implementation to prove the forwarded head is valid."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    event = server.next_event()
    assert isinstance(event, h11.Request)
    return event


def test_forwarded_head_drops_hop_by_hop_and_proxy_fields() -> None:
    head = (
        b"GET http://example.com:8080/p?q HTTP/1.1\r\n"
        b"Host: wrong.example\r\n"
        b"Connection: keep-alive, X-Hop\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"X-Hop: secret\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\n"
        b"Upgrade: websocket\r\n"
        b"Certgate-App: com.example\r\n"
        b"Certgate-Transport: tcp\r\n"
        b"Accept: */*\r\n"
        b"Via: 1.1 upstream\r\n\r\n"
    )
    assert _forward(head) == (
        b"GET /p?q HTTP/1.1\r\n"
        b"Host: example.com:8080\r\n"
        b"Accept: */*\r\n"
        b"Via: 1.1 upstream\r\n"
        b"Via: 1.1 certgate\r\n"
        b"Connection: close\r\n\r\n"
    )


def test_forwarded_head_is_valid_http11() -> None:
    head = b"POST http://[2001:db8::5]/up HTTP/1.0\r\nContent-Length: 4, 4\r\nX: caf\xe9\r\n\r\n"
    forwarded = _forward(head, via="gw-1", close=False)
    request = _h11_server_view(forwarded)
    assert request.method == b"POST"
    assert request.target == b"/up"
    assert request.http_version == b"1.1"
    assert list(request.headers) == [
        (b"host", b"[2001:db8::5]"),
        (b"x", b"caf\xe9"),
        (b"content-length", b"4"),
        (b"via", b"1.0 gw-1"),
    ]


def test_forwarded_head_keeps_chunked_framing_and_default_ports() -> None:
    head = (
        b"PUT https://example.com:443/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    request = _h11_server_view(_forward(head))
    assert (b"host", b"example.com") in list(request.headers)
    assert (b"transfer-encoding", b"chunked") in list(request.headers)


def test_forwarded_options_uses_asterisk_form() -> None:
    request = _h11_server_view(_forward(b"OPTIONS http://a HTTP/1.1\r\nHost: a\r\n\r\n"))
    assert request.target == b"*"


def test_connect_is_not_forwarded() -> None:
    with pytest.raises(ValueError, match="tunnelled"):
        _forward(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n")


# --- response heads -----------------------------------------------------------------------


def _h11_client_view(response: bytes, method: bytes = b"CONNECT") -> h11.Response:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="a:443", headers=[("Host", "a")]))
    client.receive_data(response)
    event = client.next_event()
    assert isinstance(event, h11.Response)
    return event


def test_connection_established() -> None:
    head = response_head(200, "Connection established")
    assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert _h11_client_view(head).status_code == 200


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (403, b"Forbidden"),
        (407, b"Proxy Authentication Required"),
        (502, b"Bad Gateway"),
        (504, b"Gateway Timeout"),
        (599, b""),
    ],
)
def test_response_head_default_reasons(status: int, reason: bytes) -> None:
    head = response_head(status, headers=[("Content-Length", "0")])
    assert head == b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\n\r\n" % (status, reason)
    assert _h11_client_view(head).status_code == status


@pytest.mark.parametrize(
    ("status", "reason", "headers"),
    [
        (99, None, []),
        (600, None, []),
        (200, "Bad\r\nInjected: 1", []),
        (200, None, [("Bad Name", "v")]),
        (200, None, [("X", "v\r\nInjected: 1")]),
        (200, None, [("X", "v\x00")]),
    ],
)
def test_response_head_refuses_injection(
    status: int, reason: str | None, headers: list[tuple[str, str]]
) -> None:
    with pytest.raises(ValueError):
        response_head(status, reason, headers)


def test_error_response_closes_and_advertises_allowed_methods() -> None:
    response = error_response(UnsupportedMethod("no TRACE"))
    parsed = _h11_client_view(response)
    assert parsed.status_code == 405
    assert (b"allow", b"CONNECT, GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS") in list(
        parsed.headers
    )
    assert error_response(HeaderFieldsTooLarge("big")) == (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    )


# --- hostnames ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("192.0.2.1", "192.0.2.1"),
        ("localhost", "localhost"),
        ("a-b.c0", "a-b.c0"),
        ("1a.example", "1a.example"),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
    ],
)
def test_canonical_hostname(name: str, canonical: str) -> None:
    assert canonical_hostname(name) == canonical


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "a..b",
        ".a",
        "a.b..",
        "-a",
        "a-",
        "a_b",
        "a b",
        "bücher.example",
        "a" * 64,
        ".".join(["a" * 63] * 4),  # 255 characters
        "1.2.3",
        "127.1",
        "256.1.1.1",
        "01.2.3.4",
        "0x7f.0.0.1",
        "xn--",
        "xn--abc-",
        "xn--ls8h-",  # decodes to ASCII only: not a real A-label
        "xn--zzzzzzzzzzzzzzzzzzzz",  # not Punycode at all
    ],
)
def test_canonical_hostname_rejects(name: str) -> None:
    with pytest.raises(ValueError):
        canonical_hostname(name)


# --- properties ---------------------------------------------------------------------------

SEEDS = [case[0] for case in VALID_CASES] + [case[0] for case in ERROR_CASES[::4]]


@st.composite
def mutated_heads(draw: st.DrawFn) -> bytes:
    """A known head with a few bytes inserted, deleted or replaced: reaches deep states."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, len(data)))
        byte = draw(st.sampled_from(b"\r\n\x00 \t:,[]@#/%x9"))
        match draw(st.sampled_from(["insert", "delete", "replace"])):
            case "insert":
                data.insert(position, byte)
            case "delete":
                del data[position : position + 1]
            case _:
                data[position : position + 1] = bytes((byte,))
    return bytes(data)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@FUZZ
@given(st.binary(max_size=600) | mutated_heads(), st.booleans())
def test_fuzz_fails_only_with_the_module_errors(data: bytes, eof: bool) -> None:
    outcome = drive([data], eof=eof, max_header_bytes=400, max_headers=8, max_request_line=200)
    assert outcome[0] in {"request", "error", "need-data", "closed"}


@FUZZ
@given(st.binary(max_size=400) | mutated_heads(), st.lists(st.integers(0, 1000), max_size=8))
def test_outcome_does_not_depend_on_segmentation(data: bytes, cuts: list[int]) -> None:
    limits = {"max_header_bytes": 300, "max_headers": 6, "max_request_line": 150}
    assert drive(_split(data, cuts), **limits) == drive([data], **limits)
    assert drive(bytewise(data), **limits) == drive([data], **limits)


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_NAME = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(_LABEL, min_size=0, max_size=4),
    st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True),
)
_HOSTS = st.one_of(
    _NAME,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda address: f"[{address}]"),
)


@FUZZ
@given(_HOSTS, st.integers(1, 65535), st.sampled_from(["1.0", "1.1"]))
def test_connect_round_trip(host: str, port: int, version: str) -> None:
    head = f"CONNECT {host}:{port} HTTP/{version}\r\nHost: {host}:{port}\r\n\r\n".encode()
    request, _ = parse(head)
    assert (request.host, request.port, request.version) == (host.strip("[]"), port, version)


def _origin_form(method: str, path: str) -> str:
    """RFC 9112 §3.2.1 and §3.2.4, restated: what an absolute-form path forwards as."""
    if not path:
        return "*" if method == "OPTIONS" else "/"
    return path if path.startswith("/") else "/" + path


@FUZZ
@given(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    st.sampled_from(["http", "https"]),
    _HOSTS,
    st.integers(1, 65535),
    st.from_regex(r"(/[A-Za-z0-9._~%!$&'()*+,;=:@-]*)*(\?[A-Za-z0-9/?=&]*)?", fullmatch=True),
)
def test_absolute_form_round_trip_through_h11(
    method: str, scheme: str, host: str, port: int, path: str
) -> None:
    head = f"{method} {scheme}://{host}:{port}{path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    request, _ = parse(head)
    expected_path = _origin_form(method, path)
    assert (request.scheme, request.host, request.port, request.path) == (
        scheme,
        host.strip("[]"),
        port,
        expected_path,
    )
    forwarded = _h11_server_view(origin_request_head(request))
    assert forwarded.target == expected_path.encode()


def test_public_surface() -> None:
    for name in http_proxy.__all__:
        assert hasattr(http_proxy, name), name
    defined = {
        name
        for name, value in vars(http_proxy).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == http_proxy.__name__
    }
    assert defined <= set(http_proxy.__all__)
