"""Cascade mode in process: a front end and a back end (real TunnelServices on loopback, real
TLS), real clients (curl, Python's ssl sockets), a real origin. The header and refusal
helpers of ``tunnel.cascade`` by table. The scenario with real processes and HAProxy is
tests/integration/test_cascade.py."""

from __future__ import annotations

import secrets
import socket
import ssl
import subprocess
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from kdcproxy import codec

from certgate.addresses import ListenAddress
from certgate.errors import BadRequest, ChainError, ConfigError
from certgate.pki import identity
from certgate.pki.authority import Authority, Issuer, Names
from certgate.pki.keys import generate_key
from certgate.pki.profiles import TUNNEL_IDENTITY
from certgate.protocol.client_cert_header import encode_client_cert
from certgate.protocol.datagram import Datagram, encode
from certgate.protocol.http_proxy import Headers, HTTPProxyParser, ProxyRequest
from certgate.tunnel.admission import Mode
from certgate.tunnel.cascade import (
    Cascade,
    HopRefused,
    Role,
    answer_status,
    front_end_tls,
    refusal_of,
)
from certgate.tunnel.kdcproxy import frame
from certgate.tunnel.rules import Transport
from certgate.tunnel.server import Gate, Limits
from certgate.tunnel.service import Endpoint, TunnelService, data_plane_tls
from certgate.tunnel.table import DeviceTable
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
    policy,
    tls_client,
)
from tests.tunnel.test_kdcproxy import REPLY, ask_node, serve_tcp
from tests.tunnel.test_udp import UDP_RULES, Echo, open_udp, read_datagrams

TLS13 = ssl.TLSVersion.TLSv1_3


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def clients(pki: PKI) -> dict[str, Client]:
    return {"app": pki.client_cert("app", app=APP), "device": pki.client_cert("device")}


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    with Origin() as running:
        yield running


def table_of(*clients: Client) -> DeviceTable:
    return DeviceTable.from_snapshot(1, [c.entry() for c in clients])


def cascade(pki: PKI, role: Role, *back_ends: ListenAddress) -> Cascade:
    client_tls = None
    if role is Role.FRONT_END:
        client_tls = front_end_tls([pki.tunnel, pki.scr], pki.tunnel_key, [pki.scr])
    return Cascade(role, GROUP, pki.root, (pki.device_root,), back_ends, client_tls)


def service(pki: PKI, source: StaticSource, node: Cascade) -> TunnelService:
    client_ca = pki.scr if node.role is Role.BACK_END else pki.device_root
    here = Endpoint("127.0.0.1", 0)
    return TunnelService(
        Gate(GROUP, source, cascade=node),
        data_plane_tls([pki.tunnel, pki.scr], pki.tunnel_key, [client_ca]),
        here,
        here,
        here,
        Limits(),
    )


@pytest.fixture
def back_source(clients: dict[str, Client]) -> StaticSource:
    return StaticSource(table_of(*clients.values()))


@pytest.fixture
def back(pki: PKI, back_source: StaticSource) -> Iterator[ServiceThread]:
    with ServiceThread(service(pki, back_source, cascade(pki, Role.BACK_END))) as running:
        yield running


@pytest.fixture
def front(pki: PKI, clients: dict[str, Client], back: ServiceThread) -> Iterator[ServiceThread]:
    back_end = ListenAddress("127.0.0.1", back.service.bound["proxy"])
    node = cascade(pki, Role.FRONT_END, back_end)
    source = StaticSource(table_of(*clients.values()))
    with ServiceThread(service(pki, source, node)) as running:
        yield running


def per_app_connect(origin: Origin) -> bytes:
    return (
        f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
        f"Certgate-App: {APP}\r\n\r\n"
        "GET / HTTP/1.1\r\nHost: intranet\r\nConnection: close\r\n\r\n"
    ).encode()


def curl(pki: PKI, port: int, client: Client, url: str, *extra: str) -> str:
    result = subprocess.run(
        [
            *("curl", "-sS", "--max-time", "20", "--proxy", f"https://localhost:{port}"),
            *("--proxy-cacert", str(pki.work / "chain.pem")),
            *("--proxy-cert", str(client.cert_path), "--proxy-key", str(client.key_path)),
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.stdout


def tunnel_client(pki: PKI, group: str = GROUP) -> Client:
    """A TLS client presenting a tunnel identity of ``group`` (issued by the SCR)."""
    key = generate_key()
    cert = Authority().issue(
        Issuer(pki.scr, pki.scr_key),
        TUNNEL_IDENTITY,
        Names("tunnel", identity.tunnel(group), dns_names=("localhost",)),
        key.public_key(),
    )
    return pki.save(f"tunnel-{group}", cert, key, secrets.token_hex(16), None)


# -- through both ends -------------------------------------------------------------------


def test_per_app_tunnel_relays_through_front_and_back_end(
    pki: PKI,
    clients: dict[str, Client],
    origin: Origin,
    front: ServiceThread,
    back: ServiceThread,
) -> None:
    ctx = tls_client(pki, clients["device"], TLS13)
    answer = connect_request(front.service.bound["per_app"], ctx, per_app_connect(origin))
    assert answer.startswith(b"HTTP/1.1 200 Connection established\r\n")
    assert answer.endswith(PAGE)
    # The back end admitted it too (its own table, the mode the front end passed on).
    assert back.service.metrics.listener("proxy", "proxy").admissions == 1


def test_proxy_mode_absolute_form_and_connect_through_the_cascade(
    pki: PKI, clients: dict[str, Client], origin: Origin, front: ServiceThread
) -> None:
    url, port = f"http://127.0.0.1:{origin.port}/", front.service.bound["proxy"]
    assert curl(pki, port, clients["app"], url).encode() == PAGE
    assert curl(pki, port, clients["app"], url, "--proxytunnel").encode() == PAGE


def test_the_back_end_admits_again_from_its_own_table(
    pki: PKI,
    clients: dict[str, Client],
    origin: Origin,
    front: ServiceThread,
    back_source: StaticSource,
) -> None:
    back_source.table = table_of(clients["app"])  # the back end does not know the device
    ctx = tls_client(pki, clients["device"], TLS13)
    answer = connect_request(front.service.bound["per_app"], ctx, per_app_connect(origin))
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert answer.endswith(b"certgate: unknown_thumbprint\n")


def test_a_back_end_policy_close_ends_the_device_tunnel(
    pki: PKI,
    clients: dict[str, Client],
    origin: Origin,
    front: ServiceThread,
    back: ServiceThread,
    back_source: StaticSource,
) -> None:
    """The back end registered the tunnel under the device's thumbprint: a change of that
    device at the back end alone closes it, and the device sees its tunnel end."""
    ctx = tls_client(pki, clients["device"], TLS13)
    with socket.create_connection(("127.0.0.1", front.service.bound["per_app"]), 10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            connect = per_app_connect(origin).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
            tls.sendall(connect)
            assert tls.recv(4096).startswith(b"HTTP/1.1 200")
            device = clients["device"]
            back_source.table = DeviceTable.from_snapshot(
                2, [device.entry(compliance_status="noncompliant"), clients["app"].entry()]
            )
            gate = back.service.gate
            closed = back.run(
                back.service.shared.registry.enforce, gate, (device.thumbprint,), "test"
            )
            assert closed == 1
            assert ended(tls)


def ended(tls: ssl.SSLSocket) -> bool:
    """The tunnel ends (a reset or an end of stream) within 10 s; a timeout raises."""
    tls.settimeout(10)
    try:
        return tls.recv(4096) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def test_udp_flows_cross_the_cascade(
    pki: PKI,
    clients: dict[str, Client],
    front: ServiceThread,
    back: ServiceThread,
    back_source: StaticSource,
) -> None:
    """The front end carries a UDP tunnel as bytes; the back end decodes the frames,
    applies the rules for UDP and sends the datagrams."""
    back_source.policy = policy(UDP_RULES)
    with Echo() as echo:
        port = front.service.bound["per_app"]
        tls, head = open_udp(pki, clients["device"], port, echo.port)
        with tls:
            assert head.startswith(b"HTTP/1.1 200"), head
            tls.sendall(encode(1, b"one") + encode(2, b"two"))
            replies = read_datagrams(tls, 2, head.partition(b"\r\n\r\n")[2])
            live = back.run(back.service.live_tunnels)
    assert sorted(replies, key=lambda d: d.flow) == [
        Datagram(1, b"echo:one"),
        Datagram(2, b"echo:two"),
    ]
    assert [(t["transport"], t["port"]) for t in live] == [("udp", echo.port)]


# -- who may talk to a back end ----------------------------------------------------------


def test_a_device_cannot_reach_a_back_end(
    pki: PKI, clients: dict[str, Client], origin: Origin, back: ServiceThread
) -> None:
    ctx = tls_client(pki, clients["device"], TLS13)
    assert connect_request(back.service.bound["per_app"], ctx, per_app_connect(origin)) == b""


def test_a_back_end_refuses_another_groups_tunnel(
    pki: PKI, origin: Origin, back: ServiceThread
) -> None:
    ctx = tls_client(pki, tunnel_client(pki, "g2"), TLS13)
    answer = connect_request(back.service.bound["proxy"], ctx, per_app_connect(origin))
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert answer.endswith(b"certgate: identity\n")


def forged(pki: PKI, origin: Origin, *fields: str) -> bytes:
    head = f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n"
    return (head + "".join(f"{f}\r\n" for f in fields) + "\r\n").encode()


def test_a_back_end_refuses_bad_device_fields_from_a_front_end(
    pki: PKI, clients: dict[str, Client], origin: Origin, back: ServiceThread
) -> None:
    outsider = pki.client_cert(
        "outsider",
        authority=Authority(),
        issuer=Issuer(pki.scr, pki.scr_key),  # a certificate the Device Root did not issue
    )
    good = f"Client-Cert: {encode_client_cert(clients['app'].cert)}"
    cases = {
        "missing": ([], 400, "bad_request"),
        "malformed": (
            ["Client-Cert: :not base64!:", "Certgate-Cascade-Mode: proxy"],
            400,
            "bad_request",
        ),
        "not from the Device Root": (
            [f"Client-Cert: {encode_client_cert(outsider.cert)}", "Certgate-Cascade-Mode: proxy"],
            403,
            "identity",
        ),
        "no mode": ([good], 400, "bad_request"),
    }
    ctx = tls_client(pki, tunnel_client(pki), TLS13)
    for name, (fields, status, reason) in cases.items():
        answer = connect_request(back.service.bound["proxy"], ctx, forged(pki, origin, *fields))
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), (name, answer)
        assert answer.endswith(f"certgate: {reason}\n".encode()), name


# -- the pure parts ----------------------------------------------------------------------


def test_connect_head_round_trips_through_device_of(pki: PKI, clients: dict[str, Client]) -> None:
    front = cascade(pki, Role.FRONT_END, ListenAddress("127.0.0.1", 1))
    der = clients["device"].cert.public_bytes(Encoding.DER)
    head = front.connect_head("intranet", 443, APP, Transport.UDP, Mode.PER_APP, der)
    parser = HTTPProxyParser()
    parser.receive_data(head)
    request = parser.next_event()
    assert isinstance(request, ProxyRequest)
    assert (request.host, request.port) == ("intranet", 443)
    assert request.headers.get("Certgate-App") == APP
    assert request.headers.get("Certgate-Transport") == "udp"
    back = cascade(pki, Role.BACK_END)
    assert back.device_of(request.headers) == (der, Mode.PER_APP)
    v6 = front.connect_head("::1", 53, None, Transport.TCP, Mode.PROXY, der)
    assert v6.startswith(b"CONNECT [::1]:53 HTTP/1.1\r\n")
    assert b"Certgate-App" not in v6


def test_device_of_refuses_a_mode_it_does_not_know(pki: PKI, clients: dict[str, Client]) -> None:
    value = encode_client_cert(clients["device"].cert)
    headers = Headers((("Client-Cert", value), ("Certgate-Cascade-Mode", "admin")))
    with pytest.raises(BadRequest, match="Certgate-Cascade-Mode"):
        cascade(pki, Role.BACK_END).device_of(headers)


def test_check_peer_takes_only_this_groups_tunnel(pki: PKI) -> None:
    node = cascade(pki, Role.BACK_END)
    node.check_peer(pki.tunnel.public_bytes(Encoding.DER))
    with pytest.raises(ChainError, match="is not a tunnel of group"):
        node.check_peer(tunnel_client(pki, "g2").cert.public_bytes(Encoding.DER))


@pytest.mark.parametrize(
    ("role", "back_ends", "message"),
    [
        (Role.FRONT_END, (), "needs at least one --back-end"),
        (Role.FRONT_END, (ListenAddress("back.example", 2020),), "must be an IP address"),
        (Role.BACK_END, (ListenAddress("127.0.0.1", 2020),), "is for front ends"),
    ],
)
def test_cascade_settings_are_checked(
    pki: PKI, role: Role, back_ends: tuple[ListenAddress, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        cascade(pki, role, *back_ends)


def test_back_ends_are_taken_in_turn(pki: PKI) -> None:
    a, b = ListenAddress("127.0.0.1", 1), ListenAddress("127.0.0.2", 2)
    node = cascade(pki, Role.FRONT_END, a, b)
    assert [node.back_end_order() for _ in range(3)] == [[a, b], [b, a], [a, b]]


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"HTTP/1.1 200 Connection established", 200),
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3", 403),
        (b"HTTP/1.0 200 OK", None),
        (b"HTTP/1.1 abc", None),
        (b"", None),
    ],
)
def test_answer_status(head: bytes, status: int | None) -> None:
    assert answer_status(head) == status


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"certgate: noncompliant\n", "noncompliant"),
        (b"", "back_end_refused"),
        (b"certgate: <script>\n", "back_end_refused"),
        (b"something else", "back_end_refused"),
    ],
)
def test_refusal_of_passes_on_the_back_ends_reason(body: bytes, reason: str) -> None:
    back_end = ListenAddress("127.0.0.1", 9)
    assert refusal_of(403, body, back_end) == HopRefused(
        403, reason, "back end 127.0.0.1:9 answered 403"
    )


def test_a_device_of_either_device_root_passes_during_a_rotation(
    pki: PKI, clients: dict[str, Client]
) -> None:
    next_root, _ = pki._intermediate("Device Root (next)")
    headers = Headers(
        (
            ("Client-Cert", encode_client_cert(clients["device"].cert)),
            ("Certgate-Cascade-Mode", "per_app"),
        )
    )
    both = Cascade(Role.BACK_END, GROUP, pki.root, (next_root, pki.device_root))
    assert both.device_of(headers)[1] is Mode.PER_APP
    only_next = Cascade(Role.BACK_END, GROUP, pki.root, (next_root,))
    with pytest.raises(ChainError, match="client certificate rejected"):
        only_next.device_of(headers)


def test_a_kdc_request_crosses_the_cascade_and_only_the_back_end_asks_the_kdc(
    pki: PKI,
    clients: dict[str, Client],
    front: ServiceThread,
    back: ServiceThread,
    back_source: StaticSource,
) -> None:
    """The KKDCP frame comes before any answer: the front end reads it and sends it with
    its hop's head; the back end serves the exchange. The front end's policy names no KDC
    (it would refuse realm_not_served if it served the request itself)."""
    server, kdc_port, seen = back.call(serve_tcp(frame(REPLY)))
    back_source.policy = policy(kerberos={"CORP.TEST": [f"tcp/127.0.0.1:{kdc_port}"]})
    answer = ask_node(pki, clients["device"], front.service.bound["per_app"], "CORP.TEST")
    back.run(server.close)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    assert body == frame(codec.encode(frame(REPLY)))
    assert len(seen) == 1
