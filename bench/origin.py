"""The destination behind every relay: a plain-TCP sink, source and pinger (asyncio).

A client names what it wants in the first bytes it sends through the relay:

* ``P``: ping. The origin answers one byte (``!``) at once: the "first byte" of a new
  connection. Further ``P`` bytes are answered the same way.
* ``U`` + 8-byte big-endian length: upload. The origin swallows that many bytes, then
  answers ``!``.
* ``D`` + 8-byte big-endian length: download. The origin sends that many bytes.

Nothing else is sent, so a tunnel that never speaks stays idle. Run it as
``python -m bench.origin --port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import struct

ACK = b"!"
CHUNK = 256 * 1024
_LENGTH = struct.Struct(">Q")
_PAYLOAD = memoryview(b"\x5a" * CHUNK)


def upload_request(size: int) -> bytes:
    return b"U" + _LENGTH.pack(size)


def download_request(size: int) -> bytes:
    return b"D" + _LENGTH.pack(size)


class OriginProtocol(asyncio.Protocol):
    """One connection: parse commands, count uploads, stream downloads with back-pressure."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending = b""
        self.upload_left = 0
        self.download_left = 0
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.sender: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.upload_left >= len(data):  # the bulk of an upload: count it, copy nothing
            self.upload_left -= len(data)
            if self.upload_left == 0:
                self._ack()
            return
        self.pending += data
        self._commands()

    def _commands(self) -> None:
        while self.pending:
            if self.upload_left:
                used = min(len(self.pending), self.upload_left)
                self.upload_left -= used
                self.pending = self.pending[used:]
                if self.upload_left:
                    return
                self._ack()
                continue
            if self.pending[:1] == b"P":
                self.pending = self.pending[1:]
                self._ack()
                continue
            if len(self.pending) < 1 + _LENGTH.size:
                return
            self._start(self.pending[:1], _LENGTH.unpack_from(self.pending, 1)[0])
            self.pending = self.pending[1 + _LENGTH.size :]

    def _start(self, kind: bytes, size: int) -> None:
        if kind == b"U":
            self.upload_left = size
        elif kind == b"D":
            self.sender = asyncio.get_running_loop().create_task(self._download(size))
        else:
            self._abort()

    async def _download(self, size: int) -> None:
        assert self.transport is not None
        while size > 0 and not self.transport.is_closing():
            await self.can_write.wait()
            piece = _PAYLOAD[: min(size, CHUNK)]
            self.transport.write(piece)
            size -= len(piece)

    def _ack(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(ACK)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.can_write.set()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(OriginProtocol, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
