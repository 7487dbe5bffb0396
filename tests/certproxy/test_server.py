"""The cert proxy over real TLS on loopback, in front of an upstream that echoes what it got.

The upstream stands where Access would: it presents the Access certificate the proxy pins,
asks for the proxy's client certificate, and answers with the request it received.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import socket
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from certgate.access.app import access_tls_context
from certgate.certproxy.server import Limits
from certgate.httpserver import peer_cert_der
from certgate.pki import identity
from certgate.pki.authority import Authority, Names
from certgate.pki.profiles import DEVICE_CLIENT
from certgate.pki.thumbprint import thumbprint, thumbprint_der
from certgate.protocol.client_cert_header import decode_client_cert, encode_client_cert
from certgate.tlsconf import server_context
from tests.access.harness import (
    ConsolePKI,
    Installed,
    Leaf,
    PublicPKI,
    device_context,
    install_request,
    installed,
    proxy_server,
    serve_asgi,
    wait_for_log,
)
from tests.support import free_port
from tests.tlsgroups import REFUSED, SERVED, negotiated_group


async def echo(request: Request) -> JSONResponse:
    der = peer_cert_der(request.scope)
    return JSONResponse(
        {
            "headers": [[n.decode(), v.decode()] for n, v in request.scope["headers"]],
            "query": request.url.query,
            "peer": thumbprint_der(der) if der else None,
        },
        headers={"location": "com.example.mail:/cb?code=x", "connection": "close, X-Hop"},
    )


ECHO = Starlette(routes=[Route("/authorize/cert", echo)])


@dataclasses.dataclass
class Env:
    setup: Installed
    pki: ConsolePKI
    public: PublicPKI
    ports: list[int]
    upstream_port: int

    def device(self, leaf: Leaf | None, *, trust_self_signed: bool = False) -> httpx.Client:
        trust = self.setup.material.install_root if trust_self_signed else self.public.root.cert
        return httpx.Client(verify=device_context(trust, leaf), timeout=30)

    def url(self, which: int = 0) -> str:
        return f"https://127.0.0.1:{self.ports[which]}/authorize/cert?req=abc"


@pytest.fixture(scope="module")
def upstream(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Installed, ConsolePKI, PublicPKI, int]]:
    pki, public = ConsolePKI(), PublicPKI.create()
    setup = installed(tmp_path_factory.mktemp("access"), install_request(pki, public))
    port = free_port()
    with serve_asgi(ECHO, port, access_tls_context(setup.config, setup.material)):
        yield setup, pki, public, port


@pytest.fixture(scope="module")
def env(upstream: tuple[Installed, ConsolePKI, PublicPKI, int]) -> Iterator[Env]:
    setup, pki, public, port = upstream
    with proxy_server(setup, port) as (_, bound):
        yield Env(setup, pki, public, [p for _, p in bound], port)


def forwarded(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    data["fields"] = {}
    for name, value in data["headers"]:
        data["fields"].setdefault(name, []).append(value)
    return data


def test_the_verified_certificate_and_source_are_forwarded(env: Env) -> None:
    device, other = env.pki.device(), env.pki.device()
    spoof = {
        "Client-Cert": encode_client_cert(other.cert),
        "X-Forwarded-For": "10.6.6.6",
        "Forwarded": "for=10.6.6.6",
    }
    with env.device(device) as client:
        response = client.get(env.url(), headers=spoof)
    got = forwarded(response)
    fields = got["fields"]
    assert [decode_client_cert(v) for v in fields["client-cert"]] == [
        device.cert.public_bytes(Encoding.DER)
    ]
    assert len(fields["client-cert-chain"]) == 1
    assert fields["x-forwarded-for"] == ["127.0.0.1"]
    assert fields["forwarded"][0].startswith('for="127.0.0.1:')
    assert fields["host"] == [f"127.0.0.1:{env.upstream_port}"]  # the forced destination
    assert got["query"] == "req=abc"
    assert got["peer"] == env.setup.config.certproxy_thumbprint  # mTLS with the pinned cert
    assert response.headers["location"] == "com.example.mail:/cb?code=x"
    assert "x-hop" not in response.headers


def test_without_a_certificate_nothing_is_vouched_for(env: Env) -> None:
    forged = encode_client_cert(env.pki.device().cert)
    with env.device(None) as client:
        fields = forwarded(client.get(env.url(), headers={"client_cert": forged}))["fields"]
    assert "client-cert" not in fields and "client_cert" not in fields


def test_5262_presents_the_public_certificate_and_5263_the_self_signed_one(env: Env) -> None:
    device = env.pki.device()
    with env.device(device) as public_side:
        assert public_side.get(env.url(0)).status_code == 200
    with env.device(device, trust_self_signed=True) as offload_side:
        assert offload_side.get(env.url(1)).status_code == 200
    presented = [
        ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port)))
        for port in env.ports
    ]
    assert presented == [
        env.public.leaf.cert.public_bytes(Encoding.DER),
        env.setup.material.access_cert.public_bytes(Encoding.DER),
    ]


def _expired_device(pki: ConsolePKI) -> Leaf:
    past = Authority(clock=lambda: datetime.now(UTC) - timedelta(days=800))
    key = pki.device().key
    names = Names("device", identity.device("e" * 32, "android"))
    cert = past.issue(pki.device_root, DEVICE_CLIENT, names, key.public_key())
    return Leaf(cert, key, (pki.device_root.cert,))


@pytest.mark.parametrize(
    ("which", "alert", "logged"),
    [
        ("other-ca", "unknown ca", "unable to get local issuer certificate"),
        ("sibling-intermediate", "unknown ca", "unable to get local issuer certificate"),
        ("expired", "certificate expired", "certificate has expired"),
    ],
)
def test_a_certificate_the_device_root_did_not_issue_ends_the_handshake(
    env: Env, which: str, alert: str, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    leaf = {
        "other-ca": lambda: ConsolePKI().device(),
        "sibling-intermediate": env.pki.admin,  # Admin CA, under the same console Root
        "expired": lambda: _expired_device(env.pki),
    }[which]()
    with (
        caplog.at_level(logging.WARNING, "certgate.certproxy"),
        env.device(leaf) as client,
        pytest.raises(httpx.TransportError, match=alert),
    ):
        client.get(env.url())
    wait_for_log(lambda: caplog.records, f"client certificate rejected: {logged}")


def _raw(port: int, request: bytes, trust: Any) -> bytes:
    """Send ``request`` bytes over TLS and read the whole answer."""
    ctx = ssl.create_default_context(cadata=trust.public_bytes(Encoding.PEM).decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(request)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    return answer


GET = b"GET /authorize/cert HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET https://evil.example/authorize/cert HTTP/1.1\r\nHost: evil\r\n\r\n", b"400"),
        (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", b"400"),
        (b"POST /authorize/cert HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx", b"405"),
        (b"GET /token HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
        (GET + b"X-Big: " + b"a" * 17000 + b"\r\n\r\n", b"431"),
        (GET + b"Content-Length: 20000\r\n\r\n" + b"a" * 20000, b"413"),
        (GET + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n", b"400"),
        (b"GARBAGE\r\n\r\n", b"400"),
    ],
)
def test_requests_that_are_refused(env: Env, request_bytes: bytes, status: bytes) -> None:
    request_bytes = request_bytes.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1)
    answer = _raw(env.ports[0], request_bytes, env.public.root.cert)
    assert answer.split(b" ", 2)[1] == status, answer[:200]
    assert b'"error_description"' in answer


@pytest.fixture(scope="module")
def impatient(
    upstream: tuple[Installed, ConsolePKI, PublicPKI, int],
) -> Iterator[tuple[int, PublicPKI]]:
    """A proxy that gives up on an incomplete request quickly (for the fuzz test)."""
    setup, _, public, port = upstream
    limits = Limits(read_timeout_s=0.3)
    with proxy_server(setup, port, offload_port=None, limits=limits) as (_, bound):
        yield bound[0][1], public


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=300))
def test_arbitrary_bytes_get_an_http_error_or_a_close(
    impatient: tuple[int, PublicPKI], data: bytes
) -> None:
    port, public = impatient
    answer = _raw(port, data + b"\r\n\r\n", public.root.cert)
    assert answer == b"" or answer.startswith((b"HTTP/1.1 4", b"HTTP/1.1 2")), answer[:100]
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        pass  # still accepting


def test_keep_alive_serves_several_requests(env: Env) -> None:
    request = b"GET /authorize/cert?req=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /authorize/cert?req=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = _raw(env.ports[0], request + last, env.public.root.cert)
    assert answer.count(b"HTTP/1.1 200 OK") == 2


def test_a_slow_client_gets_408(upstream: tuple[Installed, ConsolePKI, PublicPKI, int]) -> None:
    setup, _, public, port = upstream
    with proxy_server(setup, port, offload_port=None, limits=Limits(read_timeout_s=0.3)) as (
        _,
        bound,
    ):
        answer = _raw(bound[0][1], b"GET /authorize/cert HTTP/1.1\r\nHo", public.root.cert)
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_an_unreachable_access_is_502(
    upstream: tuple[Installed, ConsolePKI, PublicPKI, int], caplog: pytest.LogCaptureFixture
) -> None:
    setup, pki, public, _ = upstream
    with (
        caplog.at_level(logging.ERROR, "certgate.certproxy"),
        proxy_server(setup, free_port(), offload_port=None) as (_, bound),
        httpx.Client(verify=device_context(public.root.cert, pki.device())) as client,
    ):
        response = client.get(f"https://127.0.0.1:{bound[0][1]}/authorize/cert")
    assert response.status_code == 502
    assert response.json()["error_description"] == "the Access service is unreachable"


def test_only_the_pinned_access_certificate_is_trusted(
    upstream: tuple[Installed, ConsolePKI, PublicPKI, int], tmp_path: Path
) -> None:
    """An upstream with any other certificate, even the public one, is not Access."""
    setup, pki, public, _ = upstream
    impostor_port = free_port()
    impostor = server_context([public.leaf.cert, public.root.cert], public.leaf.key)
    with (
        serve_asgi(ECHO, impostor_port, impostor),
        proxy_server(setup, impostor_port, offload_port=None) as (_, bound),
        httpx.Client(verify=device_context(public.root.cert, pki.device())) as client,
    ):
        response = client.get(f"https://127.0.0.1:{bound[0][1]}/authorize/cert")
    assert response.status_code == 502


def test_connections_over_the_limit_are_closed(
    upstream: tuple[Installed, ConsolePKI, PublicPKI, int], caplog: pytest.LogCaptureFixture
) -> None:
    setup, _, public, port = upstream
    ctx = ssl.create_default_context(cadata=public.root.cert.public_bytes(Encoding.PEM).decode())
    with (
        caplog.at_level(logging.WARNING, "certgate.certproxy"),
        proxy_server(setup, port, offload_port=None, limits=Limits(max_connections=1)) as (
            _,
            bound,
        ),
        socket.create_connection(("127.0.0.1", bound[0][1]), timeout=30) as first_raw,
        ctx.wrap_socket(first_raw, server_hostname="127.0.0.1"),  # holds the only slot
        socket.create_connection(("127.0.0.1", bound[0][1]), timeout=30) as second,
    ):
        assert second.recv(1) == b""  # closed without a handshake
        wait_for_log(lambda: caplog.records, "connection limit reached")


def test_a_bare_tcp_probe_is_not_a_denial(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Load balancer health checks (connect, close) must not flood the log with denials."""
    with caplog.at_level(logging.WARNING, "certgate.certproxy"):
        socket.create_connection(("127.0.0.1", env.ports[0]), timeout=10).close()
        with env.device(env.pki.device()) as client:  # a request after it, to sync on
            assert client.get(env.url()).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_forwarded_device_certificate_is_logged_by_thumbprint(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    device = env.pki.device()
    with caplog.at_level(logging.INFO, "certgate.certproxy"), env.device(device) as client:
        client.get(env.url())
    wait_for_log(lambda: caplog.records, f"device cert {thumbprint(device.cert)[:16]}")
    # certgate's own records (the test's client and stand-in upstream log URLs at INFO
    # once an earlier test has set the root logger's level).
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("certgate")]
    assert not any("req=abc" in message for message in ours)  # no sign-in handles
    assert json.dumps([r.getMessage() for r in caplog.records]).count("BEGIN CERT") == 0


@pytest.mark.parametrize("group", [*SERVED, *REFUSED])
def test_key_exchange_groups_of_access_and_the_cert_proxy(
    upstream: tuple[Installed, ConsolePKI, PublicPKI, int], env: Env, group: str
) -> None:
    # Access's listener (access_tls_context, here on uvicorn) and both cert proxy ports:
    # X25519, P-256 and P-384 only (Mozilla "intermediate").
    for port in (upstream[3], *env.ports):
        used = negotiated_group(port, group)
        if group in SERVED:
            assert used is not None and SERVED[group] in used, (port, used)
        else:
            assert used is None, (port, used)


def test_livez_and_metrics_are_answered_by_the_proxy_itself(env: Env) -> None:
    base = f"https://127.0.0.1:{env.ports[0]}"
    with env.device(None) as client:
        live = client.get(f"{base}/livez")
        client.get(env.url())  # one forwarded request
        metrics = client.get(f"{base}/metrics")
    assert live.status_code == 200 and live.json() == {"status": "alive"}
    assert metrics.status_code == 200
    text = metrics.text
    assert 'certgate_build_info{service="certproxy",version=' in text
    assert "process_open_fds " in text
    assert 'certgate_signin_failures_total{method="certificate"}' in text
    forwarded = re.search(
        r'certgate_http_requests_total\{method="GET",route="/authorize/cert",status="200"\} (\S+)',
        text,
    )
    assert forwarded is not None and float(forwarded.group(1)) >= 1
    # Statuses nothing has answered yet have their series at 0 (server.SERIES).
    for route, status in (("/authorize/cert", "502"), ("/metrics", "403")):
        series = f'certgate_http_requests_total{{method="GET",route="{route}",status="{status}"}}'
        assert f"{series} 0.0" in text.splitlines()
