"""Readiness-driven sockets on both event loops: a waiter runs once per wait and a read
registration nobody uses is dropped; the acceptor hands over sockets and stops on close;
the dialer falls through refused addresses, reports the last error, and cancels cleanly."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from certgate.tunnel.sockets import Acceptor, Dialer, End, Want, Watched, ip_literal
from tests.support import free_port
from tests.tunnel.dataplane import LOOPS, run_on

both_loops = pytest.mark.parametrize("loop_name", sorted(LOOPS))


@both_loops
def test_a_waiter_runs_once_per_wait_and_idle_reads_unregister(loop_name: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        b.setblocking(False)
        watched, calls = Watched(loop, b.fileno()), []
        watched.wait(Want.READ, lambda: calls.append("read"))
        a.send(b"x")
        await asyncio.sleep(0.05)
        a.send(b"y")  # still readable, nobody waits: the registration goes, no call
        await asyncio.sleep(0.05)
        assert calls == ["read"]
        assert not loop.remove_reader(b.fileno())  # it was dropped already
        watched.wait(Want.WRITE, lambda: calls.append("write"))
        await asyncio.sleep(0.05)
        assert calls == ["read", "write"]
        assert not loop.remove_writer(b.fileno())  # write registrations go at once
        a.close()
        b.close()

    run_on(loop_name, scenario)


@both_loops
def test_close_forgets_waiters_and_registrations(loop_name: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        watched, calls = Watched(loop, b.fileno()), []
        watched.wait(Want.READ, lambda: calls.append("read"))
        watched.close()
        watched.wait(Want.READ, lambda: calls.append("late"))
        a.send(b"x")
        await asyncio.sleep(0.05)
        assert calls == [] and not loop.remove_reader(b.fileno())
        a.close()
        b.close()

    run_on(loop_name, scenario)


@both_loops
def test_the_acceptor_hands_over_connections_until_closed(loop_name: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        accepted: list[socket.socket] = []
        acceptor = Acceptor.listen(loop, "127.0.0.1", 0, lambda s, _: accepted.append(s))
        port = acceptor.sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        for _ in range(100):
            if len(accepted) == 5:
                break
            await asyncio.sleep(0.01)
        assert len(accepted) == 5 and acceptor.is_serving()
        acceptor.close()
        assert not acceptor.is_serving()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        for sock in [*accepted, *clients]:
            sock.close()

    run_on(loop_name, scenario)


class Outcome:
    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.end: End | None = None
        self.error: str | None = None

    def connected(self, end: End) -> None:
        self.end = end
        self.done.set()

    def failed(self, error: str) -> None:
        self.error = error
        self.done.set()


@both_loops
def test_the_dialer_falls_through_refused_addresses(loop_name: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]
            outcome = Outcome()
            refused = ipaddress.ip_address("127.0.0.3")  # loopback too, nobody listens there
            addresses = [refused, ipaddress.ip_address("127.0.0.1")]
            Dialer(loop, addresses, port, 5.0, outcome.connected, outcome.failed).start()
            await outcome.done.wait()
            assert outcome.error is None and outcome.end is not None
            assert outcome.end.sock.getpeername() == ("127.0.0.1", port)
            nodelay = outcome.end.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert nodelay
            outcome.end.watched.close()
            outcome.end.sock.close()

    run_on(loop_name, scenario)


@both_loops
def test_the_dialer_reports_the_last_error(loop_name: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        outcome = Outcome()
        addresses = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("127.0.0.2")]
        closed = free_port()  # nothing listens there
        Dialer(loop, addresses, closed, 5.0, outcome.connected, outcome.failed).start()
        await outcome.done.wait()
        assert outcome.end is None and outcome.error == "Connection refused"

    run_on(loop_name, scenario)


def full_backlog() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: Linux drops further SYNs, so a new connect
    stays pending (a destination that does not answer, on loopback)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(server.getsockname())
        fillers.append(filler)
    return server, fillers


@both_loops
def test_the_dialer_times_out_an_unanswered_connect(loop_name: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server, fillers = full_backlog()
        outcome = Outcome()
        address = [ipaddress.ip_address("127.0.0.1")]
        port = server.getsockname()[1]
        Dialer(loop, address, port, 0.3, outcome.connected, outcome.failed).start()
        await outcome.done.wait()
        assert outcome.error == "timeout"
        for sock in [server, *fillers]:
            sock.close()

    run_on(loop_name, scenario)


@both_loops
def test_a_cancelled_dialer_closes_its_attempt_and_calls_nothing(loop_name: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server, fillers = full_backlog()
        outcome = Outcome()
        address = [ipaddress.ip_address("127.0.0.1")]
        dialer = Dialer(
            loop, address, server.getsockname()[1], 0.2, outcome.connected, outcome.failed
        )
        dialer.start()
        attempt = dialer.attempt
        assert attempt is not None  # pending
        dialer.cancel()
        await asyncio.sleep(0.4)  # past the timeout: nothing fires
        assert not outcome.done.is_set()
        assert attempt.sock.fileno() == -1 and attempt.watched.closed
        for sock in [server, *fillers]:
            sock.close()

    run_on(loop_name, scenario)


@pytest.mark.parametrize(
    ("host", "literal"),
    [
        ("127.0.0.1", ipaddress.ip_address("127.0.0.1")),
        ("::1", ipaddress.ip_address("::1")),
        ("intranet.example", None),
        ("127.0.0.1.example", None),
        ("", None),
    ],
)
def test_ip_literal(host: str, literal: object) -> None:
    assert ip_literal(host) == literal
