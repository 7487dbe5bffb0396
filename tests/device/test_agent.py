"""The agent: validated configuration, identity swaps, and ``device exec`` attributing a
command's traffic to an app, with an in-process agent or through a running one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from certgate.device.agent import (
    PROXY_VARIABLES,
    AgentConfig,
    AgentThread,
    exec_command,
    proxy_environment,
    running_agent_proxy,
)
from certgate.device.listeners import ListenAddress
from certgate.device.state import StateDir
from certgate.errors import ConfigError
from certgate.tunnel.table import DeviceTable
from tests.device.harness import (
    BROWSER,
    MAIL,
    PAGE,
    TunnelLog,
    agent_config,
    counting_origin,
    provision,
    raw_request,
    tunnel_log,
)
from tests.tunnel.dataplane import PKI, Client, ServiceThread, StaticSource, make_service

pytestmark = pytest.mark.integration
LOOPBACK = ListenAddress("127.0.0.1", 0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"http": ListenAddress("0.0.0.0", 3128)}, "refusing to listen on 0.0.0.0:3128"),
        ({"socks": ListenAddress("192.0.2.1", 1)}, "--unsafe-listen-any"),
        ({"app_ports": (("bad app", LOOPBACK),)}, "invalid application bundle id"),
        ({"app_ports": ((BROWSER, LOOPBACK), (BROWSER, LOOPBACK))}, "only one dedicated port"),
        ({"socks": None, "http": None}, "at least one listener"),
        ({"renew_fraction": 1.5}, "between 0 and 1"),
        ({"check_interval_s": 0}, "must be positive"),
    ],
)
def test_invalid_configuration_is_refused_at_construction(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        AgentConfig(**overrides)


def test_non_loopback_listeners_need_the_unsafe_flag() -> None:
    config = AgentConfig(http=ListenAddress("0.0.0.0", 0), unsafe_listen_any=True)
    assert config.http == ListenAddress("0.0.0.0", 0)


def test_proxy_environment_points_every_variable_at_the_agent() -> None:
    env = proxy_environment(
        "http://127.0.0.1:1", {"PATH": "/bin", "NO_PROXY": "*", "no_proxy": "x"}
    )
    assert {k: env[k] for k in PROXY_VARIABLES} == dict.fromkeys(
        PROXY_VARIABLES, "http://127.0.0.1:1"
    )
    assert "NO_PROXY" not in env and "no_proxy" not in env and env["PATH"] == "/bin"


# -- with the real data plane --------------------------------------------------------------


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


@pytest.fixture
def state(tmp_path: Path, pki: PKI, device: Client, tunnel: ServiceThread) -> StateDir:
    return provision(tmp_path / "state", pki, device, tunnel.service.bound["per_app"])


def curl_command(url: str) -> list[str]:
    return ["curl", "-sS", "--max-time", "20", "-w", "\\n%{http_code}", url]


def test_exec_starts_an_agent_for_the_command_when_none_runs(
    state: StateDir, origin: Any, log: TunnelLog, capfd: pytest.CaptureFixture[str]
) -> None:
    url = f"http://localhost:{origin.server_address[1]}/exec"
    before = len(log.admits(app=BROWSER))
    assert exec_command(state, BROWSER, curl_command(url)) == 0
    assert capfd.readouterr().out == PAGE.decode() + "\n200"
    assert len(log.admits(app=BROWSER)) == before + 1
    assert state.runtime() is None  # a command's private agent is not published


def test_exec_uses_a_running_agent(
    state: StateDir, origin: Any, log: TunnelLog, capfd: pytest.CaptureFixture[str]
) -> None:
    url = f"http://localhost:{origin.server_address[1]}/exec"
    with AgentThread(state, agent_config(publish_runtime=True)) as running:
        app_port = running.bound[f"app:{BROWSER}"].port
        http_port = running.bound["http"].port
        assert running_agent_proxy(state, BROWSER) == f"http://127.0.0.1:{app_port}"
        assert running_agent_proxy(state, MAIL) == f"http://{MAIL}:app@127.0.0.1:{http_port}"
        seen = len(origin.requests)
        assert exec_command(state, BROWSER, curl_command(url)) == 0
        assert exec_command(state, MAIL, curl_command(url)) == 0
    browser, mail = capfd.readouterr().out.split("\n200")
    assert browser == PAGE.decode()
    assert mail.startswith("certgate: blocked by device rule 1 (block): app com.example.mail")
    assert mail.endswith("\n403")
    assert origin.requests[seen:] == ["/exec"]
    assert state.runtime() is None  # removed when that agent stopped


def test_a_stale_runtime_file_is_ignored(state: StateDir) -> None:
    state.save_runtime({"pid": 2**22 + 12345, "http": ["127.0.0.1", 9], "app_ports": {}})
    assert running_agent_proxy(state, BROWSER) is None
    state.save_runtime({"pid": os.getpid(), "http": ["127.0.0.1", 9], "app_ports": {}})
    assert running_agent_proxy(state, BROWSER) is None  # nobody listens there


def test_exec_refuses_bad_input(state: StateDir) -> None:
    with pytest.raises(ConfigError, match="bundle id"):
        exec_command(state, "no spaces", ["true"])
    with pytest.raises(ConfigError, match="no command"):
        exec_command(state, BROWSER, [])


def test_a_replaced_identity_is_swapped_in_without_restart(
    tmp_path: Path, pki: PKI, tunnel: ServiceThread, state: StateDir, origin: Any
) -> None:
    request = f"CONNECT localhost:{origin.server_address[1]} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with AgentThread(state, agent_config()) as running:
        http = running.bound["http"].port
        get = b"GET / HTTP/1.1\r\nHost: intranet\r\nConnection: close\r\n\r\n"
        assert raw_request(http, request + get).endswith(PAGE)
        assert running.agent is not None
        assert not running.call(_reload(running))  # nothing changed on disk
        # Another command stores a new identity (one this tunnel does not know yet).
        provision(state.path, pki, pki.client_cert("next"), tunnel.service.bound["per_app"])
        assert running.call(_reload(running))
        answer = raw_request(http, request)
    assert answer.startswith(b"HTTP/1.1 403 ") and b"unknown_thumbprint" in answer


async def _reload(running: AgentThread) -> bool:
    assert running.agent is not None
    return running.agent.reload_if_changed()
