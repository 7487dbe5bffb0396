"""Tests for certgate.demo_intranet: the demo's page names the process that dialed it, its
UDP echo answers, over real loopback sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest

from certgate.demo_intranet import Intranet, UDPEcho, socket_owner

PAGE = b"<h1>intranet</h1>\n"
NEEDS_PROC = pytest.mark.skipif(
    not os.path.exists("/proc/net/tcp"), reason="the kernel's socket table is Linux's /proc"
)


@pytest.fixture
def intranet() -> Iterator[Intranet]:
    server = Intranet(PAGE, {os.getpid(): "this test"})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@NEEDS_PROC
def test_the_page_names_the_process_that_dialed_it(intranet: Intranet) -> None:
    port = intranet.server_address[1]
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).content == PAGE
    dial = [
        sys.executable,
        "-c",
        f"import urllib.request as u; u.urlopen('http://127.0.0.1:{port}/')",
    ]
    # A child process counts as its parent (a node's data plane may run in workers); one
    # outside the named ones' trees is None (test_socket_owner_tells_...).
    subprocess.run(dial, check=True, timeout=60)
    assert intranet.visitors == ["this test", "this test"]


@NEEDS_PROC
def test_socket_owner_tells_the_two_ends_of_a_connection_apart() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        accepted, _ = listener.accept()
        with client, accepted:
            ours = {os.getpid(): "us"}
            here, there = client.getsockname(), client.getpeername()
            assert socket_owner(here, there, ours) == "us"
            with subprocess.Popen(["sleep", "30"]) as sibling:  # not our ancestor
                try:
                    assert socket_owner(here, there, {sibling.pid: "sleep"}) is None
                finally:
                    sibling.kill()
            assert socket_owner(here, ("127.0.0.1", 1), ours) is None  # no such connection


def test_the_udp_echo_answers_each_sender() -> None:
    echo = UDPEcho()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            sock.sendto(b"ping", ("127.0.0.1", echo.port))
            assert sock.recv(1024) == b"echo: ping"
    finally:
        echo.close()
    assert not echo.thread.is_alive()
