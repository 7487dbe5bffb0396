"""Failed authentications on the console API are rate limited (``certgate.ratelimit``), on a
real console: an enrollment password is held per account (5 failures, then 429 with
Retry-After, even for the right password), a guessed API key per address (100 failures);
each refusal is audited as ``rate_limited``; other accounts and successes are untouched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from certgate.console.app import API_ADDRESS_BURST
from certgate.console.store.models import AuditEntry
from certgate.ratelimit import ACCOUNT_BURST
from tests.support import RunningConsole, init_console, start_console


@pytest.fixture
def console(tmp_path: Path) -> Iterator[RunningConsole]:
    """A console of its own: the tests use up 127.0.0.1's failure budget."""
    data_dir, port = init_console(tmp_path)
    running = start_console(tmp_path, data_dir, port)
    running.make_admin("root", "superadmin", "global")
    with running.client(running.admins["root"]) as admin:
        for user in ("bob", "carol"):
            admin.post(
                "/api/v1/groups/global/enrollment-users",
                json={"username": user, "password": f"{user}-password"},
            ).raise_for_status()
    try:
        yield running
    finally:
        running.stop()


def _enroll(client: httpx.Client, username: str, password: str) -> httpx.Response:
    body = {"username": username, "password": password, "platform": "linux"}
    return client.post("/api/v1/enroll", json=body)


def _rate_limited_audits(console: RunningConsole) -> list[AuditEntry]:
    with console.local() as (session, _):
        rows = session.execute(select(AuditEntry)).scalars().all()
        return [r for r in rows if r.detail.get("code") == "rate_limited"]


def _assert_429(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["error"] == "rate_limited"


def test_password_guessing_is_held_per_account(console: RunningConsole) -> None:
    with console.client() as client:
        for _ in range(ACCOUNT_BURST):
            assert _enroll(client, "bob", "guess").status_code == 401
        _assert_429(_enroll(client, "bob", "guess"))
        _assert_429(_enroll(client, "BOB", "bob-password"))  # the right one is not even tried
        assert _enroll(client, "carol", "carol-password").status_code == 201
    audits = _rate_limited_audits(console)
    assert "account 'bob'" in audits[0].detail["reason"]
    assert "account 'BOB'" in audits[1].detail["reason"]
    assert all(a.actor == "anonymous@127.0.0.1" and a.outcome == "denied" for a in audits)


def test_api_key_guessing_is_held_per_address(console: RunningConsole) -> None:
    with console.client(api_key="cg_guess") as guesser:
        # The bucket refills one a second while this runs: a few more than the burst pass.
        statuses = [guesser.get("/api/v1/groups").status_code for _ in range(2 * API_ADDRESS_BURST)]
        first_429 = statuses.index(429)
        assert first_429 >= API_ADDRESS_BURST and set(statuses[:first_429]) == {401}
        _assert_429(guesser.get("/api/v1/groups"))
    with console.client(console.admins["root"]) as admin:
        _assert_429(admin.get("/api/v1/groups"))  # the address, whatever the credential
    with console.client() as anonymous:
        assert anonymous.get("/healthz").status_code == 200  # health is never limited
    assert len(_rate_limited_audits(console)) == statuses.count(429) + 2
