"""Readiness-driven sockets and the byte relay between a client's TLS socket and its upstream.

Why not asyncio transports: asyncio's SSL transport (``asyncio.sslproto``) runs TLS through
memory BIOs in pure Python and allocates and zero-fills a 256 KiB read buffer for every
connection; that shell cost more CPU per new connection than OpenSSL's handshake itself
(bench/FINDINGS.md). Here OpenSSL reads and writes the socket itself (a non-blocking
``ssl.SSLSocket``), and Python only reacts to readiness (``loop.add_reader``/``add_writer``),
which both the stdlib loop and uvloop provide.

Each direction of a relay is a ``Pump``: read into a buffer, write it to the other socket,
and when the sink is full keep the unwritten bytes and stop reading until it drains
(back-pressure without a per-connection write buffer). Buffers come from a per-process
``BufferPool``: a connection owns one only while its sink is full, so an idle tunnel holds
no buffer at all. Counters are plain ints, folded into metrics once, at close.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable
from enum import Enum

BUFFER_BYTES = 256 * 1024
TLS_MAX_PLAINTEXT = 16 * 1024  # RFC 8446 section 5.1: a record carries at most 2^14 bytes
ROUNDS_PER_WAKEUP = 4  # then yield to other connections (epoll is level-triggered)
POOL_KEEP = 64


class Want(Enum):
    """The readiness a blocked socket operation waits for."""

    READ = "read"
    WRITE = "write"


class BufferPool:
    """Reusable relay buffers; the event loop is single-threaded, so no locking."""

    def __init__(self, size: int = BUFFER_BYTES, keep: int = POOL_KEEP) -> None:
        self.size, self.keep = size, keep
        self._free: list[bytearray] = []

    def take(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(self.size)

    def give(self, buffer: bytearray) -> None:
        if len(buffer) == self.size and len(self._free) < self.keep:
            self._free.append(buffer)


class Watched:
    """One socket's readiness callbacks, registered with the loop only while needed.

    A wake-up runs the waiters registered so far; one still blocked waits again, and the
    registration stays, so a busy socket costs no ``epoll_ctl``. A read registration with
    no waiter left is dropped lazily, at its next wake-up: a connection that stops
    reading for a moment (while it dials upstream) and then reads again costs none
    either. Write readiness is nearly always true, so it is dropped at once.
    """

    __slots__ = ("_reader_on", "_readers", "_writer_on", "_writers", "closed", "fd", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop, self.fd, self.closed = loop, fd, False
        self._readers: list[Callable[[], None]] = []
        self._writers: list[Callable[[], None]] = []
        self._reader_on = self._writer_on = False

    def wait(self, want: Want, callback: Callable[[], None]) -> None:
        if self.closed:
            return
        if want is Want.READ:
            if callback not in self._readers:
                self._readers.append(callback)
            if not self._reader_on:
                self._reader_on = True
                self.loop.add_reader(self.fd, self._readable)
        else:
            if callback not in self._writers:
                self._writers.append(callback)
            if not self._writer_on:
                self._writer_on = True
                self.loop.add_writer(self.fd, self._writable)

    def _readable(self) -> None:
        waiters, self._readers = self._readers, []
        if not waiters:  # nobody reads now: stop the level-triggered wake-ups
            self._reader_on = False
            self.loop.remove_reader(self.fd)
        for callback in waiters:
            callback()

    def _writable(self) -> None:
        waiters, self._writers = self._writers, []
        for callback in waiters:
            callback()
        if not self._writers and self._writer_on and not self.closed:
            self._writer_on = False
            self.loop.remove_writer(self.fd)

    def close(self) -> None:
        """Forget every waiter; call before the socket is closed (its fd may be reused)."""
        self._readers.clear()
        self._writers.clear()
        if not self.closed:
            if self._reader_on:
                self.loop.remove_reader(self.fd)
            if self._writer_on:
                self.loop.remove_writer(self.fd)
        self._reader_on = self._writer_on = False
        self.closed = True


class WouldBlock(Exception):
    """A non-blocking socket operation must wait for ``want`` on ``end``."""

    def __init__(self, end: End, want: Want) -> None:
        self.end, self.want = end, want


class End:
    """One side of a relay: a non-blocking socket and its readiness callbacks."""

    __slots__ = ("at_eof", "sock", "watched")

    def __init__(self, sock: socket.socket, watched: Watched) -> None:
        self.sock, self.watched, self.at_eof = sock, watched, False

    def read_into(self, view: memoryview) -> tuple[int, Want | None]:
        """Bytes read, and what to wait for before reading again (None: read on)."""
        try:
            n = self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            raise WouldBlock(self, Want.READ) from None
        self.at_eof = n == 0
        # A short read drained the kernel buffer; epoll (level-triggered) says when more
        # arrives, so no second recv only to learn EAGAIN.
        return n, (Want.READ if 0 < n < len(view) else None)

    def write(self, view: memoryview) -> int:
        try:
            return self.sock.send(view)
        except (BlockingIOError, InterruptedError):
            raise WouldBlock(self, Want.WRITE) from None


class TLSEnd(End):
    """The client side: OpenSSL reads and writes the socket itself."""

    __slots__ = ()

    sock: ssl.SSLSocket

    def read_into(self, view: memoryview) -> tuple[int, Want | None]:
        got, room = 0, len(view) - TLS_MAX_PLAINTEXT
        # Several records per wake-up, then one write upstream for all of them. Reading
        # only while a whole record fits leaves no plaintext buffered inside OpenSSL
        # (which, without read-ahead, reads the socket one record at a time), so epoll
        # always sees what is left.
        while got <= room:
            try:
                n = self.sock.recv_into(view[got:])
            except ssl.SSLWantReadError:
                want = Want.READ
            except ssl.SSLWantWriteError:  # a TLS 1.3 KeyUpdate answer must go out first
                want = Want.WRITE
            else:
                if n == TLS_MAX_PLAINTEXT:
                    got += n
                    continue
                if n:  # a short record ends a burst: wait for epoll, not for an exception
                    return got + n, Want.READ
                self.at_eof = True  # close_notify, or a TCP close (ragged EOFs suppressed)
                return got, None
            if not got:
                raise WouldBlock(self, want)
            return got, want
        return got, None

    def write(self, view: memoryview) -> int:
        # CPython does not set SSL_MODE_ENABLE_PARTIAL_WRITE: SSL_write takes all of
        # ``view`` or raises, and the retry must pass the same bytes (the pump does).
        try:
            return self.sock.send(view)
        except ssl.SSLWantWriteError:
            raise WouldBlock(self, Want.WRITE) from None
        except ssl.SSLWantReadError:
            raise WouldBlock(self, Want.READ) from None


class Pump:
    """One direction: bytes read from ``source`` are written to ``sink``.

    ``buffer[start:end]`` is pending: read but not yet written. While it is not empty the
    pump does not read, which is the back-pressure. ``on_end(pump, error)`` is called once,
    at the source's end of stream (``error`` None, everything written) or on an error.
    """

    __slots__ = (
        "_run",
        "buffer",
        "bytes",
        "end",
        "eof",
        "finished",
        "on_end",
        "pool",
        "sink",
        "source",
        "start",
        "touched",
        "want",
    )

    def __init__(
        self,
        source: End,
        sink: End,
        pool: BufferPool,
        on_end: Callable[[Pump, OSError | None], None],
    ) -> None:
        self.source, self.sink, self.pool, self.on_end = source, sink, pool, on_end
        self.buffer: bytearray | None = None
        self.start = self.end = self.bytes = 0
        self.eof = self.finished = False
        self.want: Want | None = None
        self.touched = time.monotonic()
        self._run = self.run

    def preload(self, data: bytes) -> None:
        """Bytes to write before anything is read (a ``200`` answer, a rewritten head)."""
        if data:
            buffer = self.pool.take() if len(data) <= self.pool.size else bytearray(len(data))
            buffer[: len(data)] = data
            self.buffer, self.start, self.end = buffer, 0, len(data)

    def run(self) -> None:
        if self.finished:
            return
        self.touched = time.monotonic()
        try:
            self._rounds()
        except WouldBlock as blocked:
            blocked.end.watched.wait(blocked.want, self._run)
        except OSError as exc:  # ssl.SSLError included: reset, broken pipe, bad record
            self._finish(exc)

    def _rounds(self) -> None:
        for _ in range(ROUNDS_PER_WAKEUP):
            if self.end > self.start and not self._flush():
                return
            if self.eof:
                self._finish(None)
                return
            if self.want is not None:  # the last read said there is nothing more yet
                want, self.want = self.want, None
                self.source.watched.wait(want, self._run)
                return
            self._fill()
        # Out of rounds: come back when the loop has served the others. Pending bytes
        # first (the source may never become readable again), else the next read.
        if self.end > self.start:
            self.sink.watched.wait(Want.WRITE, self._run)
        else:
            self.source.watched.wait(Want.READ, self._run)

    def _flush(self) -> bool:
        """Write what is pending; True once all of it is written."""
        assert self.buffer is not None
        self.start += self.sink.write(memoryview(self.buffer)[self.start : self.end])
        if self.start < self.end:
            self.sink.watched.wait(Want.WRITE, self._run)
            return False
        self.release()
        return True

    def _fill(self) -> None:
        buffer = self.pool.take()
        try:
            n, self.want = self.source.read_into(memoryview(buffer))
        except BaseException:
            self.pool.give(buffer)
            raise
        self.eof = self.source.at_eof
        if n:
            self.bytes += n
            self.buffer, self.start, self.end = buffer, 0, n
        else:
            self.pool.give(buffer)

    def _finish(self, error: OSError | None) -> None:
        self.finished = True
        self.release()
        self.on_end(self, error)

    def release(self) -> None:
        if self.buffer is not None:
            self.pool.give(self.buffer)
            self.buffer, self.start, self.end = None, 0, 0
