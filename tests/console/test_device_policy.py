"""``GET /api/v1/device/policy``: the long-poll of the group policy that device agents
follow, against a real console process over real TLS, on each storage backend."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from certgate.console.store.models import Group
from tests.support import RunningConsole, make_csr

pytestmark = pytest.mark.integration

GROUP = "pol"
POLICY = "/api/v1/device/policy"
USER, PASSWORD = "pat", "pat-password"
BLOCK_MAIL = {
    "default": "tunnel",
    "rules": [{"apps": ["com.example.mail"], "domains": ["*"], "action": "block"}],
}


def admin(env: RunningConsole, method: str, path: str, body: Any = None) -> Any:
    with env.client(env.admins["root"]) as client:
        response = client.request(method, path, json=body)
    assert response.is_success, response.text
    return response.json() if response.content else None


@pytest.fixture(scope="module")
def env(console: RunningConsole) -> RunningConsole:
    admin(console, "POST", "/api/v1/groups", {"id": GROUP, "parent_id": "global"})
    users = f"/api/v1/groups/{GROUP}/enrollment-users"
    admin(console, "POST", users, {"username": USER, "password": PASSWORD})
    return console


def enrolled(env: RunningConsole) -> dict[str, Any]:
    body = {"username": USER, "password": PASSWORD, "platform": "linux"}
    with env.client() as client:
        response = client.post("/api/v1/enroll", json=body)
    assert response.status_code == 201, response.text
    device: dict[str, Any] = response.json()
    return device


@pytest.fixture(scope="module")
def device(env: RunningConsole) -> dict[str, Any]:
    return enrolled(env)


def device_client(env: RunningConsole, device: dict[str, Any]) -> httpx.Client:
    return env.client(api_key=device["credential"])


def policy_version(env: RunningConsole) -> int:
    with env.local() as (session, _):
        group = session.get(Group, GROUP)
        assert group is not None
        return group.policy_version


def poll(env: RunningConsole, device: dict[str, Any], after: int, wait: float) -> httpx.Response:
    with device_client(env, device) as client:
        return client.get(POLICY, params={"after": after, "wait": wait})


def test_a_newer_policy_is_answered_at_once(env: RunningConsole, device: dict[str, Any]) -> None:
    version = policy_version(env)
    started = time.monotonic()
    response = poll(env, device, version - 1, 30)
    assert time.monotonic() - started < 5
    assert response.status_code == 200, response.text
    assert response.json() == {
        "version": version,
        "group_id": GROUP,
        "rules": {"default": "block", "rules": []},
        "tunnel": {"hosts": ["localhost", "127.0.0.1"], "per_app_port": 8443, "proxy_port": 2020},
    }


def test_the_profile_names_the_policy_version_of_its_rules(
    env: RunningConsole, device: dict[str, Any]
) -> None:
    with device_client(env, device) as client:
        response = client.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})
    assert response.status_code == 201, response.text
    delivered = response.json()
    current = poll(env, device, 0, 0).json()
    assert delivered["policy_version"] == current["version"] == policy_version(env)
    assert (delivered["rules"], delivered["tunnel"]) == (current["rules"], current["tunnel"])


def test_no_change_answers_204_after_the_wait(env: RunningConsole, device: dict[str, Any]) -> None:
    started = time.monotonic()
    response = poll(env, device, policy_version(env), 1.5)
    assert response.status_code == 204 and response.content == b""
    assert 1.4 <= time.monotonic() - started < 10


def test_a_rule_change_answers_a_waiting_poll_promptly(
    env: RunningConsole, device: dict[str, Any]
) -> None:
    before = policy_version(env)
    result: dict[str, Any] = {}

    def waiting() -> None:
        result["response"] = poll(env, device, before, 30)
        result["at"] = time.monotonic()

    waiter = threading.Thread(target=waiting)
    waiter.start()
    time.sleep(0.5)  # the poll is waiting (it would answer 204 after 30 s)
    admin(env, "PATCH", f"/api/v1/groups/{GROUP}/settings", {"device_rules": BLOCK_MAIL})
    changed = time.monotonic()
    waiter.join(timeout=40)
    response = result["response"]
    assert response.status_code == 200, response.text
    assert result["at"] - changed < 3  # woken by the commit, not by the end of the wait
    assert response.json()["version"] == before + 1
    assert response.json()["rules"] == BLOCK_MAIL


def test_a_change_of_other_settings_does_not_answer(
    env: RunningConsole, device: dict[str, Any]
) -> None:
    version = policy_version(env)
    admin(env, "PATCH", f"/api/v1/groups/{GROUP}/settings", {"initial_compliance": "compliant"})
    assert policy_version(env) == version
    assert poll(env, device, version, 0).status_code == 204


@pytest.mark.parametrize(
    ("credential", "phrase"),
    [
        ("cgd_0123456789abcdef_unknownsecret", "unknown device credential"),
        (None, "missing device credential"),
    ],
)
def test_an_unknown_credential_is_401(
    env: RunningConsole, credential: str | None, phrase: str
) -> None:
    with env.client(api_key=credential) as client:
        response = client.get(POLICY, params={"after": 0, "wait": 0})
    assert response.status_code == 401 and phrase in response.json()["detail"]


@pytest.mark.parametrize(
    ("action", "phrase"),
    [("block", "device is blocked"), ("unenroll", "device is unenrolled; enroll it again")],
)
def test_a_blocked_or_unenrolled_device_is_403(
    env: RunningConsole, action: str, phrase: str
) -> None:
    refused = enrolled(env)
    admin(env, "POST", f"/api/v1/devices/{refused['device_uid']}/{action}")
    response = poll(env, refused, 0, 5)
    assert response.status_code == 403 and phrase in response.json()["detail"]


@pytest.mark.parametrize("params", [{"after": -1}, {"wait": 61}, {"after": "x"}])
def test_bad_parameters_are_422(
    env: RunningConsole, device: dict[str, Any], params: dict[str, Any]
) -> None:
    with device_client(env, device) as client:
        assert client.get(POLICY, params=params).status_code == 422


def test_the_route_declares_its_answers(env: RunningConsole) -> None:
    with env.client() as client:
        spec = client.get("/openapi.json").json()
    answers = spec["paths"][POLICY]["get"]["responses"]
    assert {"200", "204", "401", "403", "422"} <= set(answers)
    assert answers["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/DevicePolicyOut"
    }
