"""The device side of the Per-App Tunnel: mutual TLS to the gateway, then one CONNECT.

Per connection: TCP to a profile tunnel host, TLS 1.2+ presenting the per-device
certificate and verifying the gateway with the profile's ``tunnel_trust`` as the only CAs
(hostname checked against the profile host), the gateway's identity checked to be *this
group's* tunnel (other groups' tunnels chain to the same Secure Channel Root), then::

    CONNECT host:port HTTP/1.1          RFC 9110 §9.3.6 (authority-form, RFC 9112 §3.2.3)
    Host: host:port
    Certgate-App: <bundle id>
    Certgate-Transport: udp             only for UDP (frames: protocol.datagram)

``200`` turns the connection into a raw byte tunnel; ``403/502/503/504`` carry a
``certgate: <reason>`` body that becomes :class:`TunnelRefused`. The exchange itself is
sans-IO (:class:`ConnectHandshake`, on h11); :class:`TunnelClient` is the asyncio shell.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import h11
from cryptography import x509

from certgate.addresses import authority
from certgate.device.state import CertifiedKey
from certgate.errors import CertgateError, ChainError
from certgate.pki import identity
from certgate.pki.identity import identity_of
from certgate.protocol.datagram import TRANSPORT_HEADER, UDP
from certgate.protocol.http_proxy import APP_HEADER
from certgate.tlsconf import client_context

__all__ = [
    "NEED_DATA",
    "ConnectHandshake",
    "Established",
    "Refused",
    "TunnelClient",
    "TunnelError",
    "TunnelRefused",
    "TunnelTimeouts",
    "TunnelUnreachable",
    "Upstream",
    "authority",
]

MAX_RESPONSE_HEAD = 16 * 1024
MAX_REASON_BODY = 1024
READ_CHUNK = 64 * 1024


class TunnelError(CertgateError):
    """The tunnel could not carry this connection."""


class TunnelUnreachable(TunnelError):
    """No tunnel endpoint could be reached, or none proved to be this group's tunnel."""


class TunnelRefused(TunnelError):
    """The tunnel answered the CONNECT with a denial; ``reason`` is its ``certgate:`` body."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"tunnel refused with {status}: {reason}")
        self.status, self.reason = status, reason


@dataclass(frozen=True, slots=True)
class Upstream:
    """An open byte stream to the destination; ``initial`` bytes already arrived on it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    initial: bytes
    via: str


# -- sans-IO: one CONNECT exchange ----------------------------------------------------------


class NeedData(Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Established:
    """``2xx`` to CONNECT: the bytes after the response head are already tunnel data."""

    trailing: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    status: int
    reason: str


class ConnectHandshake:
    """The client side of one CONNECT, h11-style: ``request()``, ``receive_data``,
    ``next_outcome()`` -> :class:`Established` | :class:`Refused` | ``NEED_DATA``."""

    def __init__(self, app: str, host: str, port: int, udp: bool = False) -> None:
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self._target = authority(host, port)
        self._app = app
        self._udp = udp
        self._response: h11.Response | None = None
        self._body = bytearray()
        self._received = 0
        self._closed_silently = False

    def request(self) -> bytes:
        head = self._conn.send(
            h11.Request(
                method="CONNECT",
                target=self._target,
                headers=[("Host", self._target), (APP_HEADER, self._app)]
                + ([(TRANSPORT_HEADER, UDP)] if self._udp else []),
            )
        )
        return (head or b"") + (self._conn.send(h11.EndOfMessage()) or b"")

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the tunnel; ``b""`` means it closed the connection."""
        self._received += len(data)
        self._closed_silently = not data and not self._received
        self._conn.receive_data(data)

    def next_outcome(self) -> Established | Refused | NeedData:
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                return self._on_broken(exc)
            if event is h11.NEED_DATA:
                return NEED_DATA
            if event is h11.PAUSED:  # 2xx to CONNECT: h11 has switched protocols
                return Established(self._conn.trailing_data[0])
            outcome = self._on_event(event)
            if outcome is not None:
                return outcome

    def _on_event(self, event: object) -> Refused | None:
        if isinstance(event, h11.InformationalResponse):
            return None
        if isinstance(event, h11.Response):
            self._response = event
        elif isinstance(event, h11.Data):
            self._body += event.data[: MAX_REASON_BODY - len(self._body)]
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return self._refused()
        return None

    def _on_broken(self, exc: h11.RemoteProtocolError) -> Refused:
        if self._response is not None:
            return self._refused()  # the body was cut short: the status still stands
        if self._closed_silently:
            raise TunnelError(
                "the tunnel closed the connection without answering CONNECT (device "
                "certificate refused? under TLS 1.3 that verdict comes as a bare close)"
            ) from exc
        raise TunnelError(f"the tunnel answered CONNECT with garbage: {exc}") from exc

    def _refused(self) -> Refused:
        assert self._response is not None
        text = bytes(self._body).decode("utf-8", "replace").strip()
        reason = text.removeprefix("certgate:").strip() or self._response.reason.decode("latin-1")
        return Refused(self._response.status_code, reason)


# -- the asyncio shell --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TunnelTimeouts:
    connect_s: float = 10.0
    handshake_s: float = 10.0
    response_s: float = 15.0


class TunnelClient:
    """Opens Per-App Tunnel connections with one device identity."""

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        context: ssl.SSLContext,
        group_id: str,
        device_thumbprint: str,
        timeouts: TunnelTimeouts | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("a tunnel client needs at least one endpoint")
        self.endpoints = tuple(endpoints)
        self.context = context
        self.expected = identity.tunnel(group_id)
        self.device_thumbprint = device_thumbprint
        self.timeouts = timeouts or TunnelTimeouts()

    @classmethod
    def for_identity(
        cls,
        endpoints: Sequence[tuple[str, int]],
        trust: Sequence[x509.Certificate],
        device: CertifiedKey,
        group_id: str,
        timeouts: TunnelTimeouts | None = None,
    ) -> TunnelClient:
        ctx = client_context(trust, chain=[device.cert], key=device.key, alpn=["http/1.1"])
        return cls(endpoints, ctx, group_id, device.thumbprint, timeouts)

    async def open(self, app: str, host: str, port: int, udp: bool = False) -> Upstream:
        """A byte stream to ``host:port`` through the tunnel, attributed to ``app``; with
        ``udp`` a stream of datagram frames (``protocol.datagram``) to that UDP port."""
        reader, writer, via = await self._connect_any()
        try:
            initial = await self._connect_exchange(
                reader, writer, ConnectHandshake(app, host, port, udp)
            )
        except BaseException:
            writer.transport.abort()
            raise
        return Upstream(reader, writer, initial, via)

    async def _connect_any(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        failures = []
        for host, port in self.endpoints:
            try:
                reader, writer = await self._connect(host, port)
            except ssl.SSLError as exc:
                if not isinstance(exc, ssl.SSLCertVerificationError):
                    # The tunnel refused our certificate (TLS 1.2 says so in the handshake):
                    # another endpoint of the same group would refuse it too.
                    raise TunnelRefused(403, _refusal(exc)) from exc
                failures.append(f"{authority(host, port)}: {_describe(exc)}")
            except (OSError, TimeoutError, ChainError) as exc:
                failures.append(f"{authority(host, port)}: {_describe(exc)}")
            else:
                return reader, writer, f"tunnel {authority(host, port)}"
        raise TunnelUnreachable("no tunnel endpoint reachable (" + "; ".join(failures) + ")")

    async def _connect(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        timeouts = self.timeouts
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host,
                port,
                ssl=self.context,
                server_hostname=host,
                ssl_handshake_timeout=timeouts.handshake_s,
            ),
            timeouts.connect_s + timeouts.handshake_s,
        )
        try:
            self._check_tunnel_identity(writer)
        except ChainError:
            writer.transport.abort()
            raise
        return reader, writer

    def _check_tunnel_identity(self, writer: asyncio.StreamWriter) -> None:
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        except ValueError as exc:  # "handshake not done yet": a fatal alert came in first
            # Under TLS 1.3 the tunnel's verdict on our certificate can arrive in the same
            # read as the end of the handshake; OpenSSL then reports no handshake at all.
            raise TunnelRefused(403, "device certificate refused (TLS alert)") from exc
        found = identity_of(x509.load_der_x509_certificate(der))
        if found != self.expected:
            raise ChainError(f"server is {found.uri()}, not {self.expected.uri()}")

    async def _connect_exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handshake: ConnectHandshake,
    ) -> bytes:
        writer.write(handshake.request())
        deadline = time.monotonic() + self.timeouts.response_s
        while True:
            outcome = handshake.next_outcome()
            if isinstance(outcome, Established):
                return outcome.trailing
            if isinstance(outcome, Refused):
                raise TunnelRefused(outcome.status, outcome.reason)
            handshake.receive_data(await _read_before(reader, deadline))


async def _read_before(reader: asyncio.StreamReader, deadline: float) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(READ_CHUNK), deadline - time.monotonic())
    except TimeoutError as exc:
        raise TunnelError("the tunnel did not answer CONNECT in time") from exc
    except ssl.SSLError as exc:
        # TLS 1.3 sends the client-certificate verdict after the client's handshake ends,
        # so a refused device certificate shows up here, as an alert on the first read.
        raise TunnelRefused(403, _refusal(exc)) from exc
    except ConnectionResetError as exc:
        # Before any answer to CONNECT: under TLS 1.3 the tunnel's verdict on the client
        # certificate arrives after the handshake, so a reset here is that refusal too.
        raise TunnelError(f"the tunnel reset the connection: {_describe(exc)}") from exc
    except ConnectionError as exc:
        raise TunnelError(f"the tunnel closed the connection: {exc}") from exc


def _refusal(exc: ssl.SSLError) -> str:
    """A TLS alert from the tunnel (unknown_ca, certificate_expired, ...) is its verdict on
    the device certificate: OpenSSL names the alert in ``reason``."""
    return f"device certificate refused (TLS: {exc.reason or exc})"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"tunnel certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionResetError):
        # The tunnel answers a refused certificate with a TLS alert, but a reset can
        # overtake the alert when the tunnel closes right after sending it.
        return "connection reset in the TLS handshake (device certificate refused?)"
    return str(exc) or type(exc).__name__
