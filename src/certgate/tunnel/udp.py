"""UDP over the Per-App Tunnel: the tunnel side of an admitted UDP tunnel.

``server.ClientConnection`` admits a ``CONNECT`` carrying ``Certgate-Transport: udp``
exactly as a TCP one (``admit``, DNS, ``rules.evaluate`` with ``Transport.UDP``) and then
hands its TLS socket to a :class:`UDPRelay` instead of dialing. From there the stream
carries frames (``protocol.datagram``): each flow id gets its own connected UDP socket
to the one destination address the rules approved, so every reply returns to the flow
that asked. Being a live tunnel of that connection, it is judged again on every policy
change like any other and closed with it.

Bounds (``UDPLimits``): the datagram size, flows per tunnel (a new flow past it is
dropped, not queued), idle flows (their sockets closed), and bytes waiting for the
client: UDP is allowed to lose datagrams, so a slow client loses replies instead of
growing a buffer.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from certgate.protocol.datagram import NEED_DATA, DatagramDecoder, FrameError, encode
from certgate.tunnel.sockets import TLS_MAX_PLAINTEXT, IPAddress, TLSEnd, Want, Watched, WouldBlock

log = logging.getLogger("certgate.tunnel")

READ_BYTES = 4 * TLS_MAX_PLAINTEXT
WRITE_BYTES = TLS_MAX_PLAINTEXT


@dataclass(frozen=True, slots=True)
class UDPLimits:
    max_datagram: int = 65507
    max_flows: int = 256
    flow_idle_s: float = 60.0
    max_pending_bytes: int = 1024 * 1024


class _Flow:
    """One flow's upstream socket."""

    __slots__ = ("flow", "sock", "touched", "watched")

    def __init__(self, flow: int, sock: socket.socket, watched: Watched) -> None:
        self.flow, self.sock, self.watched = flow, sock, watched
        self.touched = time.monotonic()

    def close(self) -> None:
        self.watched.close()
        self.sock.close()


class UDPRelay:
    """Frames from the client become datagrams to ``address``:``port``, and back.

    ``on_end(error)`` is called once: ``None`` when the client ended the stream, else a
    reason (a frame error, a failed client socket).
    """

    def __init__(
        self,
        client: TLSEnd,
        address: IPAddress,
        port: int,
        limits: UDPLimits,
        on_end: Callable[[str | None], None],
    ) -> None:
        self.client, self.address, self.port, self.limits = client, address, port, limits
        self.on_end = on_end
        self.loop = asyncio.get_running_loop()
        self.decoder = DatagramDecoder(limits.max_datagram)
        self.flows: dict[int, _Flow] = {}
        self.pending = bytearray()  # framed replies not yet handed to TLS
        self.inflight: bytes | None = None  # a TLS write to retry with the same bytes
        self.touched = time.monotonic()
        self.bytes_up = self.bytes_down = self.dropped = 0
        self.finished = False
        self._buffer = bytearray(READ_BYTES)
        self._timer: asyncio.TimerHandle | None = None

    def start(self, preload: bytes, trailing: bytes) -> None:
        """Write ``preload`` (the ``200``), take ``trailing`` as the first client bytes."""
        self.pending += preload
        self._arm_expiry()
        self._flush()
        self._take(trailing)
        if not self.finished:
            self._read_client()

    # -- client -> destination ----------------------------------------------------------

    def _read_client(self) -> None:
        if self.finished:
            return
        try:
            n, _ = self.client.read_into(memoryview(self._buffer))
        except WouldBlock as blocked:
            blocked.end.watched.wait(blocked.want, self._read_client)
            return
        except OSError as exc:
            self._end(f"client connection failed: {exc}")
            return
        self._take(bytes(self._buffer[:n]))
        if self.client.at_eof:
            self._end(None)
        elif not self.finished:
            self.client.watched.wait(Want.READ, self._read_client)

    def _take(self, data: bytes) -> None:
        if not data:
            return
        self.touched = time.monotonic()
        self.decoder.receive_data(data)
        try:
            while (event := self.decoder.next_event()) is not NEED_DATA:
                self._send_upstream(event.flow, event.payload)
        except FrameError as exc:
            self._end(f"bad frame: {exc}")

    def _send_upstream(self, flow_id: int, payload: bytes) -> None:
        flow = self.flows.get(flow_id) or self._open_flow(flow_id)
        if flow is None:
            self.dropped += 1
            return
        flow.touched = self.touched
        try:
            flow.sock.send(payload)
            self.bytes_up += len(payload)
        except (BlockingIOError, InterruptedError):
            self.dropped += 1  # the socket buffer is full: UDP may lose it
        except OSError as exc:  # an ICMP error reported on the connected socket
            log.debug("udp flow %d to %s: %s", flow_id, self.address, exc)

    def _open_flow(self, flow_id: int) -> _Flow | None:
        if len(self.flows) >= self.limits.max_flows:
            log.info("udp to %s: %d flows open, dropping a new one", self.address, len(self.flows))
            return None
        family = socket.AF_INET6 if self.address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect((str(self.address), self.port))  # replies only from there
        except OSError as exc:
            sock.close()
            log.info("udp to %s:%d: cannot open a flow: %s", self.address, self.port, exc)
            return None
        flow = _Flow(flow_id, sock, Watched(self.loop, sock.fileno()))
        self.flows[flow_id] = flow
        flow.watched.wait(Want.READ, lambda: self._read_flow(flow))
        return flow

    # -- destination -> client ----------------------------------------------------------

    def _read_flow(self, flow: _Flow) -> None:
        if self.finished or flow.watched.closed:
            return
        for _ in range(64):  # then let the loop serve others; epoll wakes us again
            try:
                payload = flow.sock.recv(self.limits.max_datagram + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ICMP port unreachable and the like: the flow stays
                log.debug("udp flow %d from %s: %s", flow.flow, self.address, exc)
                continue
            self._queue_reply(flow, payload)
        flow.watched.wait(Want.READ, lambda: self._read_flow(flow))
        self._flush()

    def _queue_reply(self, flow: _Flow, payload: bytes) -> None:
        over_size = len(payload) > self.limits.max_datagram
        if over_size or len(self.pending) >= self.limits.max_pending_bytes:
            self.dropped += 1
            return
        flow.touched = self.touched = time.monotonic()
        self.pending += encode(flow.flow, payload, self.limits.max_datagram)
        self.bytes_down += len(payload)

    def _flush(self) -> None:
        while not self.finished and (self.inflight is not None or self.pending):
            if self.inflight is None:
                self.inflight = bytes(self.pending[:WRITE_BYTES])
                del self.pending[:WRITE_BYTES]
            try:
                self.client.write(memoryview(self.inflight))
            except WouldBlock as blocked:
                blocked.end.watched.wait(blocked.want, self._flush)
                return
            except OSError as exc:
                self._end(f"client connection failed: {exc}")
                return
            self.inflight = None

    # -- idle flows and the end ---------------------------------------------------------

    def _arm_expiry(self) -> None:
        period = max(self.limits.flow_idle_s / 2, 0.05)
        self._timer = self.loop.call_later(period, self._expire)

    def _expire(self) -> None:
        now = time.monotonic()
        for flow in [f for f in self.flows.values() if now - f.touched > self.limits.flow_idle_s]:
            log.debug("udp flow %d to %s idle: closed", flow.flow, self.address)
            del self.flows[flow.flow]
            flow.close()
        if not self.finished:
            self._arm_expiry()

    def _end(self, error: str | None) -> None:
        if not self.finished:
            self.close()
            self.on_end(error)

    def close(self) -> None:
        """Close every flow socket (idempotent); the client socket is the caller's."""
        self.finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for flow in self.flows.values():
            flow.close()
        self.flows.clear()
