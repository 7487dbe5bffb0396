"""UDP on the device: per-app local UDP forwards and SOCKS5 UDP ASSOCIATE, over the tunnel.

A UDP tunnel is one Per-App Tunnel connection to one destination (``CONNECT`` with
``Certgate-Transport: udp``) carrying frames (``protocol.datagram``): :class:`DatagramTunnel`.
Its users number their senders as flows, so replies reach the sender that asked:

- :class:`UDPForward` (``certgate device run --udp-forward BUNDLE=PORT:HOST:DPORT``): a
  local UDP port for one app and one destination; each local source address is a flow.
- ``ProxyServer``'s SOCKS5 UDP ASSOCIATE (``listeners.py``) opens one tunnel per
  destination the client names, with one flow.

The device rules decide first, per app and destination: ``tunnel`` is carried,
``block`` and ``bypass`` are dropped and logged (this agent sends UDP only through the
tunnel). A tunnel the gateway refuses or closes (a live-policy close) is reopened only by
a later datagram, at most once per ``RETRY_S``: datagrams meanwhile are dropped, as UDP
allows. Everything waiting is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from certgate.addresses import ListenAddress, authority
from certgate.device.rules import Action
from certgate.device.tunnel_client import TunnelError, Upstream
from certgate.errors import CertgateError, ConfigError
from certgate.protocol import socks5
from certgate.protocol.datagram import NEED_DATA, DatagramDecoder, FrameError, encode

if TYPE_CHECKING:
    from certgate.device.listeners import Router

__all__ = [
    "DatagramTunnel",
    "FlowTable",
    "SocksAssociation",
    "UDPForward",
    "UDPForwardSpec",
    "UDPTarget",
]

log = logging.getLogger("certgate.device")

MAX_DATAGRAM = 65507
MAX_QUEUED = 64  # datagrams held while the tunnel opens
MAX_WRITE_BUFFER = 1024 * 1024
RETRY_S = 1.0
READ_CHUNK = 64 * 1024

OnDatagram = Callable[[int, bytes], None]


@dataclass(frozen=True, slots=True)
class UDPForwardSpec:
    """``--udp-forward BUNDLE=[HOST:]PORT:DEST_HOST:DEST_PORT``: where to listen, for
    which app, to which destination."""

    app: str
    listen: ListenAddress
    host: str
    port: int

    @classmethod
    def parse(cls, value: str) -> UDPForwardSpec:
        app, _, rest = value.partition("=")
        parts = rest.split(":")
        if not app or len(parts) not in (3, 4) or not parts[-1].isdigit():
            raise ConfigError(
                f"--udp-forward needs BUNDLE=[HOST:]PORT:DEST_HOST:DEST_PORT, got {value!r}"
            )
        listen = ":".join(parts[:-2]) if len(parts) == 4 else f"127.0.0.1:{parts[0]}"
        port = int(parts[-1])
        if not 1 <= port <= 65535:
            raise ConfigError(f"--udp-forward destination port out of range in {value!r}")
        return cls(app, ListenAddress.parse(listen), parts[-2], port)


class DatagramTunnel:
    """One open UDP tunnel: ``send(flow, payload)``; datagrams back go to ``on_datagram``."""

    def __init__(self, upstream: Upstream, on_datagram: OnDatagram) -> None:
        self.upstream, self.on_datagram = upstream, on_datagram
        self.decoder = DatagramDecoder(MAX_DATAGRAM)
        self.closed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def send(self, flow: int, payload: bytes) -> bool:
        """False if the datagram was dropped (tunnel closed or its buffer full)."""
        transport = self.upstream.writer.transport
        if self.closed.is_set() or transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            return False
        self.upstream.writer.write(encode(flow, payload))
        return True

    async def _read(self) -> None:
        try:
            self._take(self.upstream.initial)
            while data := await self.upstream.reader.read(READ_CHUNK):
                self._take(data)
        except (OSError, FrameError) as exc:
            log.info("udp tunnel via %s ended: %s", self.upstream.via, exc)
        finally:
            self.close()

    def _take(self, data: bytes) -> None:
        self.decoder.receive_data(data)
        while (event := self.decoder.next_event()) is not NEED_DATA:
            self.on_datagram(event.flow, event.payload)

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.upstream.writer.transport.abort()
        if self._reader is not asyncio.current_task():
            self._reader.cancel()


class UDPTarget:
    """Datagrams of one app to one destination, through one (re)opened tunnel."""

    def __init__(
        self, router: Router, app: str, host: str, port: int, on_datagram: OnDatagram
    ) -> None:
        self.router, self.app, self.host, self.port = router, app, host, port
        self.on_datagram = on_datagram
        self.tunnel: DatagramTunnel | None = None
        self.queued: list[tuple[int, bytes]] = []
        self.opening: asyncio.Task[None] | None = None
        self.retry_at = 0.0

    def send(self, flow: int, payload: bytes) -> None:
        if self.tunnel is not None and not self.tunnel.closed.is_set():
            self.tunnel.send(flow, payload)
            return
        if self.opening is None and time.monotonic() >= self.retry_at:
            self.opening = asyncio.get_running_loop().create_task(self._open())
        if self.opening is not None and len(self.queued) < MAX_QUEUED:
            self.queued.append((flow, payload))

    async def _open(self) -> None:
        dest = authority(self.host, self.port)
        try:
            decision = self.router.decide(self.app, self.host, self.port)
            if decision.action is not Action.TUNNEL:
                raise CertgateError(f"{decision.rule}: UDP goes only through the tunnel")
            upstream = await self.router.tunnel.open(self.app, self.host, self.port, udp=True)
        except (CertgateError, TunnelError) as exc:
            log.warning("udp app=%s dest=%s dropped: %s", self.app, dest, exc)
            self.retry_at = time.monotonic() + RETRY_S
            self.queued.clear()
            return
        finally:
            self.opening = None
        log.info("udp route app=%s dest=%s via=%s", self.app, dest, upstream.via)
        self.tunnel = DatagramTunnel(upstream, self.on_datagram)
        queued, self.queued = self.queued, []
        for flow, payload in queued:
            self.tunnel.send(flow, payload)

    def close(self) -> None:
        if self.opening is not None:
            self.opening.cancel()
        if self.tunnel is not None:
            self.tunnel.close()


class FlowTable:
    """Local sender address <-> flow id, forgetting senders idle for ``idle_s``."""

    def __init__(self, idle_s: float, max_flows: int = 1024) -> None:
        self.idle_s, self.max_flows = idle_s, max_flows
        self._ids = itertools.count(1)
        self.by_address: dict[Any, int] = {}
        self.by_flow: dict[int, tuple[Any, float]] = {}

    def flow_of(self, address: Any) -> int | None:
        flow = self.by_address.get(address)
        if flow is None:
            self.expire()
            if len(self.by_flow) >= self.max_flows:
                return None
            flow = self.by_address[address] = next(self._ids)
        self.by_flow[flow] = (address, time.monotonic())
        return flow

    def address_of(self, flow: int) -> Any:
        found = self.by_flow.get(flow)
        return None if found is None else found[0]

    def expire(self) -> None:
        limit = time.monotonic() - self.idle_s
        for flow, (address, touched) in list(self.by_flow.items()):
            if touched < limit:
                del self.by_flow[flow], self.by_address[address]


class UDPForward(asyncio.DatagramProtocol):
    """A local UDP port for one app and one destination (like ``--app-port`` for TCP)."""

    def __init__(self, router: Router, app: str, host: str, port: int, idle_s: float) -> None:
        self.flows = FlowTable(idle_s)
        self.target = UDPTarget(router, app, host, port, self._reply)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        flow = self.flows.flow_of(addr)
        if flow is not None and len(data) <= MAX_DATAGRAM:
            self.target.send(flow, data)

    def _reply(self, flow: int, payload: bytes) -> None:
        address = self.flows.address_of(flow)
        if address is not None and self.transport is not None:
            self.transport.sendto(payload, address)

    def close(self) -> None:
        self.target.close()
        if self.transport is not None:
            with contextlib.suppress(OSError):
                self.transport.close()


MAX_TARGETS = 64  # destinations per SOCKS association


class SocksAssociation(asyncio.DatagramProtocol):
    """The relay of one SOCKS5 UDP ASSOCIATE (RFC 1928 §7) for ``app``.

    Datagrams are accepted only from the client's host, and once one arrived only from
    that address (the first sender is the client, §7); each destination it names gets
    its own UDP tunnel, and replies come back wrapped with that destination's address.
    The association ends with its TCP control connection (the caller closes it).
    """

    def __init__(self, router: Router, app: str, client_host: str) -> None:
        self.router, self.app, self.client_host = router, app, client_host
        self.client: Any = None
        self.targets: dict[tuple[str, int], UDPTarget] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if addr[0] != self.client_host or (self.client is not None and addr != self.client):
            log.info("socks udp: dropping a datagram from %s, not the client", addr[0])
            return
        self.client = addr
        try:
            datagram = socks5.parse_udp_datagram(data)
        except socks5.Socks5Error as exc:
            log.info("socks udp: dropping a datagram: %s", exc)
            return
        self._target(datagram.host, datagram.port)
        target = self.targets.get((datagram.host, datagram.port))
        if target is not None and len(datagram.data) <= MAX_DATAGRAM:
            target.send(1, datagram.data)

    def _target(self, host: str, port: int) -> None:
        if (host, port) in self.targets or len(self.targets) >= MAX_TARGETS:
            return

        def reply(flow: int, payload: bytes) -> None:
            if self.transport is not None and self.client is not None:
                wrapped = socks5.encode_udp_datagram(socks5.UDPDatagram(host, port, payload))
                self.transport.sendto(wrapped, self.client)

        self.targets[host, port] = UDPTarget(self.router, self.app, host, port, reply)

    def close(self) -> None:
        for target in self.targets.values():
            target.close()
        if self.transport is not None:
            self.transport.close()
