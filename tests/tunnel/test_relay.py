"""The relay's pumps over real connected sockets on loopback: bytes and their order, the
preloaded head, back-pressure (a full sink stops the reading), end of stream, errors, and
buffers held only while a sink is full. Both event loops."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest

from certgate.tunnel.relay import BufferPool, Pump
from certgate.tunnel.sockets import End, Watched
from tests.tunnel.dataplane import LOOPS, run_on

both_loops = pytest.mark.parametrize("loop_name", sorted(LOOPS))


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a real loopback TCP connection, both non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    for sock in (a, b):
        sock.setblocking(False)
    return a, b


class Ended:
    """Collects ``on_end`` calls; ``wait`` returns the first."""

    def __init__(self) -> None:
        self.calls: list[tuple[Pump, OSError | None]] = []
        self.event = asyncio.Event()

    def __call__(self, pump: Pump, error: OSError | None) -> None:
        self.calls.append((pump, error))
        self.event.set()

    async def wait(self) -> OSError | None:
        await self.event.wait()
        return self.calls[0][1]


def pump_between(
    source: socket.socket, sink: socket.socket, pool: BufferPool, ended: Ended
) -> Pump:
    loop = asyncio.get_running_loop()
    return Pump(
        End(source, Watched(loop, source.fileno())),
        End(sink, Watched(loop, sink.fileno())),
        pool,
        ended,
    )


async def read_all(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < size:
        chunk = await loop.sock_recv(sock, 1 << 20)
        assert chunk, f"stream ended after {len(out)} of {size} bytes"
        out += chunk
    return bytes(out)


@both_loops
def test_bytes_arrive_in_order_and_end_of_stream_is_reported(loop_name: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        writer, source = tcp_pair()
        sink, reader = tcp_pair()
        ended, payload = Ended(), os.urandom(3 * 2**20 + 17)
        pump = pump_between(source, sink, BufferPool(), ended)
        pump.preload(b"HEAD ")
        pump.run()
        await loop.sock_sendall(writer, payload)
        writer.shutdown(socket.SHUT_WR)
        received = await read_all(reader, len(payload) + 5)
        assert await ended.wait() is None
        assert received == b"HEAD " + payload
        assert pump.bytes == len(payload) and pump.buffer is None
        assert len(ended.calls) == 1
        for sock in (writer, source, sink, reader):
            sock.close()

    run_on(loop_name, scenario)


@both_loops
def test_a_full_sink_stops_the_reading_until_it_drains(loop_name: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        writer, source = tcp_pair()
        sink, reader = tcp_pair()
        pump = pump_between(source, sink, BufferPool(), Ended())
        pump.run()
        payload = os.urandom(64 * 2**20)  # more than both kernel buffers hold
        sent = 0
        while True:  # nobody reads the sink: the writer must be stopped too
            try:
                sent += writer.send(memoryview(payload)[sent : sent + 2**20])
            except BlockingIOError:
                await asyncio.sleep(0.2)
                try:
                    sent += writer.send(memoryview(payload)[sent : sent + 2**20])
                except BlockingIOError:
                    break
        assert sent < len(payload)
        assert pump.buffer is not None  # holding what the sink refused, reading nothing
        forwarded = pump.bytes
        await asyncio.sleep(0.2)
        assert pump.bytes == forwarded
        sending = loop.create_task(loop.sock_sendall(writer, memoryview(payload)[sent:]))
        received = await read_all(reader, len(payload))
        await sending
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        for sock in (writer, source, sink, reader):
            sock.close()

    run_on(loop_name, scenario)


@both_loops
def test_an_idle_pump_holds_no_buffer(loop_name: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        writer, source = tcp_pair()
        sink, reader = tcp_pair()
        pool = BufferPool(keep=4)
        pump = pump_between(source, sink, pool, Ended())
        pump.run()
        await loop.sock_sendall(writer, b"ping")
        assert await read_all(reader, 4) == b"ping"
        assert pump.buffer is None and pool.free == 1
        for sock in (writer, source, sink, reader):
            sock.close()

    run_on(loop_name, scenario)


@both_loops
def test_a_reset_sink_ends_the_pump_with_the_error(loop_name: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        writer, source = tcp_pair()
        sink, reader = tcp_pair()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        reader.close()  # SO_LINGER 0: the peer resets
        ended = Ended()
        pump = pump_between(source, sink, BufferPool(), ended)
        pump.run()
        for _ in range(50):  # the first write may still be accepted before the reset lands
            await loop.sock_sendall(writer, b"x" * 65536)
            if ended.calls:
                break
            await asyncio.sleep(0.02)
        error = await ended.wait()
        assert isinstance(error, ConnectionError | BrokenPipeError), error
        for sock in (writer, source, sink):
            sock.close()

    run_on(loop_name, scenario)


def test_the_pool_keeps_only_its_own_size_and_count() -> None:
    pool = BufferPool(size=1024, keep=2)
    buffers = [pool.take() for _ in range(3)]
    for buffer in buffers:
        pool.give(buffer)
    pool.give(bytearray(10))  # a preload larger than the pool's size is never reused
    assert pool.free == 2
    assert len(pool.take()) == 1024


def test_trim_frees_what_a_whole_interval_did_not_need() -> None:
    pool = BufferPool(size=1024, keep=100, floor=2)
    burst = [pool.take() for _ in range(10)]
    for buffer in burst:
        pool.give(buffer)
    pool.trim()  # the burst took all ten since the last trim: all were needed
    assert pool.free == 10
    pool.give(pool.take())  # the quiet interval after the burst needs one at a time
    pool.trim()
    assert pool.free == 2  # nine went unused; the floor stays
