"""Byte relay between two asyncio transports with back-pressure and no per-chunk policy.

Each side's protocol forwards ``data_received`` straight into the other transport; when a
transport's write buffer passes its high-water mark, the other side stops reading until it
drains (asyncio's ``pause_writing``/``resume_writing``). Counters are plain ints, folded
into metrics once, at close.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

WRITE_HIGH_WATER = 4 * 1024 * 1024
WRITE_LOW_WATER = 1024 * 1024


class Pipe:
    """One direction: reads from ``source`` are written to ``sink``."""

    __slots__ = ("bytes", "sink", "source")

    def __init__(self, source: asyncio.Transport, sink: asyncio.Transport) -> None:
        self.source, self.sink, self.bytes = source, sink, 0
        sink.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def forward(self, data: bytes) -> None:
        self.bytes += len(data)
        self.sink.write(data)

    def pause(self) -> None:
        if not self.source.is_closing():
            self.source.pause_reading()

    def resume(self) -> None:
        if not self.source.is_closing():
            self.source.resume_reading()

    def finish(self) -> None:
        """The source said EOF: half-close the sink if it can, else close it."""
        if self.sink.is_closing():
            return
        if self.sink.can_write_eof():
            self.sink.write_eof()
        else:
            self.sink.close()


class UpstreamProtocol(asyncio.Protocol):
    """The tunnel's connection to the destination; reports back to its client side."""

    def __init__(
        self,
        on_data: Callable[[bytes], None],
        on_eof: Callable[[], None],
        on_lost: Callable[[Exception | None], None],
        on_pause: Callable[[], None],
        on_resume: Callable[[], None],
    ) -> None:
        self.on_data, self.on_eof, self.on_lost = on_data, on_eof, on_lost
        self.on_pause, self.on_resume = on_pause, on_resume
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not isinstance: uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.on_data(data)

    def eof_received(self) -> bool:
        self.on_eof()
        return True  # keep our write side open until the client finishes too

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost(exc)

    def pause_writing(self) -> None:
        self.on_pause()

    def resume_writing(self) -> None:
        self.on_resume()
