"""The byte relay between a client's TLS socket and its upstream TCP socket.

Each direction is a ``Pump``: read into a buffer, write it to the other socket, and when
the sink is full keep the unwritten bytes and stop reading until it drains (back-pressure
without a per-connection write buffer). Buffers come from a per-process ``BufferPool``: a
connection owns one only while its sink is full, so an idle tunnel holds no buffer at all.
Counters are plain ints, folded into metrics once, at close.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from certgate.tunnel.sockets import End, Want, WouldBlock

BUFFER_BYTES = 256 * 1024
ROUNDS_PER_WAKEUP = 4  # then yield to other connections (epoll is level-triggered)
POOL_KEEP = 1024  # at most 256 MiB, and only while a burst needs it


class BufferPool:
    """Reusable relay buffers; the event loop is single-threaded, so no locking.

    A new buffer costs a zero-filled 256 KiB allocation (an ``mmap`` and its page faults),
    so the pool keeps up to ``keep`` of them: enough for every pump a burst of busy tunnels
    blocks at once. ``trim`` (called every second) then frees what a whole interval did not
    need, down to ``floor``, so a burst leaves no lasting memory behind.
    """

    def __init__(self, size: int = BUFFER_BYTES, keep: int = POOL_KEEP, floor: int = 8) -> None:
        self.size, self.keep, self.floor = size, keep, floor
        self._free: list[bytearray] = []
        self._unused = 0  # fewest free buffers since the last trim: never taken meanwhile

    def take(self) -> bytearray:
        if not self._free:
            self._unused = 0
            return bytearray(self.size)
        buffer = self._free.pop()
        self._unused = min(self._unused, len(self._free))
        return buffer

    @property
    def free(self) -> int:
        """Buffers kept for reuse."""
        return len(self._free)

    def give(self, buffer: bytearray) -> None:
        if len(buffer) == self.size and len(self._free) < self.keep:
            self._free.append(buffer)

    def trim(self) -> None:
        """Free the buffers no one took since the last trim, keeping ``floor``."""
        surplus = min(self._unused, len(self._free) - self.floor)
        if surplus > 0:
            del self._free[:surplus]
        self._unused = len(self._free)


class Pump:
    """One direction: bytes read from ``source`` are written to ``sink``.

    ``buffer[start:end]`` is pending: read but not yet written. While it is not empty the
    pump does not read, which is the back-pressure. ``on_end(pump, error)`` is called once,
    at the source's end of stream (``error`` None, everything written) or on an error.
    """

    __slots__ = (
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

    def preload(self, data: bytes) -> None:
        """Bytes to write before anything is read (a ``200`` answer, a rewritten head)."""
        if data:
            buffer = self.pool.take() if len(data) <= self.pool.size else bytearray(len(data))
            buffer[: len(data)] = data
            self.buffer, self.start, self.end = buffer, 0, len(data)

    def begin(self) -> None:
        """Write the preload, then wait for the source: a socket just connected, or one
        whose bytes so far the head parser took, has nothing to read yet."""
        self.want = Want.READ
        self.run()

    def run(self) -> None:
        if self.finished:
            return
        self.touched = time.monotonic()
        try:
            self._rounds()
        except WouldBlock as blocked:
            blocked.end.watched.wait(blocked.want, self.run)
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
                self.source.watched.wait(want, self.run)
                return
            self._fill()
        # Out of rounds: come back when the loop has served the others. Pending bytes
        # first (the source may never become readable again), else the next read.
        if self.end > self.start:
            self.sink.watched.wait(Want.WRITE, self.run)
        else:
            self.source.watched.wait(Want.READ, self.run)

    def _flush(self) -> bool:
        """Write what is pending; True once all of it is written."""
        assert self.buffer is not None
        self.start += self.sink.write(memoryview(self.buffer)[self.start : self.end])
        if self.start < self.end:
            self.sink.watched.wait(Want.WRITE, self.run)
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
