"""Server side of an HTTP/1.1 forward-proxy request head, sans-IO.

Bytes go in with ``receive_data``; ``next_event`` returns a :class:`ProxyRequest` once a
whole request head has arrived, ``NEED_DATA`` while it has not, or raises an
:class:`HTTPProxyError` carrying the status the shell should answer with. Only the head is
parsed: for CONNECT the bytes after it are tunnel data, for absolute-form requests they are
the start of the body; either way the shell forwards ``trailing_data`` verbatim.

Accepted forms (RFC 9112 §3.2): authority-form for CONNECT (RFC 9110 §9.3.6) and
absolute-form for GET/HEAD/POST/PUT/DELETE/PATCH/OPTIONS. Parsing is strict on purpose:
anything a downstream server might read differently (obs-fold, bare CR, NUL, conflicting
framing) is rejected rather than repaired, which is what closes request smuggling.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from http import HTTPStatus

from certgate.errors import BadRequest
from certgate.pki.identity import BUNDLE_ID_RE
from certgate.protocol.datagram import TRANSPORT_HEADER
from certgate.protocol.events import NEED_DATA, ConnectionClosed, NeedData, ReceiveBuffer

__all__ = [
    "APP_HEADER",
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_REQUEST_LINE",
    "HOP_BY_HOP_HEADERS",
    "NEED_DATA",
    "PROXY_METHODS",
    "AmbiguousFraming",
    "ConnectionClosed",
    "HTTPProxyError",
    "HTTPProxyParser",
    "HeaderFieldsTooLarge",
    "Headers",
    "InvalidAppHeader",
    "InvalidTarget",
    "MalformedRequest",
    "NeedData",
    "ParserState",
    "ProxyRequest",
    "RequestLineTooLong",
    "UnsupportedMethod",
    "UnsupportedTransferCoding",
    "UnsupportedVersion",
    "app_of",
    "canonical_hostname",
    "error_response",
    "origin_request_head",
    "response_head",
]

DEFAULT_MAX_HEADER_BYTES = 16 * 1024
DEFAULT_MAX_HEADERS = 100
# RFC 9112 §3: recipients should support request-lines of at least 8000 octets.
DEFAULT_MAX_REQUEST_LINE = 8 * 1024

APP_HEADER = "Certgate-App"
PROXY_METHODS = ("CONNECT", "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
# Methods registered by RFC 9110 §9 / RFC 5789 that a proxy recognises but refuses (405);
# any other token is unrecognised (501, RFC 9110 §15.6.2).
_KNOWN_METHODS = frozenset((*PROXY_METHODS, "TRACE"))

# RFC 9110 §7.6.1 hop-by-hop fields, plus credentials and directives meant for this proxy
# only (RFC 9110 §11.7.2 Proxy-Authorization) and the Per-App Tunnel's app and transport
# headers.
HOP_BY_HOP_HEADERS = frozenset(
    (
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        APP_HEADER.lower(),
        TRANSPORT_HEADER.lower(),
    )
)
# RFC 9110 §7.6.1: a connection option must not name a field meant for every recipient;
# honouring "Connection: content-length" would let a client strip framing downstream.
_PROTECTED_FROM_CONNECTION = frozenset(("host", "content-length"))

_DEFAULT_PORTS = {"http": 80, "https": 443}
_LEADING_EMPTY_LINES_ALLOWED = 1  # RFC 9112 §2.2: ignore at least one CRLF before the line

# RFC 9110 §5.6.2 token; RFC 9112 §2.3 HTTP-version; RFC 9110 §5.5 field-value characters.
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION_RE = re.compile(rb"HTTP/([0-9])\.([0-9])")
_TARGET_RE = re.compile(rb"[\x21-\x7e]+")
_FIELD_VALUE_RE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_DIGITS_RE = re.compile(r"[0-9]{1,18}")  # bounded: int() of huge strings is slow or raises
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_OWS = " \t"


class HTTPProxyError(BadRequest):
    """A request head the proxy refuses; ``status`` is the response the shell should send."""

    default_status = HTTPStatus.BAD_REQUEST

    def __init__(self, message: str, *, status: HTTPStatus | None = None) -> None:
        super().__init__(message)
        self.status: HTTPStatus = status if status is not None else self.default_status


class MalformedRequest(HTTPProxyError):
    """The head does not follow RFC 9112 syntax (400)."""


class InvalidTarget(HTTPProxyError):
    """The request-target is not the form a proxy accepts for this method (400)."""


class AmbiguousFraming(HTTPProxyError):
    """Content-Length/Transfer-Encoding could be read two ways: request smuggling (400)."""


class InvalidAppHeader(HTTPProxyError):
    """The Certgate-App header is repeated or not a valid bundle id (400)."""


class RequestLineTooLong(HTTPProxyError):
    """The request-line exceeds the configured limit (414, RFC 9112 §3)."""

    default_status = HTTPStatus.REQUEST_URI_TOO_LONG


class HeaderFieldsTooLarge(HTTPProxyError):
    """Too many header fields or too many header bytes (431, RFC 6585 §5)."""

    default_status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE


class UnsupportedMethod(HTTPProxyError):
    """405 for a method this proxy refuses, 501 for one it does not recognise."""

    default_status = HTTPStatus.METHOD_NOT_ALLOWED


class UnsupportedTransferCoding(HTTPProxyError):
    """A transfer coding other than chunked (501, RFC 9112 §6.1)."""

    default_status = HTTPStatus.NOT_IMPLEMENTED


class UnsupportedVersion(HTTPProxyError):
    """Only HTTP/1.0 and HTTP/1.1 are spoken here (505, RFC 9110 §15.6.6)."""

    default_status = HTTPStatus.HTTP_VERSION_NOT_SUPPORTED


@dataclass(frozen=True, slots=True)
class Headers:
    """An ordered, case-insensitive multi-dict of header fields; names keep their case."""

    fields: tuple[tuple[str, str], ...] = ()

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self.get_all(name))

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for field, value in self.fields if field.lower() == wanted]

    def get(self, name: str) -> str | None:
        """All values of ``name`` combined as RFC 9110 §5.3 allows, or None if absent."""
        values = self.get_all(name)
        return ", ".join(values) if values else None

    def without(self, names: Iterable[str]) -> Headers:
        dropped = {name.lower() for name in names}
        return Headers(tuple(f for f in self.fields if f[0].lower() not in dropped))


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """One parsed proxy request head.

    ``path`` is the origin-form (RFC 9112 §3.2.1) target to forward, or None for CONNECT;
    ``scheme`` is None for CONNECT. ``host`` is canonical: lower-case name without a
    trailing dot, or an IP address without brackets. ``content_length`` and ``chunked``
    give the body framing, already checked to be unambiguous (RFC 9112 §6.3).
    """

    method: str
    target: str
    host: str
    port: int
    scheme: str | None
    path: str | None
    headers: Headers
    version: str
    content_length: int | None = None
    chunked: bool = False


class ParserState(Enum):
    """Where the parser is in the head; DONE, CLOSED and ERROR are final."""

    REQUEST_LINE = "request-line"
    HEADERS = "headers"
    DONE = "done"
    CLOSED = "closed"
    ERROR = "error"


# Every legal move of the parser; _set_state refuses anything else.
_TRANSITIONS = {
    ParserState.REQUEST_LINE: {ParserState.HEADERS, ParserState.CLOSED, ParserState.ERROR},
    ParserState.HEADERS: {ParserState.DONE, ParserState.ERROR},
    ParserState.DONE: set(),
    ParserState.CLOSED: set(),
    ParserState.ERROR: set(),
}


@dataclass(frozen=True, slots=True)
class _RequestLine:
    method: str
    target: str
    version: str
    scheme: str | None
    host: str
    port: int
    path: str | None


class HTTPProxyParser(ReceiveBuffer):
    """Parse one proxy request head from bytes (h11's receive_data / next_event model)."""

    def __init__(
        self,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_request_line: int = DEFAULT_MAX_REQUEST_LINE,
    ) -> None:
        super().__init__()
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_request_line = max_request_line
        self._state = ParserState.REQUEST_LINE
        self._scanned = 0  # bytes of the current partial line already checked
        self._error: HTTPProxyError | None = None
        self._empty_lines = 0
        self._request_line: _RequestLine | None = None
        self._fields: list[tuple[str, str]] = []
        self._header_bytes = 0

    @property
    def state(self) -> ParserState:
        return self._state

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the request head: tunnel data or body, to forward as-is."""
        if self._state is not ParserState.DONE:
            raise RuntimeError(f"no trailing data in state {self._state.name}")
        return bytes(self._buffer)

    def next_event(self) -> ProxyRequest | ConnectionClosed | NeedData:
        if self._state is ParserState.ERROR:
            assert self._error is not None
            raise self._error
        if self._state is ParserState.DONE:
            raise RuntimeError("the request head has already been parsed")
        if self._state is ParserState.CLOSED:
            return ConnectionClosed()
        try:
            return self._parse()
        except HTTPProxyError as exc:
            self._error = exc
            self._set_state(ParserState.ERROR)
            raise

    def _set_state(self, new: ParserState) -> None:
        if new not in _TRANSITIONS[self._state]:
            raise RuntimeError(f"illegal transition {self._state.name} -> {new.name}")
        self._state = new

    def _parse(self) -> ProxyRequest | ConnectionClosed | NeedData:
        while True:
            line = self._take_line()
            if line is None:
                return self._out_of_data()
            if self._state is ParserState.REQUEST_LINE:
                self._on_request_line(line)
            elif line:
                self._on_field_line(line)
            else:
                request = self._finish()
                self._set_state(ParserState.DONE)
                return request

    def _out_of_data(self) -> ConnectionClosed | NeedData:
        if not self._eof:
            return NEED_DATA
        if self._state is ParserState.REQUEST_LINE and not self._buffer:
            self._set_state(ParserState.CLOSED)
            return ConnectionClosed()
        raise MalformedRequest("connection closed in the middle of the request head")

    def _line_limit(self) -> tuple[int, type[HTTPProxyError]]:
        if self._state is ParserState.REQUEST_LINE:
            return self.max_request_line, RequestLineTooLong
        return self.max_header_bytes - self._header_bytes - 2, HeaderFieldsTooLarge

    def _take_line(self) -> bytes | None:
        """The next CRLF-terminated line (without CRLF), or None if it is incomplete."""
        limit, too_long = self._line_limit()
        end = self._buffer.find(b"\r\n", self._scanned)
        if end >= 0:
            stop = end
        else:  # a final CR may be the first half of CRLF: judge it when the next byte comes
            stop = len(self._buffer) - self._buffer.endswith(b"\r")
        # Check only as far as a byte-at-a-time feed gets before the length limit trips,
        # so the error raised never depends on how the bytes were split into segments.
        _reject_bad_bytes(bytes(self._buffer[self._scanned : min(stop, limit + 1)]))
        if stop > limit:
            raise too_long(f"{self._state.value} longer than {limit} bytes")
        if end < 0:
            self._scanned = stop
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        self._scanned = 0
        return line

    def _on_request_line(self, line: bytes) -> None:
        if not line and self._empty_lines < _LEADING_EMPTY_LINES_ALLOWED:
            self._empty_lines += 1
            return
        self._request_line = _parse_request_line(line)
        self._set_state(ParserState.HEADERS)

    def _on_field_line(self, line: bytes) -> None:
        self._header_bytes += len(line) + 2
        if len(self._fields) >= self.max_headers:
            raise HeaderFieldsTooLarge(f"more than {self.max_headers} header fields")
        self._fields.append(_parse_field_line(line))

    def _finish(self) -> ProxyRequest:
        assert self._request_line is not None
        return _build_request(self._request_line, Headers(tuple(self._fields)))


def _reject_bad_bytes(data: bytes) -> None:
    """RFC 9112 §2.2: no bare CR or LF; RFC 9110 §5.5: no NUL anywhere in the head."""
    if b"\x00" in data:
        raise MalformedRequest("NUL byte in request head")
    if b"\n" in data:
        raise MalformedRequest("bare LF in request head")
    if b"\r" in data:
        raise MalformedRequest("bare CR in request head")


def _parse_request_line(line: bytes) -> _RequestLine:
    """RFC 9112 §3: method SP request-target SP HTTP-version, single spaces only."""
    parts = line.split(b" ")
    if len(parts) != 3:
        raise MalformedRequest("request-line must be: method SP request-target SP version")
    method, target, version = parts
    version_match = _VERSION_RE.fullmatch(version)
    if version_match is None:
        raise MalformedRequest("malformed HTTP-version")
    if version_match.group(1, 2) not in ((b"1", b"0"), (b"1", b"1")):
        raise UnsupportedVersion(f"HTTP/{version[5:].decode()} is not supported")
    if _TOKEN_RE.fullmatch(method) is None:
        raise MalformedRequest("method is not a token")
    if _TARGET_RE.fullmatch(target) is None:
        raise InvalidTarget("request-target must be visible ASCII")
    return _parse_target(method.decode("ascii"), target.decode("ascii"), version[5:].decode())


def _parse_target(method: str, target: str, version: str) -> _RequestLine:
    """RFC 9112 §3.2.3 authority-form for CONNECT, §3.2.2 absolute-form otherwise."""
    _check_method(method)
    if method == "CONNECT":
        host, port = _parse_authority(target, default_port=None)
        return _RequestLine(method, target, version, None, host, port, None)
    scheme, host, port, path = _parse_absolute_form(target, method)
    return _RequestLine(method, target, version, scheme, host, port, path)


def _parse_field_line(line: bytes) -> tuple[str, str]:
    """RFC 9112 §5: field-name ":" OWS field-value OWS."""
    if line[:1] in (b" ", b"\t"):
        # RFC 9112 §5.2 obs-fold, or §2.2 whitespace before the first field: reject both.
        raise MalformedRequest("obs-fold or leading whitespace in header field")
    name, colon, value = line.partition(b":")
    if not colon:
        raise MalformedRequest("header field without a colon")
    if _TOKEN_RE.fullmatch(name) is None:
        # RFC 9112 §5.1: whitespace between field name and colon must be rejected (400).
        raise MalformedRequest("invalid header field name")
    value = value.strip(b" \t")
    if _FIELD_VALUE_RE.fullmatch(value) is None:
        raise MalformedRequest("control character in header field value")
    return name.decode("ascii"), value.decode("latin-1")


def _build_request(line: _RequestLine, headers: Headers) -> ProxyRequest:
    _check_host_header(headers, line.version)
    _check_connection_options(headers)
    content_length, chunked = _framing(headers, line.version)
    if line.method == "CONNECT" and (chunked or content_length):
        # RFC 9110 §9.3.6: CONNECT has no content; the bytes after the head are the tunnel.
        raise AmbiguousFraming("CONNECT request must not have content")
    return ProxyRequest(
        method=line.method,
        target=line.target,
        host=line.host,
        port=line.port,
        scheme=line.scheme,
        path=line.path,
        headers=headers,
        version=line.version,
        content_length=content_length,
        chunked=chunked,
    )


def _check_method(method: str) -> None:
    if method in PROXY_METHODS:
        return
    if method in _KNOWN_METHODS:
        raise UnsupportedMethod(f"method {method} is not allowed through this proxy")
    raise UnsupportedMethod(
        f"method {method[:32]!r} is not recognised", status=HTTPStatus.NOT_IMPLEMENTED
    )


def _check_host_header(headers: Headers, version: str) -> None:
    """RFC 9112 §3.2: exactly one valid Host in HTTP/1.1, at most one in HTTP/1.0."""
    hosts = headers.get_all("host")
    if len(hosts) > 1:
        raise MalformedRequest("more than one Host header field")
    if not hosts:
        if version == "1.1":
            raise MalformedRequest("HTTP/1.1 request without a Host header field")
        return
    # An empty Host is legal (RFC 9110 §7.2). Its value is ignored for routing: a proxy
    # uses the request-target instead (RFC 9112 §3.2.2), but must still reject garbage.
    if hosts[0]:
        _parse_authority(hosts[0], default_port=0, error=MalformedRequest)


def _check_connection_options(headers: Headers) -> None:
    named = _connection_options(headers)
    if named & _PROTECTED_FROM_CONNECTION:
        raise MalformedRequest("Connection header names an end-to-end field")


def _connection_options(headers: Headers) -> set[str]:
    """Field names listed in Connection (RFC 9110 §7.6.1), lower-case."""
    return {
        option.strip(_OWS).lower()
        for value in headers.get_all("connection")
        for option in value.split(",")
        if option.strip(_OWS)
    }


def _framing(headers: Headers, version: str) -> tuple[int | None, bool]:
    """RFC 9112 §6.1-6.3: (Content-Length, chunked), refusing every ambiguous combination."""
    lengths = headers.get_all("content-length")
    codings = headers.get_all("transfer-encoding")
    if codings and lengths:
        raise AmbiguousFraming("both Transfer-Encoding and Content-Length present")
    if codings:
        if version == "1.0":
            raise AmbiguousFraming("Transfer-Encoding in an HTTP/1.0 request")
        _check_transfer_codings(codings)
        return None, True
    if lengths:
        return _content_length(lengths), False
    return None, False


def _check_transfer_codings(values: list[str]) -> None:
    codings = [c.strip(_OWS).lower() for v in values for c in v.split(",") if c.strip(_OWS)]
    if not codings or codings[-1] != "chunked":
        raise AmbiguousFraming("chunked is not the final transfer coding")
    if codings != ["chunked"]:
        # We relay chunked bodies byte for byte; other codings would need decoding.
        raise UnsupportedTransferCoding(f"unsupported transfer coding in {values!r}")


def _content_length(values: list[str]) -> int:
    """RFC 9110 §8.6: 1*DIGIT; identical repeats may be merged, differing ones are fatal."""
    items = [item.strip(_OWS) for value in values for item in value.split(",")]
    if not all(_DIGITS_RE.fullmatch(item) for item in items):
        raise AmbiguousFraming("invalid Content-Length")
    lengths = {int(item) for item in items}
    if len(lengths) != 1:
        raise AmbiguousFraming("conflicting Content-Length values")
    return lengths.pop()


def _parse_absolute_form(target: str, method: str) -> tuple[str, str, int, str]:
    """RFC 9112 §3.2.2 absolute-form -> (scheme, host, port, origin-form path)."""
    scheme, sep, rest = target.partition("://")
    if not sep or _SCHEME_RE.fullmatch(scheme) is None:
        raise InvalidTarget(f"{method} through a proxy needs an absolute-form target")
    scheme = scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise InvalidTarget(f"unsupported scheme {scheme[:16]!r}")
    if "#" in rest:
        raise InvalidTarget("request-target must not contain a fragment")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if "@" in authority:
        # RFC 9110 §4.2.4: userinfo in an http(s) URI is to be treated as an error.
        raise InvalidTarget("userinfo is not allowed in the request-target")
    host, port = _parse_authority(authority, default_port=_DEFAULT_PORTS[scheme])
    return scheme, host, port, _origin_form_path(path, method)


def _origin_form_path(path: str, method: str) -> str:
    if not path and method == "OPTIONS":
        return "*"  # RFC 9112 §3.2.4: empty path, no query, OPTIONS -> asterisk-form
    if not path.startswith("/"):
        return "/" + path  # RFC 9112 §3.2.1: an empty path is sent as "/"
    return path


def _parse_authority(
    text: str, *, default_port: int | None, error: type[HTTPProxyError] = InvalidTarget
) -> tuple[str, int]:
    """``host[:port]`` (RFC 3986 §3.2) with bracketed IPv6; port required if no default."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise error("unterminated IPv6 literal")
        host_text, rest = text[1:end], text[end + 1 :]
    else:
        host_text, colon, port_text = text.partition(":")
        rest = colon + port_text
    try:
        host = _ipv6(host_text) if text.startswith("[") else canonical_hostname(host_text)
    except ValueError as exc:
        raise error(f"invalid host in {text[:300]!r}") from exc
    return host, _port(rest, default_port, error)


def _port(rest: str, default_port: int | None, error: type[HTTPProxyError]) -> int:
    if not rest and default_port is not None:
        return default_port
    if not rest.startswith(":") or _PORT_RE.fullmatch(rest[1:]) is None:
        raise error("authority must be host:port")
    port = int(rest[1:])
    if not 1 <= port <= 65535:
        raise error(f"port {port} out of range 1-65535")
    return port


def _ipv6(text: str) -> str:
    # No zone identifiers (RFC 6874) or IPvFuture: nothing here needs them.
    if "%" in text:
        raise ValueError("zone identifiers are not accepted")
    return str(ipaddress.IPv6Address(text))


# Pure and called twice a request (target and Host): the same few intranet names repeat.
@functools.lru_cache(maxsize=4096)
def canonical_hostname(name: str) -> str:
    """A DNS hostname (RFC 1123 §2.1 LDH labels) or dotted-quad IPv4, in canonical form.

    Lower-cases and drops one trailing dot so that rules match one spelling. A name whose
    last label is all digits is refused unless it is a strict dotted quad (RFC 3696 §2):
    resolvers read ``127.1`` or ``0x7f.1`` as addresses, which would dodge IP rules.
    ``xn--`` labels must be valid Punycode (RFC 5891 §4.4). Raises ValueError.
    """
    try:
        return str(ipaddress.IPv4Address(name))
    except ValueError:
        pass
    lowered = name.lower().removesuffix(".")
    if not lowered.isascii() or not 0 < len(lowered) <= 253:
        raise ValueError(f"invalid hostname length or characters: {name[:300]!r}")
    labels = lowered.split(".")
    for label in labels:
        _check_label(label)
    if labels[-1].isdigit():
        raise ValueError(f"numeric top-level label: {name!r}")
    return lowered


def _check_label(label: str) -> None:
    if _LABEL_RE.fullmatch(label) is None:
        raise ValueError(f"invalid hostname label {label[:64]!r}")
    if label.startswith("xn--"):
        try:
            decoded = label[4:].encode("ascii").decode("punycode")
        except (UnicodeError, ValueError, IndexError, OverflowError) as exc:
            raise ValueError(f"invalid Punycode label {label!r}") from exc
        # RFC 5891 §5.4: an A-label must be the exact encoding of a non-ASCII U-label.
        if decoded.isascii() or decoded.encode("punycode") != label[4:].encode("ascii"):
            raise ValueError(f"not a canonical A-label: {label!r}")


def app_of(request: ProxyRequest) -> str | None:
    """The Per-App Tunnel bundle id from ``Certgate-App``, None if absent; raises if bad."""
    values = request.headers.get_all(APP_HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidAppHeader(f"more than one {APP_HEADER} header field")
    if BUNDLE_ID_RE.fullmatch(values[0]) is None:
        raise InvalidAppHeader(f"invalid bundle id in {APP_HEADER}: {values[0][:300]!r}")
    return values[0]


def _authority_for_host_header(request: ProxyRequest) -> str:
    host = f"[{request.host}]" if ":" in request.host else request.host
    if request.scheme is not None and _DEFAULT_PORTS[request.scheme] == request.port:
        return host
    return f"{host}:{request.port}"


def origin_request_head(
    request: ProxyRequest, *, via: str = "certgate", close: bool = True
) -> bytes:
    """The head to send upstream for an absolute-form request (RFC 9110 §7.6).

    Host is rebuilt from the target (RFC 9112 §3.2.2); hop-by-hop fields, the fields
    named in Connection, proxy credentials and Certgate-App are dropped (RFC 9110
    §7.6.1); Via is added (RFC 9110 §7.6.3).
    """
    if request.path is None or request.scheme is None:
        raise ValueError("CONNECT requests are tunnelled, not forwarded")
    framing = {"host", "content-length"}
    dropped = HOP_BY_HOP_HEADERS | _connection_options(request.headers) | framing
    fields = [("Host", _authority_for_host_header(request))]
    fields += [(n, v) for n, v in request.headers if n.lower() not in dropped]
    # Framing is re-declared in one canonical spelling ("3, 3" becomes "3"); the shell
    # relays the body unchanged, chunked or not.
    if request.content_length is not None:
        fields.append(("Content-Length", str(request.content_length)))
    if request.chunked:
        fields.append(("Transfer-Encoding", "chunked"))
    fields.append(("Via", f"{request.version} {via}"))
    if close:
        fields.append(("Connection", "close"))
    start = f"{request.method} {request.path} HTTP/1.1\r\n".encode("ascii")
    return start + _encode_fields(fields)


def response_head(
    status: int, reason: str | None = None, headers: Iterable[tuple[str, str]] = ()
) -> bytes:
    """An HTTP/1.1 response head, e.g. ``response_head(200, "Connection established")``."""
    if not 100 <= status <= 599:
        raise ValueError(f"status {status} out of range 100-599")
    phrase = (reason if reason is not None else _default_reason(status)).encode("latin-1")
    if _FIELD_VALUE_RE.fullmatch(phrase) is None:  # RFC 9112 §4 reason-phrase
        raise ValueError("reason phrase contains control characters")
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase) + _encode_fields(headers)


def _default_reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _encode_fields(fields: Iterable[tuple[str, str]]) -> bytes:
    out = bytearray()
    for name, value in fields:
        name_bytes, value_bytes = name.encode("ascii"), value.encode("latin-1")
        if _TOKEN_RE.fullmatch(name_bytes) is None:
            raise ValueError(f"invalid header name {name!r}")
        if _FIELD_VALUE_RE.fullmatch(value_bytes) is None:
            raise ValueError(f"control character in value of {name!r}")
        out += name_bytes + b": " + value_bytes + b"\r\n"
    return bytes(out + b"\r\n")


def error_response(error: HTTPProxyError) -> bytes:
    """The complete response for a refused request; the shell then closes the connection."""
    fields = [("Content-Length", "0"), ("Connection", "close")]
    if error.status == HTTPStatus.METHOD_NOT_ALLOWED:
        fields.append(("Allow", ", ".join(PROXY_METHODS)))  # RFC 9110 §15.5.6
    return response_head(error.status, headers=fields)
