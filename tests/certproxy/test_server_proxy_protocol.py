"""The cert proxy's PROXY v2 rule over real sockets and TLS: the device's address from a
configured load balancer's header reaches Access (``X-Forwarded-For``) and the logs; a
header from anyone else, or none from the balancer, ends the connection with a log line."""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from certgate.access.app import access_tls_context
from certgate.protocol.proxy_protocol import Command, Family, ProxyHeader, Transport, encode
from tests.access.harness import (
    ConsolePKI,
    Installed,
    PublicPKI,
    device_context,
    exchange_after,
    install_request,
    installed,
    proxy_server,
    serve_asgi,
    wait_for_log,
)
from tests.certproxy.test_server import ECHO
from tests.support import free_port

DEVICE = ("203.0.113.7", 40000)
HEADER = encode(
    ProxyHeader(Command.PROXY, Family.INET, Transport.STREAM, DEVICE, ("127.0.0.1", 5262))
)
REQUEST = b"GET /authorize/cert?req=abc HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"


@dataclass
class World:
    setup: Installed
    pki: ConsolePKI
    public: PublicPKI
    behind_lb: int  # a proxy whose load balancer is this test (127.0.0.1)
    lb_elsewhere: int  # a proxy whose load balancer is 192.0.2.0/24

    def fields_seen_by_access(self, port: int, prefix: bytes) -> dict[str, str]:
        ctx = device_context(self.public.root.cert, self.pki.device())
        data = exchange_after(port, prefix, ctx, REQUEST, "127.0.0.1")
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        return {name: value for name, value in json.loads(body)["headers"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    pki, public = ConsolePKI(), PublicPKI.create()
    setup = installed(tmp_path_factory.mktemp("access"), install_request(pki, public))
    port = free_port()
    with (
        serve_asgi(ECHO, port, access_tls_context(setup.config, setup.material)),
        proxy_server(setup, port, offload_port=None, load_balancers=("127.0.0.1",)) as (_, a),
        proxy_server(setup, port, offload_port=None, load_balancers=("192.0.2.0/24",)) as (_, b),
    ):
        yield World(setup, pki, public, a[0][1], b[0][1])


def test_the_relayed_device_address_is_forwarded_and_logged(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "certgate.certproxy")
    fields = world.fields_seen_by_access(world.behind_lb, HEADER)
    assert fields["x-forwarded-for"] == DEVICE[0]
    assert fields["forwarded"].startswith(f'for="{DEVICE[0]}:{DEVICE[1]}"')  # RFC 7239 §6
    wait_for_log(lambda: caplog.records, f"from {DEVICE[0]}:{DEVICE[1]} via 127.0.0.1:")


def test_a_balancer_connection_without_a_header_is_refused_and_logged(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "certgate.certproxy")
    with pytest.raises((ssl.SSLError, OSError)):
        world.fields_seen_by_access(world.behind_lb, b"")
    wait_for_log(lambda: caplog.records, "does not start with its signature")


def test_a_header_from_a_peer_that_is_not_a_balancer_is_refused_and_logged(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "certgate.certproxy")
    with pytest.raises((ssl.SSLError, OSError)):
        world.fields_seen_by_access(world.lb_elsewhere, HEADER)
    wait_for_log(lambda: caplog.records, "a PROXY header from a peer that is not a load balancer")


def test_a_direct_device_keeps_its_own_address(world: World) -> None:
    fields = world.fields_seen_by_access(world.lb_elsewhere, b"")
    assert fields["x-forwarded-for"] == "127.0.0.1"
