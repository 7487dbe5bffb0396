"""Following the group policy: validation and storage of a new policy (the certificate
untouched), the retry delays, and a running agent that applies a device-rule change made
through the console API to its live listeners without a new certificate."""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from certgate.device.agent import AgentThread, in_daemon_thread, retry_delay
from certgate.device.enroll import ConsoleAPI, enroll
from certgate.device.profile import apply_policy, fetch_profile, load_profile
from certgate.device.rules import Action
from certgate.device.state import StateDir
from certgate.errors import ConfigError
from tests.device.console_side import (
    GROUP,
    ConsoleTunnel,
    add_enrollment_user,
    admin_call,
    configure_group,
    enrollment_token,
    root_pem,
)
from tests.device.harness import (
    BROWSER,
    MAIL,
    PAGE,
    RULES,
    agent_config,
    counting_origin,
    http_get_via_socks,
    provision,
)
from tests.support import RunningConsole
from tests.tunnel.dataplane import PKI, Client

pytestmark = pytest.mark.integration
NOT_ALLOWED_BY_RULESET = 2  # SOCKS5 REP (RFC 1928 §6)
# The browser (and unattributed SOCKS traffic) tunneled to localhost under RULES: blocked now.
BLOCK_BROWSER: dict[str, Any] = {
    "default": "block",
    "rules": [
        {"apps": [BROWSER, "certgate.unattributed"], "domains": ["localhost"], "action": "block"},
        {"apps": ["*"], "domains": ["127.0.0.1"], "action": "bypass"},
    ],
}


# -- retry delays ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "jitter", "delay"),
    [(1, 0.0, 0.5), (1, 1.0, 1.0), (2, 1.0, 2.0), (4, 0.5, 6.0), (8, 1.0, 120.0), (10**6, 0, 60)],
)
def test_retry_delays_double_up_to_a_ceiling_with_jitter(
    failures: int, jitter: float, delay: float
) -> None:
    assert retry_delay(failures, lambda: jitter) == pytest.approx(delay)


def test_retry_delays_are_spread() -> None:
    delays = {retry_delay(3) for _ in range(50)}
    assert len(delays) > 40 and all(2.0 <= d <= 4.0 for d in delays)


# -- blocking calls on a daemon thread ------------------------------------------------------


def test_a_daemon_thread_call_returns_or_raises() -> None:
    def fail() -> None:
        raise ConfigError("boom")

    assert asyncio.run(in_daemon_thread(lambda: 42)) == 42
    with pytest.raises(ConfigError, match="boom"):
        asyncio.run(in_daemon_thread(fail))


def test_a_cancelled_daemon_thread_call_is_abandoned_at_once() -> None:
    release = threading.Event()

    async def cancelled() -> float:
        task = asyncio.get_running_loop().create_task(in_daemon_thread(release.wait))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return time.monotonic() - started

    assert asyncio.run(cancelled()) < 1  # and asyncio.run does not wait for the thread
    release.set()  # its outcome goes to a closed loop: dropped without an error


# -- storing a policy ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def device(pki: PKI) -> Client:
    return pki.client_cert("device")


@pytest.fixture
def state(tmp_path: Path, pki: PKI, device: Client) -> StateDir:
    return provision(tmp_path / "state", pki, device, 1)


def policy_answer(**changes: Any) -> dict[str, Any]:
    answer = {
        "version": 2,
        "group_id": "g1",  # the harness's group
        "rules": BLOCK_BROWSER,
        "tunnel": {"hosts": ["127.0.0.1"], "per_app_port": 1, "proxy_port": 1},
    }
    return {**answer, **changes}


def test_a_policy_replaces_rules_and_version_but_not_the_identity(state: StateDir) -> None:
    identity_file = (state.path / "device.sealed").read_bytes()
    before = load_profile(state)
    assert before is not None and before.policy_version == 0  # a profile without one
    applied = apply_policy(state, policy_answer())
    assert applied == load_profile(state)
    assert applied.policy_version == 2 and applied.version == before.version
    assert applied.rules.evaluate(BROWSER, "localhost").action is Action.BLOCK
    assert applied.thumbprint == before.thumbprint
    assert (state.path / "device.sealed").read_bytes() == identity_file


@pytest.mark.parametrize(
    ("answer", "phrase"),
    [
        (policy_answer(group_id="other"), "not 'g1'"),
        (policy_answer(rules={"default": "teleport", "rules": []}), "invalid policy"),
        (policy_answer(rules={"default": "block"} | {"extra": 1}), "invalid policy"),
        (policy_answer(tunnel={"hosts": []}), "invalid policy"),
        (policy_answer(version=True), "invalid policy"),
        ({"version": 3}, "invalid policy"),
        ([], "invalid policy"),
    ],
)
def test_an_invalid_policy_is_refused_and_nothing_stored(
    state: StateDir, answer: Any, phrase: str
) -> None:
    stored = (state.path / "profile.json").read_bytes()
    with pytest.raises(ConfigError, match=phrase):
        apply_policy(state, copy.deepcopy(answer))
    assert (state.path / "profile.json").read_bytes() == stored


def test_a_policy_not_newer_than_ours_is_refused(state: StateDir) -> None:
    apply_policy(state, policy_answer(version=5))
    with pytest.raises(ConfigError, match="policy v5; this device has v5 already"):
        apply_policy(state, policy_answer(version=5, rules=RULES))
    profile = load_profile(state)
    assert profile is not None
    assert profile.rules.evaluate(BROWSER, "localhost").action is Action.BLOCK


def test_an_agent_that_cannot_reach_the_console_keeps_its_rules(
    state: StateDir, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="certgate.device")
    with AgentThread(state, agent_config(policy_wait_s=1)) as running:  # console: port 9
        wait_until(lambda: caplog.text.count("policy update failed, will retry") >= 2, "retries")
        proxy = f"http://{MAIL}:app@127.0.0.1:{running.bound['http'].port}"
        refused = httpx.get("http://localhost:1/", proxy=proxy, timeout=10)
    assert refused.status_code == 403 and "blocked by device rule 1" in refused.text


# -- a running agent and a real console -------------------------------------------------------


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


@dataclass
class World:
    console: RunningConsole
    tunnel: ConsoleTunnel
    origin: Any
    state: StateDir


@pytest.fixture(scope="module")
def world(console: RunningConsole, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("policy")
    tunnel = ConsoleTunnel(console, work)
    configure_group(console, RULES, tunnel.per_app_port, tunnel.proxy_port)
    add_enrollment_user(console)
    with tunnel, counting_origin() as origin:
        state = StateDir(work / "device")
        enroll(state, console.url, root_pem(console), token=enrollment_token(console))
        with ConsoleAPI.for_state(state) as api:
            delivered = fetch_profile(state, api)
        tunnel.wait_for_table(lambda table: delivered.identity.thumbprint in table)
        yield World(console, tunnel, origin, state)


def device_record(world: World) -> tuple[int, list[str]]:
    """The console's profile version of the device and its unrevoked certificates."""
    uid = world.state.enrollment().device_uid
    device = admin_call(world.console, "GET", f"/api/v1/devices/{uid}")
    certs = admin_call(world.console, "GET", f"/api/v1/groups/{GROUP}/certificates")
    live = [c["thumbprint"] for c in certs if c["device_uid"] == uid and not c["revoked_at"]]
    return device["profile_version"], live


def through_agent(running: AgentThread, world: World, path: str) -> tuple[httpx.Response, int]:
    """The same destination through the browser's own port and through SOCKS5."""
    port = world.origin.server_address[1]
    browser = f"http://127.0.0.1:{running.bound[f'app:{BROWSER}'].port}"
    answer = httpx.get(f"http://localhost:{port}{path}", proxy=browser, timeout=20)
    socks, _ = http_get_via_socks(running.bound["socks"].port, "localhost", port)
    return answer, socks


@pytest.mark.parametrize("console", ["sqlite"], indirect=True)
def test_a_running_agent_applies_a_rule_change_without_a_new_certificate(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="certgate.device")
    identity, record = world.state.device_identity(), device_record(world)
    profile = load_profile(world.state)
    assert identity is not None and profile is not None and profile.policy_version > 0
    with AgentThread(world.state, agent_config(policy_wait_s=20)) as running:
        answer, socks = through_agent(running, world, "/before")
        assert (answer.content, socks) == (PAGE, 0)
        settings = {"device_rules": BLOCK_BROWSER}
        admin_call(world.console, "PATCH", f"/api/v1/groups/{GROUP}/settings", settings)
        applied = f"applied policy v{profile.policy_version + 1}: 2 device rules, default block"
        wait_until(lambda: applied in caplog.text, "the agent applied the new policy", 10)
        answer, socks = through_agent(running, world, "/after")
        assert running.agent is not None and running.agent.router is not None
        assert running.agent.router.tunnel.device_thumbprint == identity.thumbprint
        leaving = time.monotonic()
    assert time.monotonic() - leaving < 5  # stopping does not wait for the pending long-poll
    assert answer.status_code == 403 and "blocked by device rule 0" in answer.text
    assert socks == NOT_ALLOWED_BY_RULESET
    assert "/after" not in world.origin.requests
    stored, after = load_profile(world.state), world.state.device_identity()
    assert stored is not None and after is not None
    assert (stored.policy_version, stored.version) == (profile.policy_version + 1, profile.version)
    assert after.thumbprint == identity.thumbprint and device_record(world) == record
