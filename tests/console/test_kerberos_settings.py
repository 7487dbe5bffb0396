"""The group setting ``kerberos`` (realm -> KDCs of the tunnel's KDC proxy), against a real
console process over real TLS: a valid change publishes a new policy carrying it, a
malformed one is refused with 400 and the JSON error body and publishes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from certgate.console.services.feed import policy_of
from certgate.console.store.models import Group
from tests.support import RunningConsole

pytestmark = pytest.mark.integration

GROUP = "krb"
SETTINGS = f"/api/v1/groups/{GROUP}/settings"


@pytest.fixture(scope="module")
def env(console: RunningConsole) -> RunningConsole:
    with console.client(console.admins["root"]) as client:
        client.post("/api/v1/groups", json={"id": GROUP, "parent_id": "global"}).raise_for_status()
    return console


def patch(env: RunningConsole, changes: dict[str, Any]) -> Any:
    with env.client(env.admins["root"]) as client:
        return client.patch(SETTINGS, json=changes)


def published(env: RunningConsole) -> tuple[int, dict[str, tuple[str, ...]]]:
    with env.local() as (session, _):
        group = session.get(Group, GROUP)
        assert group is not None
        return group.policy_version, dict(policy_of(group).kerberos)


def test_kdcs_of_a_realm_are_published_as_policy(env: RunningConsole) -> None:
    before, _ = published(env)
    answer = patch(env, {"kerberos": {"CORP.TEST": ["kdc.corp.test", "udp/10.1.2.3:750"]}})
    assert answer.status_code == 200, answer.text
    version, kerberos = published(env)
    assert version == before + 1
    assert kerberos == {"CORP.TEST": ("tcp/kdc.corp.test:88", "udp/10.1.2.3:750")}


@pytest.mark.parametrize(
    "kerberos",
    [
        {"CORP.TEST": ["ftp/kdc.corp.test"]},
        {"CORP.TEST": "kdc.corp.test"},
        {"bad realm": ["kdc.corp.test"]},
        {"CORP.TEST": ["kdc"] * 17},
        ["CORP.TEST"],
    ],
)
def test_a_malformed_kerberos_setting_is_refused(env: RunningConsole, kerberos: object) -> None:
    before = published(env)
    answer = patch(env, {"kerberos": kerberos})
    assert answer.status_code in (400, 422), answer.text
    assert set(answer.json()) == {"error", "detail"}
    assert published(env) == before
