"""The agent's SOCKS5 and HTTP listeners against the real tunnel data plane on loopback.

Each rule is observed on the wire: a tunnelled request shows up in the tunnel's log and at
the origin; a bypassed one reaches the origin without the tunnel seeing it; a blocked one
is refused with no connection attempted anywhere (origin, tunnel and a sentinel listener
all stay untouched). Real clients: httpx, requests and curl, unmodified.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from certgate.device.agent import AgentThread
from certgate.device.listeners import ListenAddress, app_from_proxy_authorization, attribute
from certgate.device.state import StateDir
from certgate.errors import ConfigError
from certgate.protocol.http_proxy import HTTPProxyParser, ProxyRequest
from certgate.protocol.socks5 import ReplyCode
from certgate.tunnel.sync import FeedChange
from certgate.tunnel.table import DeviceTable
from tests.device.harness import (
    BROWSER,
    MAIL,
    PAGE,
    Sentinel,
    TunnelLog,
    agent_config,
    counting_origin,
    http_get_via_socks,
    provision,
    raw_request,
    recv_all,
    socks_connect,
    tunnel_log,
)
from tests.tunnel.dataplane import (
    PKI,
    Client,
    ServiceThread,
    StaticSource,
    StreamingOrigin,
    make_service,
    policy,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def device(pki: PKI) -> Client:
    return pki.client_cert("device")


@pytest.fixture(scope="module")
def log() -> Iterator[TunnelLog]:
    with tunnel_log() as recorder:
        yield recorder


@pytest.fixture(scope="module")
def tunnel(pki: PKI, device: Client, log: TunnelLog) -> Iterator[ServiceThread]:
    source = StaticSource(DeviceTable.from_snapshot(1, [device.entry()]))
    with ServiceThread(make_service(pki, source)) as running:
        yield running


@pytest.fixture(scope="module")
def origin() -> Iterator[Any]:
    with counting_origin() as server:
        yield server


@pytest.fixture(scope="module")
def state(
    tmp_path_factory: pytest.TempPathFactory, pki: PKI, device: Client, tunnel: ServiceThread
) -> StateDir:
    directory = tmp_path_factory.mktemp("device") / "state"
    return provision(directory, pki, device, tunnel.service.bound["per_app"])


@pytest.fixture(scope="module")
def agent(state: StateDir) -> Iterator[AgentThread]:
    with AgentThread(state, agent_config()) as running:
        yield running


def port(agent: AgentThread, name: str) -> int:
    return agent.bound[name].port


def test_socks_tunnel_rule_goes_through_the_tunnel(
    agent: AgentThread, origin: Any, log: TunnelLog
) -> None:
    origin_port = origin.server_address[1]
    before = len(log.admits(dest=f"localhost:{origin_port}"))
    code, answer = http_get_via_socks(port(agent, "socks"), "localhost", origin_port)
    assert code == ReplyCode.SUCCEEDED
    assert answer.endswith(PAGE)
    admitted = log.admits(app="certgate.unattributed", dest=f"localhost:{origin_port}")
    assert len(admitted) == before + 1
    assert "listener=per_app" in admitted[-1]


def test_bypass_reaches_the_origin_directly(
    agent: AgentThread, origin: Any, log: TunnelLog
) -> None:
    origin_port = origin.server_address[1]
    seen = len(origin.requests)
    code, answer = http_get_via_socks(port(agent, "socks"), "127.0.0.1", origin_port)
    assert code == ReplyCode.SUCCEEDED and answer.endswith(PAGE)
    assert len(origin.requests) == seen + 1
    assert log.admits(dest=f"127.0.0.1:{origin_port}") == []  # the tunnel never saw it


def test_block_is_refused_without_any_connection(state: StateDir, log: TunnelLog) -> None:
    """The mail app is blocked from localhost, where the browser would be tunnelled: had
    the agent not refused, the tunnel would have connected to the sentinel."""
    sentinel = Sentinel()
    lines = len(log.lines)
    try:
        with AgentThread(state, agent_config(default_app=MAIL)) as mail_agent:
            sock, code = socks_connect(port(mail_agent, "socks"), "localhost", sentinel.port)
            sock.close()
            answer = raw_request(
                port(mail_agent, "http"),
                f"CONNECT localhost:{sentinel.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            )
    finally:
        sentinel.close()
    assert code == ReplyCode.NOT_ALLOWED_BY_RULESET
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"blocked by device rule 1 (block): app com.example.mail" in answer
    assert sentinel.accepted == 0
    assert log.lines[lines:] == []  # the tunnel saw nothing either


def test_default_rule_blocks_unlisted_destinations(agent: AgentThread) -> None:
    answer = raw_request(
        port(agent, "http"), b"GET http://elsewhere.test/ HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert answer.endswith(
        b"certgate: blocked by the default device rule (block): app certgate.unattributed "
        b"may not reach elsewhere.test:80\n"
    )


def test_same_destination_is_tunnelled_for_one_app_and_blocked_for_another(
    agent: AgentThread, origin: Any, log: TunnelLog
) -> None:
    origin_port = origin.server_address[1]
    url = f"http://localhost:{origin_port}/per-app"
    seen, admits = len(origin.requests), len(log.admits(app=BROWSER))
    browser = httpx.get(url, proxy=f"http://127.0.0.1:{port(agent, f'app:{BROWSER}')}", timeout=20)
    mail = httpx.get(url, proxy=f"http://{MAIL}:app@127.0.0.1:{port(agent, 'http')}", timeout=20)
    assert browser.status_code == 200 and browser.content == PAGE
    assert mail.status_code == 403
    assert mail.text == f"certgate: blocked by device rule 1 (block): app {MAIL} may not reach " + (
        f"localhost:{origin_port}\n"
    )
    assert origin.requests[seen:] == ["/per-app"]
    assert len(log.admits(app=BROWSER)) == admits + 1


def test_requests_and_curl_as_unmodified_clients(agent: AgentThread, origin: Any) -> None:
    origin_port = origin.server_address[1]
    proxy = f"http://127.0.0.1:{port(agent, f'app:{BROWSER}')}"
    url = f"http://localhost:{origin_port}/requests"
    answer = requests.get(url, proxies={"http": proxy}, timeout=20)
    assert answer.status_code == 200 and answer.content == PAGE
    for extra in ([], ["--proxytunnel"]):
        curl = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--proxy", proxy, *extra, url],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert curl.returncode == 0, curl.stderr
        assert curl.stdout == PAGE


def test_a_per_app_port_refuses_another_app(agent: AgentThread, origin: Any) -> None:
    origin_port = origin.server_address[1]
    answer = raw_request(
        port(agent, f"app:{BROWSER}"),
        f"CONNECT localhost:{origin_port} HTTP/1.1\r\nHost: x\r\n"
        f"Certgate-App: {MAIL}\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert f"this port belongs to {BROWSER}, not {MAIL}".encode() in answer


def test_malformed_requests_fail_cleanly(agent: AgentThread) -> None:
    assert raw_request(port(agent, "http"), b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    answer = raw_request(port(agent, "http"), b"GET https://x.test/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"use CONNECT" in answer
    assert raw_request(port(agent, "socks"), b"\x04\x01\x00\x50") == b""  # SOCKS4: closed


def test_tunnel_refusal_is_reported_to_the_client(
    tmp_path: Path, pki: PKI, tunnel: ServiceThread, origin: Any
) -> None:
    stranger = pki.client_cert("stranger")  # a valid cert the tunnel's table does not know
    state = provision(tmp_path / "s", pki, stranger, tunnel.service.bound["per_app"])
    origin_port = origin.server_address[1]
    with AgentThread(state, agent_config()) as running:
        answer = raw_request(
            port(running, "http"),
            f"CONNECT localhost:{origin_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        )
        sock, code = socks_connect(port(running, "socks"), "localhost", origin_port)
        sock.close()
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"tunnel refused with 403: unknown_thumbprint" in answer
    assert code == ReplyCode.NOT_ALLOWED_BY_RULESET


def test_a_tunnel_closed_by_policy_is_reset_for_the_local_client_too(
    tmp_path: Path, pki: PKI
) -> None:
    """The tunnel ends a tunnel that policy closes with a TCP reset; the agent passes the
    reset on, so its client (raw SOCKS5 here: the bytes have no framing of their own) sees
    an error too, never an end of stream it could take for a complete answer."""
    device = pki.client_cert("cut-by-policy")
    source = StaticSource(DeviceTable.from_snapshot(1, [device.entry()]))
    with ServiceThread(make_service(pki, source)) as tunnel, StreamingOrigin() as origin:
        state = provision(tmp_path / "s", pki, device, tunnel.service.bound["per_app"])
        with AgentThread(state, agent_config()) as running:
            sock, code = socks_connect(port(running, "socks"), "localhost", origin.port)
            with sock:
                assert code == ReplyCode.SUCCEEDED
                sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
                streamed = b""
                while b"chunk 1" not in streamed:  # the stream flows (a 10 s socket timeout)
                    streamed += sock.recv(65536)

                def deny_everything() -> None:
                    source.policy = policy({"default": "deny", "rules": []}, version=2)
                    tunnel.service.on_change(FeedChange(None, time.time(), "policy"))

                tunnel.run(deny_everything)
                with pytest.raises(ConnectionResetError):
                    while sock.recv(65536):
                        pass


def test_unreachable_tunnel_is_a_502(tmp_path: Path, pki: PKI, device: Client) -> None:
    closed = Sentinel()
    closed.close()  # a port nobody listens on any more
    state = provision(tmp_path / "s", pki, device, closed.port)
    with AgentThread(state, agent_config()) as running:
        answer = raw_request(
            port(running, "http"), b"CONNECT localhost:80 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        sock, code = socks_connect(port(running, "socks"), "localhost", 80)
        sock.close()
    assert answer.startswith(b"HTTP/1.1 502 ") and b"no tunnel endpoint reachable" in answer
    assert code == ReplyCode.NETWORK_UNREACHABLE


def test_head_timeout_answers_408(tmp_path: Path, pki: PKI, device: Client) -> None:
    from certgate.device.listeners import Timeouts

    state = provision(tmp_path / "s", pki, device, 9)
    config = agent_config(timeouts=Timeouts(head_s=0.2, connect_s=1, idle_s=1))
    with AgentThread(state, config) as running:
        assert raw_request(port(running, "http"), b"CONNECT x").startswith(b"HTTP/1.1 408 ")


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300), listener=st.sampled_from(["socks", "http"]))
def test_garbage_gets_an_answer_or_a_close_never_a_hang(
    agent: AgentThread, data: bytes, listener: str
) -> None:
    with socket.create_connection(("127.0.0.1", port(agent, listener)), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # EOF: a parser still waiting must give up now
        answer = recv_all(sock)
    if listener == "http" and answer:
        assert answer.startswith(b"HTTP/1.1 4") or answer.startswith(b"HTTP/1.1 5")


def test_the_agent_still_serves_after_the_garbage(agent: AgentThread, origin: Any) -> None:
    origin_port = origin.server_address[1]
    assert http_get_via_socks(port(agent, "socks"), "localhost", origin_port)[1].endswith(PAGE)


# -- pure parts --------------------------------------------------------------------------


def _request(head: bytes) -> ProxyRequest:
    parser = HTTPProxyParser()
    parser.receive_data(head)
    event = parser.next_event()
    assert isinstance(event, ProxyRequest)
    return event


def _basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:".encode()).decode()


def test_proxy_authorization_names_an_app_or_nothing() -> None:
    assert app_from_proxy_authorization(_basic(BROWSER)) == BROWSER
    assert app_from_proxy_authorization(_basic("not an app")) is None
    assert app_from_proxy_authorization("Bearer abc") is None
    assert app_from_proxy_authorization("Basic !!!") is None
    assert app_from_proxy_authorization(None) is None


@pytest.mark.parametrize(
    ("headers", "port_app", "expected"),
    [
        ("", None, "default.app"),
        (f"Certgate-App: {MAIL}\r\n", None, MAIL),
        (f"Proxy-Authorization: {_basic(MAIL)}\r\n", None, MAIL),
        ("", BROWSER, BROWSER),
        (f"Certgate-App: {BROWSER}\r\n", BROWSER, BROWSER),
    ],
)
def test_attribution(headers: str, port_app: str | None, expected: str) -> None:
    head = f"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n{headers}\r\n".encode()
    assert attribute(_request(head), port_app, "default.app") == expected


def test_listen_address_parsing_and_loopback() -> None:
    assert ListenAddress.parse("127.0.0.1:1080") == ListenAddress("127.0.0.1", 1080)
    assert ListenAddress.parse("[::1]:3128").is_loopback
    assert ListenAddress.parse("localhost:1").is_loopback
    assert not ListenAddress.parse("0.0.0.0:1080").is_loopback
    for bad in ("1080", "host:", "host:99999"):
        with pytest.raises(ConfigError):
            ListenAddress.parse(bad)
