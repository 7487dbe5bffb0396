"""The data plane over real TLS on loopback: curl through Proxy mode, CONNECT in Per-App
mode, every kind of bad certificate refused for TLS 1.2 and 1.3 with the reason logged,
live tunnels closed on a policy change, bounded head size and timeouts; each on both event
loops and both TLS backends (Python's ssl, pyOpenSSL)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from certgate import logs
from certgate.pki import identity
from certgate.pki.authority import Issuer, Names
from certgate.pki.keys import generate_key
from certgate.pki.profiles import LEAF_USAGE, TUNNEL_IDENTITY, Profile
from certgate.tunnel.server import Limits
from certgate.tunnel.service import data_plane_tls
from certgate.tunnel.sync import FeedChange
from certgate.tunnel.table import DeviceTable
from tests.support import free_port
from tests.tlsgroups import REFUSED, SERVED, negotiated_group
from tests.tunnel.dataplane import (
    APP,
    GROUP,
    PAGE,
    PKI,
    Client,
    Origin,
    ServiceThread,
    StaticSource,
    connect_request,
    expired_pair,
    make_service,
    tls_client,
)

pytestmark = pytest.mark.integration
TLS_VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def clients(pki: PKI) -> dict[str, Client]:
    return {
        "app": pki.client_cert("app", app=APP),
        "device": pki.client_cert("device"),
        "other-app": pki.client_cert("other-app", app="com.example.mail"),
    }


@pytest.fixture
def source(clients: dict[str, Client]) -> StaticSource:
    return StaticSource(DeviceTable.from_snapshot(1, [c.entry() for c in clients.values()]))


@pytest.fixture(params=["asyncio", "uvloop"])
def tunnel(
    pki: PKI, source: StaticSource, backend: str, request: pytest.FixtureRequest
) -> Iterator[ServiceThread]:
    """The data plane on each event loop and TLS backend: every test using it runs on all."""
    service = make_service(pki, source, backend=backend)
    with ServiceThread(service, loop=request.param) as running:
        yield running


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    with Origin() as running:
        yield running


def curl(
    pki: PKI, tunnel: ServiceThread, client: Client, url: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    port = tunnel.service.bound["proxy"]
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--proxy",
            f"https://localhost:{port}",
            "--proxy-cacert",
            str(pki.work / "chain.pem"),
            "--proxy-cert",
            str(client.cert_path),
            "--proxy-key",
            str(client.key_path),
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_curl_fetches_a_page_through_proxy_mode(
    pki: PKI, tunnel: ServiceThread, origin: Origin, clients: dict[str, Client]
) -> None:
    url = f"http://127.0.0.1:{origin.port}/"
    absolute = curl(pki, tunnel, clients["app"], url)
    connect = curl(pki, tunnel, clients["app"], url, "--proxytunnel")
    assert absolute.returncode == 0, absolute.stderr
    assert connect.returncode == 0, connect.stderr
    assert absolute.stdout.encode() == PAGE == connect.stdout.encode()


def test_per_app_connect_relays_bytes(
    pki: PKI, tunnel: ServiceThread, origin: Origin, clients: dict[str, Client]
) -> None:
    request = (
        f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
        f"Certgate-App: {APP}\r\n\r\n"
        f"GET / HTTP/1.1\r\nHost: intranet\r\nConnection: close\r\n\r\n"
    ).encode()
    ctx = tls_client(pki, clients["device"], ssl.TLSVersion.TLSv1_3)
    answer = connect_request(tunnel.service.bound["per_app"], ctx, request)
    assert answer.startswith(b"HTTP/1.1 200 Connection established\r\n")
    assert answer.endswith(PAGE)


def _signed(pki: PKI, profile: Profile, name: str) -> Client:
    return pki.client_cert(name, app=APP, profile=profile)


def _ca_true_leaf(pki: PKI) -> Client:
    """A leaf claiming CA:TRUE; the Authority refuses to make one, so the test builds it."""
    key = generate_key()
    uid = "ab" * 16
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(pki.device_root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(pki.device_root.not_valid_before_utc)
        .not_valid_after(pki.device_root.not_valid_before_utc + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(identity.app(uid, GROUP, APP).uri())]
            ),
            critical=False,
        )
    )
    cert = builder.sign(pki.device_root_key, hashes.SHA256())
    return pki.save("ca-true", cert, key, uid, APP)


def bad_clients(pki: PKI) -> dict[str, Client]:
    rogue_key = generate_key()
    rogue_root = pki.authority.create_root(rogue_key, Names("rogue root"))
    server_only = Profile(
        "server-only", timedelta(days=30), False, LEAF_USAGE, (ExtendedKeyUsageOID.SERVER_AUTH,)
    )
    self_key = generate_key()
    return {
        "expired": expired_pair(pki, "expired", 400),
        "not-yet-valid": expired_pair(pki, "future", -10),
        "wrong-ca": pki.client_cert("wrong-ca", app=APP, issuer=Issuer(rogue_root, rogue_key)),
        "self-signed": pki.save(
            "self", pki.authority.create_root(self_key, Names("self")), self_key, "cd" * 16, APP
        ),
        "sibling-intermediate": pki.client_cert(
            "sibling", app=APP, issuer=Issuer(pki.scr, pki.scr_key)
        ),
        "server-auth-only": _signed(pki, server_only, "server-only"),
        "ca-true-leaf": _ca_true_leaf(pki),
        "unknown-thumbprint": pki.client_cert("unknown", app=APP),
    }


@pytest.fixture(scope="module")
def bad(pki: PKI) -> dict[str, Client]:
    return bad_clients(pki)


# Each kind of bad certificate and the reason the tunnel must log for it.
BAD_KINDS = {
    "expired": "certificate has expired",
    "not-yet-valid": "certificate is not yet valid",
    "wrong-ca": "unable to get local issuer certificate",
    "self-signed": "self-signed certificate",
    "sibling-intermediate": "client certificate rejected",
    "server-auth-only": "unsuitable certificate purpose",
    "ca-true-leaf": "CA:TRUE",
    "unknown-thumbprint": "reason=unknown_thumbprint",
    "revoked": "reason=unknown_thumbprint",
    "no-cert": "reason=tls_handshake detail=PEER_DID_NOT_RETURN_A_CERTIFICATE",
}


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_certificates_are_refused_and_logged(
    pki: PKI,
    tunnel: ServiceThread,
    source: StaticSource,
    origin: Origin,
    bad: dict[str, Client],
    clients: dict[str, Client],
    kind: str,
    version: ssl.TLSVersion,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client: Client | None
    if kind == "revoked":  # revoked or replaced: the console deleted it from the feed
        client = pki.client_cert(f"revoked-{version.name}", app=APP)
        table = source.table
        table.apply_batch(table.seq + 1, table.seq + 1, [client.entry()])
        table.apply_batch(
            table.seq + 1,
            table.seq + 1,
            [
                {
                    "op": "delete",
                    "thumbprint": client.thumbprint,
                    "device_uid": client.device_uid,
                    "group_id": GROUP,
                }
            ],
        )
    else:
        client = None if kind == "no-cert" else bad[kind]
    request = f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with caplog.at_level(logging.INFO, logger="certgate.tunnel"):
        answer = connect_request(
            tunnel.service.bound["proxy"], tls_client(pki, client, version), request
        )
        deadline = time.monotonic() + 5
        while "deny" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
    assert not answer.startswith(b"HTTP/1.1 200"), answer
    denials = [r.getMessage() for r in caplog.records if r.getMessage().startswith("deny")]
    assert denials, caplog.text
    assert BAD_KINDS[kind] in denials[-1], denials


def test_unknown_thumbprint_gets_403_with_reason(
    pki: PKI,
    tunnel: ServiceThread,
    bad: dict[str, Client],
    origin: Origin,
    caplog: pytest.LogCaptureFixture,
) -> None:
    request = f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with caplog.at_level(logging.INFO, logger="certgate.tunnel"):
        answer = connect_request(
            tunnel.service.bound["proxy"],
            tls_client(pki, bad["unknown-thumbprint"], ssl.TLSVersion.TLSv1_3),
            request,
        )
    assert answer.startswith(b"HTTP/1.1 403")
    assert b"unknown_thumbprint" in answer
    assert f"thumbprint={bad['unknown-thumbprint'].thumbprint}" in caplog.text
    # The same denial as a structured event (certgate.logs): what JSON and syslog carry.
    denial = next(r for r in caplog.records if logs.fields_of(r)["event"] == "deny")
    fields = logs.fields_of(denial)
    assert fields["reason"] == "unknown_thumbprint"
    assert fields["thumbprint"] == bad["unknown-thumbprint"].thumbprint
    assert fields["destination"] == f"127.0.0.1:{origin.port}"
    assert fields["status"] == 403


@pytest.mark.parametrize(
    ("kind", "change", "reason"),
    [
        ("app", {"compliance_status": "noncompliant"}, "noncompliant"),
        ("app", {"enrollment_status": "unenrolled"}, "unenrolled"),
        ("app", {"blocked": True}, "blocked"),
        ("device", {"compliance_status": "unknown"}, "compliance_unknown"),
    ],
)
def test_policy_denials(
    pki: PKI,
    tunnel: ServiceThread,
    source: StaticSource,
    origin: Origin,
    clients: dict[str, Client],
    kind: str,
    change: dict[str, Any],
    reason: str,
) -> None:
    client = clients[kind]
    table = source.table
    table.apply_batch(table.seq + 1, table.seq + 1, [client.entry(**change)])
    mode_port = tunnel.service.bound["proxy" if kind == "app" else "per_app"]
    request = (
        f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\nCertgate-App: {APP}\r\n\r\n"
    ).encode()
    answer = connect_request(mode_port, tls_client(pki, client, ssl.TLSVersion.TLSv1_3), request)
    assert answer.startswith(b"HTTP/1.1 403") and reason.encode() in answer


def test_app_cert_of_another_app_is_refused(
    pki: PKI, tunnel: ServiceThread, origin: Origin, clients: dict[str, Client]
) -> None:
    request = (
        f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\nCertgate-App: {APP}\r\n\r\n"
    ).encode()
    answer = connect_request(
        tunnel.service.bound["proxy"],
        tls_client(pki, clients["other-app"], ssl.TLSVersion.TLSv1_3),
        request,
    )
    assert answer.startswith(b"HTTP/1.1 403") and b"app_mismatch" in answer


def test_device_cert_is_refused_in_proxy_mode(
    pki: PKI, tunnel: ServiceThread, origin: Origin, clients: dict[str, Client]
) -> None:
    request = f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    answer = connect_request(
        tunnel.service.bound["proxy"],
        tls_client(pki, clients["device"], ssl.TLSVersion.TLSv1_2),
        request,
    )
    assert answer.startswith(b"HTTP/1.1 403") and b"wrong_kind" in answer


def test_stale_table_fails_closed(
    pki: PKI,
    tunnel: ServiceThread,
    source: StaticSource,
    origin: Origin,
    clients: dict[str, Client],
) -> None:
    source.fresh = False
    request = f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    answer = connect_request(
        tunnel.service.bound["proxy"],
        tls_client(pki, clients["app"], ssl.TLSVersion.TLSv1_3),
        request,
    )
    assert answer.startswith(b"HTTP/1.1 503") and b"stale_table" in answer


def test_server_rules_deny_destination(
    pki: PKI, source: StaticSource, origin: Origin, clients: dict[str, Client], backend: str
) -> None:
    rules = {"default": "allow", "rules": [{"action": "deny", "cidrs": ["127.0.0.0/8"]}]}
    with ServiceThread(make_service(pki, source, rules, backend=backend)) as tunnel:
        request = f"CONNECT localhost:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        answer = connect_request(
            tunnel.service.bound["proxy"],
            tls_client(pki, clients["app"], ssl.TLSVersion.TLSv1_3),
            request,
        )
    assert answer.startswith(b"HTTP/1.1 403") and b"destination_denied" in answer


def test_unreachable_destination_is_502(
    pki: PKI, tunnel: ServiceThread, clients: dict[str, Client]
) -> None:
    closed_port = free_port()
    request = f"CONNECT 127.0.0.1:{closed_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    answer = connect_request(
        tunnel.service.bound["proxy"],
        tls_client(pki, clients["app"], ssl.TLSVersion.TLSv1_3),
        request,
    )
    assert answer.startswith(b"HTTP/1.1 502")


def test_policy_change_closes_live_tunnel(
    pki: PKI,
    tunnel: ServiceThread,
    source: StaticSource,
    origin: Origin,
    clients: dict[str, Client],
) -> None:
    client = clients["app"]
    ctx = tls_client(pki, client, ssl.TLSVersion.TLSv1_3)
    with (
        socket.create_connection(("127.0.0.1", tunnel.service.bound["proxy"]), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert tls.recv(4096).startswith(b"HTTP/1.1 200")
        table = source.table
        changes = tunnel.run(
            table.apply_batch,
            table.seq + 1,
            table.seq + 1,
            [client.entry(compliance_status="noncompliant")],
        )
        assert changes.touched == (client.thumbprint,)
        tunnel.run(tunnel.service.on_change, FeedChange(changes.touched, None, "batch"))
        tls.settimeout(10)
        try:
            leftover = tls.recv(4096)
        except (ssl.SSLError, ConnectionError):
            leftover = b""
    assert leftover == b""  # the tunnel was cut, nothing more arrives


def test_oversized_head_is_431(pki: PKI, tunnel: ServiceThread, clients: dict[str, Client]) -> None:
    request = b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n"
    answer = connect_request(
        tunnel.service.bound["proxy"],
        tls_client(pki, clients["app"], ssl.TLSVersion.TLSv1_3),
        request,
    )
    assert answer.startswith(b"HTTP/1.1 431")


def test_slow_head_times_out(
    pki: PKI, source: StaticSource, clients: dict[str, Client], backend: str
) -> None:
    with ServiceThread(
        make_service(pki, source, limits=Limits(header_timeout_s=0.5), backend=backend)
    ) as tunnel:
        answer = connect_request(
            tunnel.service.bound["proxy"],
            tls_client(pki, clients["app"], ssl.TLSVersion.TLSv1_3),
            b"CONNECT 127.0.0.1:80 HTTP/1.1\r\n",
        )
    assert answer.startswith(b"HTTP/1.1 408")


def admin_get(tunnel: ServiceThread, path: str) -> str:
    """``path`` of the node's admin listener, fetched by real curl."""
    url = f"http://127.0.0.1:{tunnel.service.bound['admin']}{path}"
    run = subprocess.run(
        ["curl", "-sS", url], capture_output=True, text=True, timeout=30, check=True
    )
    return run.stdout


def test_connection_limit(
    pki: PKI, source: StaticSource, clients: dict[str, Client], backend: str
) -> None:
    with ServiceThread(
        make_service(pki, source, limits=Limits(max_connections=1), backend=backend)
    ) as tunnel:
        ctx = tls_client(pki, clients["app"], ssl.TLSVersion.TLSv1_3)
        port = tunnel.service.bound["proxy"]
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as first,
            ctx.wrap_socket(first, server_hostname="localhost"),
        ):
            answer = connect_request(port, ctx, b"CONNECT 127.0.0.1:80 HTTP/1.1\r\n\r\n")
            metrics = admin_get(tunnel, "/metrics")
    assert answer == b""  # closed unanswered, and counted as a denial
    refused = 'certgate_tunnel_denials_total{mode="proxy",reason="connection_limit"} 1.0'
    assert refused in metrics.splitlines()


def test_health_and_metrics(pki: PKI, tunnel: ServiceThread, source: StaticSource) -> None:
    port = tunnel.service.bound["admin"]
    health, metrics = admin_get(tunnel, "/healthz"), admin_get(tunnel, "/metrics")
    assert '"status": "ok"' in health and f'"group_id": "{GROUP}"' in health
    assert "certgate_tunnel_table_entries" in metrics
    assert 'certgate_build_info{service="tunnel",version=' in metrics
    assert "process_open_fds " in metrics
    for mode, reason in (("proxy", "unknown_thumbprint"), ("per_app", "destination_denied")):
        zero = f'certgate_tunnel_denials_total{{mode="{mode}",reason="{reason}"}} 0.0'
        assert zero in metrics.splitlines()  # seeded: no connection was made yet
    source.fresh = False
    stale = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/healthz"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert stale.stdout == "503"
    stale_body = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()
    assert stale_body["error"] == "unhealthy" and stale_body["detail"].startswith("feed: ")
    live = httpx.get(f"http://127.0.0.1:{port}/livez", timeout=30)
    assert live.status_code == 200 and live.json() == {"status": "alive"}
    unknown = httpx.get(f"http://127.0.0.1:{port}/nothing", timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"


def test_graceful_shutdown_drains_open_tunnels(
    pki: PKI, source: StaticSource, origin: Origin, clients: dict[str, Client], backend: str
) -> None:
    running = ServiceThread(make_service(pki, source, backend=backend))
    running.__enter__()
    port = running.service.bound["proxy"]
    ctx = tls_client(pki, clients["app"], ssl.TLSVersion.TLSv1_3)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    try:
        tls.sendall(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert tls.recv(4096).startswith(b"HTTP/1.1 200")
        stopping = asyncio.run_coroutine_threadsafe(running.service.stop(drain_s=30), running.loop)
        deadline = time.monotonic() + 10
        while any(server.is_serving() for server in running.service.servers):
            assert time.monotonic() < deadline, "the listeners still accept during the drain"
            time.sleep(0.05)
        # The open tunnel still relays while draining.
        tls.sendall(b"GET / HTTP/1.1\r\nHost: intranet\r\nConnection: close\r\n\r\n")
        body = b""
        while chunk := tls.recv(65536):
            body += chunk
        assert body.endswith(PAGE)
    finally:
        tls.close()
    stopping.result(timeout=30)  # finishes once the drained tunnel is gone
    assert not running.service.shared.registry.all
    running.loop.call_soon_threadsafe(running.loop.stop)
    running.thread.join(timeout=10)
    running.loop.close()


class EchoOrigin:
    """A destination that sends back every byte it receives (both directions at once)."""

    def __enter__(self) -> EchoOrigin:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        return self

    def _serve(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        with conn:
            while data := conn.recv(1 << 20):
                conn.sendall(data)

    def __exit__(self, *exc: object) -> None:
        self.server.close()
        self.thread.join(timeout=10)


def test_a_large_transfer_both_ways_arrives_intact(
    pki: PKI, tunnel: ServiceThread, clients: dict[str, Client]
) -> None:
    payload = os.urandom(48 * 2**20)  # well past every socket and relay buffer
    ctx = tls_client(pki, clients["app"], ssl.TLSVersion.TLSv1_3)
    with (
        EchoOrigin() as echo,
        socket.create_connection(("127.0.0.1", tunnel.service.bound["proxy"]), 30) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert tls.recv(4096).startswith(b"HTTP/1.1 200")
        # An SSL socket is not safe to use from two threads at once, so this one thread
        # sends in slices and reads the echo as it goes, never more than 4 MiB behind.
        tls.settimeout(30)
        received, step = bytearray(), 2**20
        for offset in range(0, len(payload), step):
            tls.sendall(memoryview(payload)[offset : offset + step])
            while len(received) < offset - 4 * step:
                received += tls.recv(step)
        while len(received) < len(payload):
            chunk = tls.recv(step)
            assert chunk, f"the tunnel ended after {len(received)} bytes"
            received += chunk
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_a_refused_request_is_answered_before_the_close_however_much_follows(
    pki: PKI, tunnel: ServiceThread, clients: dict[str, Client]
) -> None:
    # The head overflows the 16 KiB limit after its first record; the client goes on
    # sending. The tunnel answers 431 and reads what follows instead of resetting,
    # so the answer is not destroyed by a reset before the client reads it.
    request = b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nX-Pad: " + b"a" * 512 * 1024 + b"\r\n\r\n"
    answer = connect_request(
        tunnel.service.bound["proxy"],
        tls_client(pki, clients["app"], ssl.TLSVersion.TLSv1_3),
        request,
    )
    assert answer.startswith(b"HTTP/1.1 431")


def test_metrics_count_connections_admissions_and_bytes(
    pki: PKI, tunnel: ServiceThread, origin: Origin, clients: dict[str, Client]
) -> None:
    url = f"http://127.0.0.1:{origin.port}/"
    for _ in range(2):
        assert curl(pki, tunnel, clients["app"], url, "--proxytunnel").returncode == 0

    def value(pattern: str) -> float:
        text = admin_get(tunnel, "/metrics")
        found = re.search(pattern + r" ([0-9.e+]+)", text)
        assert found, f"{pattern} missing from /metrics"
        return float(found.group(1))

    active = r'certgate_tunnel_active_connections\{listener="proxy"\}'
    deadline = time.monotonic() + 10  # curl is gone; the tunnel sees its close shortly
    while value(active) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert value(active) == 0
    assert value(r'certgate_tunnel_connections_total\{listener="proxy"\}') == 2
    assert value(r'certgate_tunnel_admissions_total\{mode="proxy"\}') == 2
    assert value(r'certgate_tunnel_bytes_total\{direction="down"\}') >= 2 * len(PAGE)
    assert value(r'certgate_tunnel_bytes_total\{direction="up"\}') > 0


def test_a_resumed_session_is_admitted_afresh(
    pki: PKI,
    tunnel: ServiceThread,
    source: StaticSource,
    origin: Origin,
    clients: dict[str, Client],
) -> None:
    # TLS 1.3 resumption skips the certificate chain check, never admission: a device
    # that falls out of policy is refused on a resumed connection too.
    client = clients["app"]
    ctx = tls_client(pki, client, ssl.TLSVersion.TLSv1_3)
    port = tunnel.service.bound["proxy"]
    request = f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()

    def connect(session: ssl.SSLSession | None) -> tuple[bytes, ssl.SSLSession | None, bool]:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
        ):
            tls.sendall(request)
            answer = tls.recv(4096)
            return answer, tls.session, tls.session_reused

    first, session, _ = connect(None)
    assert first.startswith(b"HTTP/1.1 200")
    table = source.table
    table.apply_batch(
        table.seq + 1, table.seq + 1, [client.entry(compliance_status="noncompliant")]
    )
    answer, _, reused = connect(session)
    assert reused, "the tunnel did not resume the session"
    assert answer.startswith(b"HTTP/1.1 403") and b"noncompliant" in answer


def test_a_swapped_identity_serves_new_connections_and_keeps_open_ones(
    pki: PKI, tunnel: ServiceThread, backend: str, origin: Origin, clients: dict[str, Client]
) -> None:
    # A rotated tunnel identity (runner.use_identity): new connections are served with the
    # new certificate; a tunnel opened before the swap keeps relaying.
    new_key = generate_key()
    new_cert = pki.authority.issue(
        Issuer(pki.scr, pki.scr_key),
        TUNNEL_IDENTITY,
        Names("tunnel rotated", identity.tunnel(GROUP), dns_names=("localhost",)),
        new_key.public_key(),
    )
    ctx = tls_client(pki, clients["app"], ssl.TLSVersion.TLSv1_3)
    port = tunnel.service.bound["proxy"]
    request = f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as before,
    ):
        before.sendall(request)
        assert before.recv(4096).startswith(b"HTTP/1.1 200")
        assert before.getpeercert(binary_form=True) == pki.tunnel.public_bytes(Encoding.DER)
        swapped = data_plane_tls([new_cert, pki.scr], new_key, [pki.device_root], backend=backend)
        tunnel.run(tunnel.service.swap_tls, swapped)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw_after,
            ctx.wrap_socket(raw_after, server_hostname="localhost") as after,
        ):
            after.sendall(request)
            assert after.recv(4096).startswith(b"HTTP/1.1 200")
            assert after.getpeercert(binary_form=True) == new_cert.public_bytes(Encoding.DER)
        before.sendall(get)  # the tunnel opened before the swap still relays
        answer = b""
        while PAGE not in answer and (chunk := before.recv(65536)):
            answer += chunk
        assert PAGE in answer


@pytest.mark.parametrize("group", [*SERVED, *REFUSED])
def test_key_exchange_groups(tunnel: ServiceThread, clients: dict[str, Client], group: str) -> None:
    # X25519, P-256 and P-384 only (Mozilla "intermediate"), on both backends.
    client = clients["app"]
    port = tunnel.service.bound["proxy"]
    used = negotiated_group(port, group, cert=client.cert_path, key=client.key_path)
    if group in SERVED:
        assert used is not None and SERVED[group] in used, used
    else:
        assert used is None, used
