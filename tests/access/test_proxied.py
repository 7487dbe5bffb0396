"""Access's listener and the PROXY v2 rule, over real sockets and real TLS on loopback.

A raw client writes (or not) a PROXY v2 header, then does TLS and one HTTP request to an
app that answers with ``scope["client"]``: the address Access logs and audits.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from certgate.access.app import access_tls_context
from certgate.access.config import parse_networks
from certgate.access.proxied import is_load_balancer
from certgate.protocol.proxy_protocol import Command, Family, ProxyHeader, Transport, encode
from tests.access.harness import (
    ConsolePKI,
    Installed,
    PublicPKI,
    device_context,
    exchange_after,
    install_request,
    installed,
    serve_asgi,
    wait_for_log,
)
from tests.support import free_port

DEVICE = ("203.0.113.7", 40000)


async def whoami(request: Request) -> JSONResponse:
    assert request.client is not None
    return JSONResponse({"client": [request.client.host, request.client.port]})


WHOAMI = Starlette(routes=[Route("/whoami", whoami)])


def relayed(source: tuple[str, int] = DEVICE) -> bytes:
    return encode(
        ProxyHeader(Command.PROXY, Family.INET, Transport.STREAM, source, ("127.0.0.1", 443))
    )


LOCAL = encode(ProxyHeader(Command.LOCAL, Family.UNSPEC, Transport.UNSPEC))


def whoami_via(port: int, setup: Installed, prefix: bytes) -> list[object]:
    """Write ``prefix``, then TLS and GET /whoami: the client address Access saw."""
    ctx = device_context(setup.material.install_root)
    request = b"GET /whoami HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    data = exchange_after(port, prefix, ctx, request, "localhost")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    client: list[object] = json.loads(body)["client"]
    return client


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return installed(
        tmp_path_factory.mktemp("access"), install_request(ConsolePKI(), PublicPKI.create())
    )


@pytest.fixture(scope="module")
def behind_lb(setup: Installed) -> Iterator[int]:
    """Access where this test (127.0.0.1) is the configured load balancer."""
    port = free_port()
    with serve_asgi(WHOAMI, port, access_tls_context(setup.config, setup.material), ("127.0.0.1",)):
        yield port


@pytest.fixture(scope="module")
def lb_elsewhere(setup: Installed) -> Iterator[int]:
    """Access whose load balancer is some other address: this test is a direct client."""
    port = free_port()
    ctx = access_tls_context(setup.config, setup.material)
    with serve_asgi(WHOAMI, port, ctx, ("192.0.2.0/24",)):
        yield port


def test_a_relayed_connection_reports_the_devices_address(behind_lb: int, setup: Installed) -> None:
    assert whoami_via(behind_lb, setup, relayed()) == list(DEVICE)


def test_a_local_header_health_check_reports_the_balancer_itself(
    behind_lb: int, setup: Installed
) -> None:
    host, port = whoami_via(behind_lb, setup, LOCAL)
    assert host == "127.0.0.1" and port != DEVICE[1]


def test_a_balancer_connection_without_a_header_is_refused_and_logged(
    behind_lb: int, setup: Installed, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "certgate.access.proxied")
    with pytest.raises((ssl.SSLError, OSError)):
        whoami_via(behind_lb, setup, b"")
    wait_for_log(lambda: caplog.records, "does not start with its signature")
    assert any("denied connection from 127.0.0.1" in r.getMessage() for r in caplog.records)


def test_a_header_from_a_peer_that_is_not_a_balancer_is_refused_and_logged(
    lb_elsewhere: int, setup: Installed, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "certgate.access.proxied")
    with pytest.raises((ssl.SSLError, OSError)):
        whoami_via(lb_elsewhere, setup, relayed(("10.9.9.9", 1)))
    wait_for_log(lambda: caplog.records, "a PROXY header from a peer that is not a load balancer")


def test_a_direct_client_is_served_with_its_own_address(
    lb_elsewhere: int, setup: Installed
) -> None:
    host, _ = whoami_via(lb_elsewhere, setup, b"")
    assert host == "127.0.0.1"


def test_a_version_1_header_from_the_balancer_is_refused(
    behind_lb: int, setup: Installed, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "certgate.access.proxied")
    with pytest.raises((ssl.SSLError, OSError)):
        whoami_via(behind_lb, setup, b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\n")
    wait_for_log(lambda: caplog.records, "version 1 (text) is not accepted")


@pytest.mark.parametrize(
    ("host", "networks", "expected"),
    [
        ("10.0.0.5", ("10.0.0.0/24",), True),
        ("10.0.1.5", ("10.0.0.0/24",), False),
        ("::ffff:10.0.0.5", ("10.0.0.5",), True),
        ("2001:db8::1", ("2001:db8::/32",), True),
        ("unknown", ("10.0.0.0/8",), False),
        ("10.0.0.5", (), False),
    ],
)
def test_which_peers_are_load_balancers(
    host: str, networks: tuple[str, ...], expected: bool
) -> None:
    assert is_load_balancer(host, parse_networks(networks)) is expected
