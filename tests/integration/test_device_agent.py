"""Scenario: a device enrolls with a real console, gets its Per-App Tunnel profile and a
Proxy-mode app certificate, and runs ``certgate device run`` as a real process in front
of the group's tunnel (set up through the console API, following its signed feed).

Shows, in order: tunnel / bypass / block each observed on the wire (tunnel log, origin,
a sentinel listener) with curl, requests and httpx as unmodified clients; curl through
the tunnel's Proxy listener with the exported app certificate (PEM and PKCS#12); that
certificate refused when it claims another app; ``device exec`` through the running
agent; a re-delivered profile making the old device certificate useless while the agent
switches to the new one; renewal by the agent itself; and the agent stopping with exit
code 3 and re-enrollment guidance once the device is unenrolled.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from typer.testing import CliRunner

from certgate.cli import app
from certgate.device.agent import AgentConfig, AgentThread
from certgate.device.listeners import ListenAddress
from certgate.device.profile import load_profile
from certgate.device.state import CertifiedKey, StateDir
from certgate.device.tunnel_client import TunnelClient, TunnelError, TunnelRefused
from tests.device.console_side import (
    PASSWORD,
    USER,
    ConsoleTunnel,
    add_enrollment_user,
    configure_group,
    enrollment_token,
    root_pem,
    unenroll,
)
from tests.device.harness import (
    BROWSER,
    MAIL,
    PAGE,
    RULES,
    Agent,
    Sentinel,
    TunnelLog,
    counting_origin,
    start_agent,
    tunnel_log,
)
from tests.support import CERTGATE, RunningConsole

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("console", ["sqlite"], indirect=True),
]
P12_PASSWORD = "p12-export-password"
ENV = {"COLUMNS": "200", "ALICE_PW": PASSWORD, "P12_PW": P12_PASSWORD}
runner = CliRunner()


def device_cli(*args: str) -> str:
    result = runner.invoke(app, ["device", *args], env=ENV)
    assert result.exit_code == 0, result.output
    return result.output


@dataclass
class World:
    console: RunningConsole
    tunnel: ConsoleTunnel
    tunnel_log: TunnelLog
    origin: Any
    state: StateDir
    ca_file: Path
    agent: Agent

    @property
    def origin_port(self) -> int:
        port: int = self.origin.server_address[1]
        return port


@pytest.fixture(scope="module")
def world(console: RunningConsole, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("device-agent")
    tunnel = ConsoleTunnel(console, work)
    configure_group(console, RULES, tunnel.per_app_port, tunnel.proxy_port)
    add_enrollment_user(console)
    ca_file = work / "root.pem"
    ca_file.write_bytes(root_pem(console))
    with tunnel_log() as log, tunnel, counting_origin() as origin:
        state = _device(console, ca_file, work / "device")
        agent = start_agent(state, work)
        try:
            yield World(console, tunnel, log, origin, state, ca_file, agent)
        finally:
            if agent.proc.poll() is None:
                agent.proc.terminate()
                agent.proc.wait(timeout=20)


def _device(console: RunningConsole, ca_file: Path, directory: Path) -> StateDir:
    state = ["-s", str(directory)]
    token = enrollment_token(console)
    device_cli(
        "enroll", "--console", console.url, "--ca-file", str(ca_file), "--token", token, *state
    )
    device_cli("profile", *state)
    device_cli("app-auth", "--app", BROWSER, "--user", USER, "--password-env", "ALICE_PW",
               "--p12-password-env", "P12_PW", *state)  # fmt: skip
    return StateDir(directory)


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args], capture_output=True, timeout=60, check=False
    )


def wait_until(condition: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.1)


def test_tunnel_bypass_and_block_are_seen_on_the_wire(world: World) -> None:
    port, log = world.origin_port, world.tunnel_log
    seen = len(world.origin.requests)
    # tunnel: curl on the browser's own port; the tunnel admits it, naming the app.
    tunnelled = curl("--proxy", f"http://127.0.0.1:{world.agent.browser}",
                     f"http://localhost:{port}/tunnel")  # fmt: skip
    assert tunnelled.returncode == 0 and tunnelled.stdout == PAGE, tunnelled.stderr
    admitted = log.admits(app=BROWSER, dest=f"localhost:{port}")
    assert admitted and "listener=per_app" in admitted[-1]
    # bypass: SOCKS5 with remote name resolution; the origin sees it, the tunnel does not.
    bypassed = curl("--socks5-hostname", f"127.0.0.1:{world.agent.socks}",
                    f"http://127.0.0.1:{port}/bypass")  # fmt: skip
    assert bypassed.returncode == 0 and bypassed.stdout == PAGE, bypassed.stderr
    assert log.admits(dest=f"127.0.0.1:{port}") == []
    assert world.origin.requests[seen:] == ["/tunnel", "/bypass"]
    # block: the mail app, named as the proxy user; nothing is even attempted.
    sentinel, lines = Sentinel(), len(log.lines)
    try:
        blocked = requests.get(
            f"http://localhost:{sentinel.port}/block",
            proxies={"http": f"http://{MAIL}:app@127.0.0.1:{world.agent.http}"},
            timeout=20,
        )
    finally:
        sentinel.close()
    assert blocked.status_code == 403
    assert blocked.text.startswith(
        "certgate: blocked by device rule 1 (block): app com.example.mail"
    )
    assert sentinel.accepted == 0 and log.lines[lines:] == []
    assert (
        f"block app={MAIL} dest=localhost:{sentinel.port} rule=device rule 1" in world.agent.log()
    )


def test_httpx_and_requests_through_the_agent(world: World) -> None:
    proxy = f"http://127.0.0.1:{world.agent.browser}"
    url = f"http://localhost:{world.origin_port}/clients"
    assert httpx.get(url, proxy=proxy, timeout=20).content == PAGE
    assert requests.get(url, proxies={"http": proxy}, timeout=20).content == PAGE


def proxy_mode(world: World, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return curl("--proxy", f"https://localhost:{world.tunnel.proxy_port}",
                "--proxy-cacert", str(world.ca_file), *extra,
                f"http://localhost:{world.origin_port}/proxy-mode")  # fmt: skip


def test_curl_uses_the_exported_app_certificate_in_proxy_mode(world: World) -> None:
    files = world.state.app_files(BROWSER)
    # key.pem is an encrypted PKCS#8 PEM: curl opens it with the export password.
    pem = proxy_mode(world, "--proxy-cert", str(files.cert), "--proxy-key", str(files.key),
                     "--proxy-pass", P12_PASSWORD)  # fmt: skip
    tunnelled = proxy_mode(world, "--proxytunnel", "--proxy-cert", str(files.cert),
                           "--proxy-key", str(files.key), "--proxy-pass", P12_PASSWORD)  # fmt: skip
    p12 = proxy_mode(world, "--proxy-cert-type", "P12",
                     "--proxy-cert", f"{files.pkcs12}:{P12_PASSWORD}")  # fmt: skip
    for result in (pem, tunnelled, p12):
        assert result.returncode == 0 and result.stdout == PAGE, result.stderr
    assert world.tunnel_log.admits(app=BROWSER, dest=f"localhost:{world.origin_port}")


def test_an_app_certificate_claiming_another_app_is_refused(world: World) -> None:
    files = world.state.app_files(BROWSER)
    result = proxy_mode(world, "--proxytunnel", "--proxy-cert", str(files.cert),
                        "--proxy-key", str(files.key), "--proxy-pass", P12_PASSWORD,
                        "--proxy-header", f"Certgate-App: {MAIL}")  # fmt: skip
    assert result.returncode != 0 and b"403" in result.stderr
    assert world.tunnel_log.denials("app_mismatch")


def test_exec_attributes_a_command_to_an_app_through_the_running_agent(world: World) -> None:
    url = f"http://localhost:{world.origin_port}/exec"
    result = subprocess.run(
        [*CERTGATE, "device", "exec", "--app", BROWSER, "-s", str(world.state.path), "--",
         "curl", "-sS", "--max-time", "20", url],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout == PAGE, result.stderr
    assert "using the running agent: http://127.0.0.1:" in result.stderr.decode()


def _fetch_with(world: World, identity: CertifiedKey) -> bytes:
    """A request through the tunnel presenting ``identity``, bypassing the agent."""
    profile = load_profile(world.state)
    assert profile is not None
    endpoints = [("127.0.0.1", world.tunnel.per_app_port)]
    client = TunnelClient.for_identity(endpoints, profile.tunnel_trust, identity, "global")

    async def fetch() -> bytes:
        upstream = await client.open(BROWSER, "localhost", world.origin_port)
        upstream.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = upstream.initial + await upstream.reader.read()
        upstream.writer.close()
        return data

    return asyncio.run(fetch())


def _refusal(world: World, identity: CertifiedKey) -> TunnelRefused:
    """The tunnel's refusal of ``identity``. A connection made while the tunnel is still
    closing that certificate's live tunnels may be cut instead; it must never succeed."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            answer = _fetch_with(world, identity)
        except TunnelRefused as refused:
            return refused
        except TunnelError:
            time.sleep(0.05)  # closed by the policy change in flight: ask again
            continue
        raise AssertionError(f"the retired certificate still works: {answer[:80]!r}")
    raise AssertionError("no refusal from the tunnel")


def test_a_redelivered_profile_retires_the_old_certificate(world: World) -> None:
    old = world.state.device_identity()
    assert old is not None and _fetch_with(world, old).endswith(PAGE)
    output = device_cli("profile", "-s", str(world.state.path))
    assert f"replaces {old.thumbprint} (removed)" in output
    new = world.state.device_identity()
    assert new is not None and new.thumbprint != old.thumbprint
    world.tunnel.wait_for_table(lambda t: old.thumbprint not in t and new.thumbprint in t)
    refused = _refusal(world, old)
    assert (refused.status, refused.reason) == (403, "unknown_thumbprint")
    # The running agent notices the new identity on disk and carries on with it.
    wait_until(lambda: f"now using device certificate {new.thumbprint}" in world.agent.log(),
               "the agent switched certificates")  # fmt: skip
    answer = requests.get(
        f"http://localhost:{world.origin_port}/after-redelivery",
        proxies={"http": f"http://127.0.0.1:{world.agent.browser}"},
        timeout=20,
    )
    assert answer.content == PAGE


def test_the_agent_renews_a_due_certificate_itself(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    before = world.state.device_identity()
    assert before is not None
    config = AgentConfig(
        socks=None,
        http=ListenAddress("127.0.0.1", 0),
        renew_fraction=0.99999999,  # a fresh year-long certificate is already "due"
        check_interval_s=3600,  # one pass, at start
    )
    caplog.set_level(logging.INFO, logger="certgate.device")
    with AgentThread(world.state, config) as running:
        wait_until(lambda: "renewed the device certificate" in caplog.text, "renewal")
        after = world.state.device_identity()
        assert after is not None and after.thumbprint != before.thumbprint
        world.tunnel.wait_for_table(lambda t: after.thumbprint in t)
        answer = httpx.get(
            f"http://localhost:{world.origin_port}/renewed",
            proxy=f"http://{BROWSER}:app@127.0.0.1:{running.bound['http'].port}",
            timeout=20,
        )
    assert answer.content == PAGE
    assert f"now using device certificate {after.thumbprint}" in caplog.text


def test_unenrolled_device_agent_stops_with_guidance(world: World) -> None:
    """Last: it ends the device's life."""
    unenroll(world.console, world.state.enrollment().device_uid)
    assert world.agent.proc.wait(timeout=30) == 3
    log = world.agent.log()
    assert "device is unenrolled; enroll it again" in log
    assert f"certgate device enroll --force --state-dir {world.state.path}" in log
    result = runner.invoke(app, ["device", "profile", "-s", str(world.state.path)], env=ENV)
    assert result.exit_code == 3
