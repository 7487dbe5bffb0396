"""The tunnel's KDC proxy (MS-KKDCP) for devices of the group, reached through the tunnel.

A device asks by ``CONNECT kdc-proxy.certgate.invalid:88`` (``KDC_PROXY_HOST``, a name
that never resolves) on the Per-App Tunnel, followed at once by one frame: a 4-byte
big-endian length and a ``KDC-PROXY-MESSAGE`` (DER, decoded by PyPI ``kdcproxy``'s
codec, never by hand). The node admits the request like any tunnel request, then asks the
KDCs the group's policy names for the message's realm (``kerberos: {realm: [KDC]}``),
each only if the server traffic rules allow that KDC's address and transport, and
answers ``200`` followed by one frame holding the encoded reply, or a denial (status and
``certgate: reason`` body) like any refused CONNECT. Sizes and waits are bounded
(``KDCLimits``). See docs/CONVENTIONS.md, "KDC proxy".
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kdcproxy import codec
from kdcproxy.exceptions import ParsingError

from certgate.tunnel.rules import Transport
from certgate.tunnel.sockets import IPAddress, TLSBlocked, TLSEnd, Want, ip_literal

KDC_PROXY_HOST = "kdc-proxy.certgate.invalid"
KDC_PROXY_PORT = 88
_FRAME = struct.Struct("!I")
# In the syntax JSON Schema shares: the console's settings schema publishes them.
REALM_PATTERN = r"[A-Za-z0-9._-]{1,255}"
KDC_HOST_PATTERN = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]{1,253})"
_REALM_RE = re.compile(REALM_PATTERN)
_KDC_RE = re.compile(rf"(?:(tcp|udp)/)?{KDC_HOST_PATTERN}(?::(\d{{1,5}}))?")


@dataclass(frozen=True, slots=True)
class KDCLimits:
    max_message: int = 128 * 1024  # as kdcproxy's own server (KDCProxyApp.MAX_LENGTH)
    kdc_timeout_s: float = 5.0  # one KDC: resolve, connect, ask, answer
    exchange_timeout_s: float = 15.0  # the whole exchange, the device's frame included
    max_realms: int = 64
    max_kdcs: int = 16


KDC_LIMITS = KDCLimits()


class KDCProxyError(Exception):
    """The exchange is refused: answered with ``status`` and ``reason`` like a denial."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


@dataclass(frozen=True, slots=True)
class KDCAddress:
    """One KDC of a realm: ``[tcp/|udp/]host[:port]`` (MIT krb5.conf's spelling; TCP and
    port 88 unless said)."""

    transport: Transport
    host: str
    port: int

    @classmethod
    def parse(cls, text: object) -> KDCAddress:
        match = _KDC_RE.fullmatch(text) if isinstance(text, str) else None
        port = int(match.group(3) or KDC_PROXY_PORT) if match else 0
        if match is None or not 0 < port < 65536:
            raise ValueError(f"expected [tcp/|udp/]host[:port] for a KDC, got {text!r}")
        transport = Transport.UDP if match.group(1) == "udp" else Transport.TCP
        return cls(transport, match.group(2).strip("[]"), port)

    @property
    def text(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport.value}/{host}:{self.port}"

    @staticmethod
    def check_realm(realm: object) -> str:
        if not isinstance(realm, str) or not _REALM_RE.fullmatch(realm):
            raise ValueError(f"expected a Kerberos realm name, got {realm!r}")
        return realm


# The rules' verdict on one KDC: None when allowed, else why not.
RouteCheck = Callable[[KDCAddress, tuple[IPAddress, ...]], str | None]


def frame(message: bytes) -> bytes:
    return _FRAME.pack(len(message)) + message


def frame_need(buffer: bytes | bytearray, limit: int) -> int:
    """How many more bytes the frame starting ``buffer`` needs (0: complete)."""
    if len(buffer) < _FRAME.size:
        return _FRAME.size - len(buffer)
    length: int = _FRAME.unpack_from(buffer)[0]
    if length > limit:
        raise KDCProxyError(413, "too_large", f"KDC proxy message of {length} bytes (max {limit})")
    return max(0, _FRAME.size + length - len(buffer))


async def serve(
    client: TLSEnd,
    first: bytes,
    kerberos: Mapping[str, tuple[str, ...]],
    check: RouteCheck,
    limits: KDCLimits = KDC_LIMITS,
) -> tuple[str, bytes]:
    """Read the device's frame, ask the realm's KDCs; the realm and the framed answer."""
    try:
        async with asyncio.timeout(limits.exchange_timeout_s):
            message = await read_frame(client, first, limits.max_message)
            request = decode(message)
            kdcs = kerberos.get(request.realm)
            if not kdcs:
                raise KDCProxyError(
                    403,
                    "realm_not_served",
                    f"the group's policy names no KDC for {request.realm!r}",
                )
            reply = await ask_kdcs(request.request, kdcs, check, limits)
    except TimeoutError:
        raise KDCProxyError(504, "kdc_timeout", "the KDC exchange did not finish in time") from None
    return request.realm, frame(codec.encode(reply))


async def read_request(client: TLSEnd, first: bytes, limits: KDCLimits = KDC_LIMITS) -> bytes:
    """The device's whole request frame (length prefix included), bounded in size and
    time like the exchange: what a cascade front end passes on with its hop's head."""
    try:
        async with asyncio.timeout(limits.exchange_timeout_s):
            return frame(await read_frame(client, first, limits.max_message))
    except TimeoutError:
        raise KDCProxyError(504, "kdc_timeout", "the KDC request did not arrive in time") from None


def decode(message: bytes) -> codec.ProxyRequest:
    try:
        return codec.decode(message)
    except (ParsingError, ValueError, struct.error) as exc:  # pyasn1 errors are ValueErrors
        raise KDCProxyError(400, "bad_request", f"not a KDC-PROXY-MESSAGE: {exc}") from None


async def read_frame(client: TLSEnd, first: bytes, limit: int) -> bytes:
    """The message of one frame, read through the tunnel's TLS end, whichever backend
    (``recv_once``: on pyOpenSSL ``client.sock`` is the bare TCP socket). No byte
    OpenSSL buffered is left behind: each wake-up reads until OpenSSL wants more. The
    frame follows the head in a record of its own when a cascade front end relays it."""
    buffer = bytearray(first)
    loop = asyncio.get_running_loop()
    while need := frame_need(buffer, limit):
        chunk = bytearray(need)
        try:
            n = client.recv_once(memoryview(chunk))
        except TLSBlocked as blocked:
            await _ready(client, blocked.want, loop)
            continue
        except OSError as exc:
            raise KDCProxyError(400, "bad_request", f"client failed mid-request: {exc}") from None
        if n == 0:
            raise KDCProxyError(400, "bad_request", "client closed before its whole KDC request")
        buffer += chunk[:n]
    return bytes(buffer[_FRAME.size :])


async def _ready(client: TLSEnd, want: Want, loop: asyncio.AbstractEventLoop) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    client.watched.wait(want, wake)
    await ready


async def ask_kdcs(
    request: bytes, kdcs: tuple[str, ...], check: RouteCheck, limits: KDCLimits
) -> bytes:
    """The first answer of the realm's KDCs, in order; each one asked only if allowed."""
    refusals: list[str] = []
    failures: list[str] = []
    for kdc in map(KDCAddress.parse, kdcs):
        try:
            async with asyncio.timeout(limits.kdc_timeout_s):
                addresses = await resolve(kdc)
                refusal = check(kdc, addresses)
                if refusal is not None:
                    refusals.append(refusal)
                    continue
                return await ask(kdc, addresses[0], request, limits.max_message)
        except (OSError, TimeoutError, KDCProxyError) as exc:
            failures.append(f"{kdc.text}: {_describe(exc)}")
    if refusals and not failures:
        raise KDCProxyError(403, "destination_denied", "; ".join(refusals))
    raise KDCProxyError(502, "kdc_unreachable", "; ".join(refusals + failures))


async def resolve(kdc: KDCAddress) -> tuple[IPAddress, ...]:
    literal = ip_literal(kdc.host)
    if literal is not None:
        return (literal,)
    kind = socket.SOCK_DGRAM if kdc.transport is Transport.UDP else socket.SOCK_STREAM
    infos = await asyncio.get_running_loop().getaddrinfo(kdc.host, kdc.port, type=kind)
    return tuple(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


async def ask(kdc: KDCAddress, address: IPAddress, request: bytes, limit: int) -> bytes:
    """One KDC's reply, length-prefixed as over TCP (RFC 4120 §7.2.2), as KKDCP carries it."""
    if kdc.transport is Transport.UDP:
        return frame(await _ask_udp(address, kdc.port, request[_FRAME.size :], limit))
    reader, writer = await asyncio.open_connection(str(address), kdc.port)
    try:
        writer.write(request)  # already length-prefixed
        head = await reader.readexactly(_FRAME.size)
        (length,) = _FRAME.unpack(head)
        if length > limit:
            raise KDCProxyError(502, "kdc_reply", f"reply of {length} bytes (max {limit})")
        return head + await reader.readexactly(length)
    finally:
        writer.transport.abort()


async def _ask_udp(address: IPAddress, port: int, datagram: bytes, limit: int) -> bytes:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((str(address), port))  # only that KDC's datagrams are received
        await loop.sock_sendall(sock, datagram)
        return await loop.sock_recv(sock, limit)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KDCProxyError):
        return exc.detail
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the KDC closed mid-reply"
    return f"{type(exc).__name__}: {exc}"
