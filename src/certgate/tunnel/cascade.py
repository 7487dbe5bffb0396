"""Cascade mode (issue #16): a front end in the DMZ relays admitted tunnels to a back end
inside the network, which alone reaches the destinations.

* Front end: admits the device exactly as a standalone node, then opens mTLS to a back end
  with the group's tunnel identity (client side) and sends one ``CONNECT host:port``
  carrying the device certificate (RFC 9440 ``Client-Cert``), the app the request named
  (``Certgate-App``), the transport (``Certgate-Transport``) and the admission mode
  (``Certgate-Cascade-Mode``). A ``200`` answer starts the relay; any other status is
  passed on to the device with the back end's reason. It never resolves or dials a
  destination.
* Back end: accepts only the group's tunnel identity as TLS client (the Secure Channel
  Root issues it; the URI SAN must be this group's tunnel), verifies the device
  certificate of ``Client-Cert`` up to a Device Root again, admits it from its own table,
  resolves, applies the server traffic rules and dials.

Both ends register the tunnel under the device's thumbprint, so a feed change (a device
turning non-compliant) closes it at both ends: whichever end judges first resets its
side, and the other side's end of stream ends the rest of the hop.

The header fields are trusted only from the group's tunnel identity: a device cannot reach
a back end (its certificate is not issued by the Secure Channel Root).
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from cryptography import x509

from certgate.addresses import ListenAddress, authority
from certgate.errors import BadRequest, ChainError, ConfigError
from certgate.pki import identity
from certgate.pki.authority import utcnow
from certgate.pki.keys import PrivateKey
from certgate.pki.verify import verify_client_chain
from certgate.protocol.client_cert_header import (
    CLIENT_CERT,
    decode_client_cert,
    encode_client_cert,
)
from certgate.protocol.datagram import TRANSPORT_HEADER
from certgate.protocol.http_proxy import APP_HEADER, Headers
from certgate.tlsconf import client_context
from certgate.tunnel.admission import Mode
from certgate.tunnel.rules import Transport
from certgate.tunnel.sockets import (
    TLS_MAX_PLAINTEXT,
    Dialer,
    End,
    StdlibTLSEnd,
    TLSBlocked,
    TLSEnd,
    Want,
    ip_literal,
)

__all__ = [
    "MODE_HEADER",
    "BackEndHop",
    "Cascade",
    "HopRefused",
    "Role",
    "check_settings",
    "front_end_tls",
]

MODE_HEADER = "Certgate-Cascade-Mode"
MAX_ANSWER_HEAD = 16 * 1024


class Role(Enum):
    STANDALONE = "standalone"
    FRONT_END = "front-end"
    BACK_END = "back-end"


def check_settings(role: Role, back_ends: tuple[ListenAddress, ...]) -> None:
    """A front end names its back ends, by IP address (no resolver on the hop); no
    other role names any. Raises ``ConfigError``."""
    if role is Role.FRONT_END:
        if not back_ends:
            raise ConfigError("a front end needs at least one --back-end HOST:PORT")
        for back_end in back_ends:
            if ip_literal(back_end.host) is None:
                raise ConfigError(f"--back-end {back_end}: HOST must be an IP address")
    elif back_ends:
        raise ConfigError(f"--back-end is for front ends, not a {role.value} node")


@dataclass(frozen=True, slots=True)
class HopRefused:
    """Why a front end could not relay: the status and reason the device is answered."""

    status: int
    reason: str
    detail: str


@dataclass
class Cascade:
    """A node's place in a cascade, and what it needs to play it."""

    role: Role
    group_id: str
    root: x509.Certificate
    device_roots: tuple[x509.Certificate, ...]  # two during a Device Root rotation
    back_ends: tuple[ListenAddress, ...] = ()
    client_tls: ssl.SSLContext | None = None  # front end: the tunnel identity, as client
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        check_settings(self.role, self.back_ends)
        if self.role is Role.FRONT_END and self.client_tls is None:
            raise ConfigError("a front end needs its tunnel identity as TLS client")

    # -- back end -----------------------------------------------------------------------

    def check_peer(self, der: bytes) -> None:
        """The other end of a hop (verified by TLS up to the Secure Channel Root) is this
        group's tunnel identity, not a console identity or another group's tunnel."""
        found = identity.identity_of(x509.load_der_x509_certificate(der))
        if found != identity.tunnel(self.group_id):
            raise ChainError(f"{found.uri()} is not a tunnel of group {self.group_id}")

    def device_of(self, headers: Headers) -> tuple[bytes, Mode]:
        """The device certificate (DER, verified up to the Device Root) and the admission
        mode a front end passed on. Raises ``BadRequest`` or ``ChainError``."""
        value = headers.get(CLIENT_CERT)
        if value is None:
            raise BadRequest(f"a front end's CONNECT must carry {CLIENT_CERT}")
        der = decode_client_cert(value)
        self._verify_device(x509.load_der_x509_certificate(der))
        try:
            mode = Mode(headers.get(MODE_HEADER) or "")
        except ValueError as exc:
            raise BadRequest(f"{MODE_HEADER} must be proxy or per_app") from exc
        return der, mode

    def _verify_device(self, leaf: x509.Certificate) -> None:
        """Issued by one of the group's Device Roots, as the front end's TLS layer found."""
        failures = []
        for device_root in self.device_roots:
            try:
                verify_client_chain(
                    leaf, [device_root], [self.root], expected_issuer=device_root, at=utcnow()
                )
            except ChainError as exc:
                failures.append(str(exc))
            else:
                return
        raise ChainError("; ".join(failures))

    # -- front end ----------------------------------------------------------------------

    def connect_head(
        self,
        host: str,
        port: int,
        app: str | None,
        transport: Transport,
        mode: Mode,
        device_der: bytes,
    ) -> bytes:
        """The CONNECT a front end sends its back end for one admitted tunnel."""
        destination = authority(host, port)  # IPv6 literals in brackets (RFC 9112 3.2.3)
        fields = [
            ("Host", destination),
            (CLIENT_CERT, encode_client_cert(device_der)),
            (MODE_HEADER, mode.value),
            (TRANSPORT_HEADER, transport.value),
        ]
        if app is not None:
            fields.append((APP_HEADER, app))
        lines = [f"CONNECT {destination} HTTP/1.1", *(f"{k}: {v}" for k, v in fields)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def back_end_order(self) -> list[ListenAddress]:
        """The back ends, starting at the next in turn (round robin, then fall over)."""
        start = next(self._turn) % len(self.back_ends)
        return [*self.back_ends[start:], *self.back_ends[:start]]


def front_end_tls(
    chain: list[x509.Certificate], key: PrivateKey, scrs: Sequence[x509.Certificate]
) -> ssl.SSLContext:
    """A front end's client side: the group's tunnel identity, trusting the Secure Channel
    Roots (two during their rotation). Back ends are reached by address, not by the names
    in their certificate, so the name check is the URI SAN's (``Cascade.check_front_end``:
    the same group identity)."""
    ctx = client_context(list(scrs), chain=chain, key=key)
    ctx.check_hostname = False
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


class BackEndHop:
    """Front end: one tunnel's hop to a back end. Dials the back ends in turn, completes
    mTLS, checks the back end is this group's tunnel, sends the CONNECT head and reads the
    answer's head. Then ``on_ready(end, leftover)`` (bytes after the head belong to the
    tunnel) or ``on_refused(HopRefused)``; ``cancel`` stops it and calls nothing.

    The hop's client side is Python's ``ssl`` (``StdlibTLSEnd``) whatever the listeners'
    ``--tls-backend``: the shell's ends are server-side, and ``StdlibTLSEnd`` is the one
    that also drives a client ``SSLSocket``. Its cost per tunnel is not measured yet."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        cascade: Cascade,
        head: bytes,
        timeout_s: float,
        on_ready: Callable[[TLSEnd, bytes], None],
        on_refused: Callable[[HopRefused], None],
    ) -> None:
        self.loop, self.cascade, self.head, self.timeout_s = loop, cascade, head, timeout_s
        self.on_ready, self.on_refused = on_ready, on_refused
        self.pending = cascade.back_end_order()
        self.back_end: ListenAddress | None = None
        self.dialer: Dialer | None = None
        self.end: StdlibTLSEnd | None = None
        self.answer = bytearray()
        self.sent = 0
        self.last_error = "no back end"
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._close_attempt()
        if not self.pending:
            self._refuse(HopRefused(502, "back_end_unreachable", self.last_error))
            return
        self.back_end = self.pending.pop(0)
        address = ip_literal(self.back_end.host)
        assert address is not None  # Cascade checks that every back end is an IP
        self._timer = self.loop.call_later(self.timeout_s, self._timed_out)
        self.dialer = Dialer(
            self.loop, [address], self.back_end.port, self.timeout_s, self._dialed, self._failed
        )
        self.dialer.start()

    def cancel(self) -> None:
        self.pending.clear()
        self._close_attempt()

    def _failed(self, error: str) -> None:
        self.last_error = f"back end {self.back_end}: {error}"
        self.start()  # the next back end, if any

    def _timed_out(self) -> None:
        self._timer = None
        self._failed("timeout")

    def _dialed(self, plain: End) -> None:
        self.dialer = None
        assert self.cascade.client_tls is not None
        tls = self.cascade.client_tls.wrap_socket(
            plain.sock,
            server_side=False,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=False,
        )
        self.end = StdlibTLSEnd(tls, plain.watched)  # the same descriptor, so the same watch
        self._handshake()

    def _wait(self, blocked: TLSBlocked, action: Callable[[], None]) -> None:
        assert self.end is not None
        self.end.watched.wait(blocked.want, action)

    def _handshake(self) -> None:
        assert self.end is not None
        try:
            self.end.handshake()
            self.cascade.check_peer(self.end.peer_der() or b"")  # this group's tunnel
        except TLSBlocked as blocked:
            self._wait(blocked, self._handshake)
        except (OSError, ValueError, ChainError) as exc:  # HandshakeRefused/Closed included
            self._failed(f"TLS: {exc}")
        else:
            self._send_head()

    def _send_head(self) -> None:
        assert self.end is not None
        try:
            self.sent += self.end.send_once(memoryview(self.head)[self.sent :])
        except TLSBlocked as blocked:
            self._wait(blocked, self._send_head)
            return
        except OSError as exc:
            self._failed(f"sending the request: {exc}")
            return
        if self.sent < len(self.head):
            self.end.watched.wait(Want.WRITE, self._send_head)
        else:
            self._read_answer()

    def _read_answer(self) -> None:
        assert self.end is not None
        buffer = bytearray(TLS_MAX_PLAINTEXT)
        try:
            n = self.end.recv_once(memoryview(buffer))
        except TLSBlocked as blocked:
            self._wait(blocked, self._read_answer)
            return
        except OSError as exc:
            self._failed(f"reading the answer: {exc}")
            return
        if n == 0:
            self._failed("closed before answering")
            return
        self.answer += buffer[:n]
        self._answer_received()

    def _answer_received(self) -> None:
        head, found, leftover = bytes(self.answer).partition(b"\r\n\r\n")
        if not found:
            if len(self.answer) > MAX_ANSWER_HEAD:
                self._failed("answer head too large")
            else:
                assert self.end is not None
                self.end.watched.wait(Want.READ, self._read_answer)
            return
        status = answer_status(head)
        if status is None:
            self._failed("malformed answer")
        elif status == 200:
            end, self.end = self.end, None
            self._stop_timer()
            assert end is not None
            self.on_ready(end, leftover)
        else:
            self._refuse(refusal_of(status, leftover, self.back_end))

    def _refuse(self, refused: HopRefused) -> None:
        self.pending.clear()
        self._close_attempt()
        self.on_refused(refused)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close_attempt(self) -> None:
        self._stop_timer()
        if self.dialer is not None:
            self.dialer.cancel()
            self.dialer = None
        if self.end is not None:
            self.end.watched.close()
            self.end.sock.close()
            self.end = None
        self.answer.clear()
        self.sent = 0


def answer_status(head: bytes) -> int | None:
    """The status code of an HTTP/1.1 answer head, None if it is not one."""
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] != b"HTTP/1.1" or not parts[1].isdigit():
        return None
    return int(parts[1])


def refusal_of(status: int, body: bytes, back_end: ListenAddress | None) -> HopRefused:
    """A back end's refusal, passed on: its status, and its reason (``certgate: REASON``,
    the body every node answers a denial with) when the body is there."""
    text = body.decode("ascii", "replace").strip()
    reason = text.removeprefix("certgate: ") if text.startswith("certgate: ") else ""
    if not reason.replace("_", "").isalnum():
        reason = "back_end_refused"
    return HopRefused(status, reason, f"back end {back_end} answered {status}")
