"""SCEP challenge passwords made through a real console's API (each backend): per profile
and per device, for the Per-App Tunnel device certificate or an app's Proxy-mode one.
What the store keeps (the app, the owner, a hash only), the audit entry, and the precise
refusals. What a challenge then issues is shown with Debian's scepclient and a real
tunnel node in tests/integration/test_scep.py."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from certgate.console.services import ca, devices
from certgate.console.services.secrets import sha256_hex, split_secret
from certgate.console.store.models import AuditEntry, OneTimeToken
from tests.console.conftest import add_device
from tests.console.test_remote import remote_run, run
from tests.support import RunningConsole

pytestmark = pytest.mark.integration
MAIL = "com.example.mail"


@pytest.fixture(scope="module")
def owner(console: RunningConsole) -> str:
    with console.local() as (session, _):
        devices.create_enrollment_user(session, "global", "erin", "erin password 1")
    return "erin"


def post(console: RunningConsole, path: str, body: dict[str, Any]) -> Any:
    with console.client(console.admins["root"]) as admin:
        return admin.post(path, json=body)


def stored(console: RunningConsole, challenge: str) -> tuple[OneTimeToken, AuditEntry]:
    token_id, _ = split_secret(challenge, challenge[:3])
    with console.local() as (session, _):
        row = session.get(OneTimeToken, token_id)
        entry = session.execute(
            select(AuditEntry).order_by(AuditEntry.id.desc()).limit(1)
        ).scalar_one()
        assert row is not None
        session.expunge_all()
        return row, entry


@pytest.mark.parametrize("bundle_id", [MAIL, None])
def test_a_profile_challenge_names_its_owner_and_app(
    console: RunningConsole, owner: str, bundle_id: str | None
) -> None:
    body = {"owner": owner, "expires_in_s": 600, "bundle_id": bundle_id}
    answer = post(console, "/api/v1/groups/global/scep/challenge", body)
    assert answer.status_code == 201, answer.text
    shown = answer.json()
    assert shown["mode"] == ("proxy" if bundle_id else "per_app")
    assert (shown["bundle_id"], shown["expires_in_s"]) == (bundle_id, 600)
    assert shown["challenge"].startswith("cgp_")
    row, entry = stored(console, shown["challenge"])
    assert (row.purpose, row.owner, row.bundle_id, row.used_at) == (
        "scep-profile",
        owner,
        bundle_id,
        None,
    )
    assert row.secret_hash == sha256_hex(split_secret(shown["challenge"], "cgp")[1])
    assert (entry.action, entry.detail["app"], entry.detail["owner"]) == (
        "scep.challenge.create",
        bundle_id,
        owner,
    )


def test_a_device_challenge_names_its_device_and_app(console: RunningConsole) -> None:
    with console.local() as (session, _):
        uid = add_device(session, "global")
    answer = post(console, f"/api/v1/devices/{uid}/scep/challenge", {"bundle_id": MAIL})
    assert answer.status_code == 201, answer.text
    assert answer.json()["challenge"].startswith("cgs_") and answer.json()["mode"] == "proxy"
    row, entry = stored(console, answer.json()["challenge"])
    assert (row.purpose, row.owner, row.bundle_id) == ("scep", uid, MAIL)
    assert (entry.detail["device"], entry.detail["app"]) == (uid, MAIL)


@pytest.mark.parametrize(
    ("path", "body", "status", "error", "detail"),
    [
        ("/api/v1/groups/global/scep/challenge", {"owner": "nobody"}, 404, "not_found",
         "'nobody' is not an enrollment user of group 'global'"),
        ("/api/v1/groups/nope/scep/challenge", {"owner": "erin"}, 404, "not_found",
         "group 'nope' not found"),
        ("/api/v1/groups/global/scep/challenge", {"owner": "erin", "bundle_id": "mail app"},
         422, "invalid_request", "bundle_id"),
        ("/api/v1/groups/global/scep/challenge", {"owner": "erin x"}, 422, "invalid_request",
         "owner"),
        ("/api/v1/groups/global/scep/challenge", {"owner": "erin", "mode": "proxy"},
         422, "invalid_request", "mode"),
        (f"/api/v1/devices/{'0' * 32}/scep/challenge", {"bundle_id": MAIL}, 404, "not_found",
         f"device {'0' * 32!r} not found"),
    ],
)  # fmt: skip
def test_bad_challenge_requests_are_refused_precisely(
    console: RunningConsole,
    owner: str,
    path: str,
    body: dict[str, Any],
    status: int,
    error: str,
    detail: str,
) -> None:
    answer = post(console, path, body)
    assert (answer.status_code, answer.json()["error"]) == (status, error)
    assert detail in answer.json()["detail"]


CHALLENGE_LINE = re.compile(
    r"^SCEP challenge \((?P<mode>Per-App Tunnel|Proxy mode for [a-z.]+), one use, 2 h\)"
    r" \(shown once\): (?P<challenge>cg[ps]_[0-9a-f]{16}_[A-Za-z0-9_-]{43})$",
    re.MULTILINE,
)


@pytest.mark.parametrize(
    "command",
    [
        ("scep-challenge", "{uid}", "--app", MAIL),
        ("scep-challenge", "{uid}"),
        ("scep-profile-challenge", "global", "erin", "--app", MAIL),
    ],
    ids=" ".join,
)
def test_the_cli_makes_challenges_locally_and_remotely(
    console: RunningConsole, owner: str, command: tuple[str, ...]
) -> None:
    with console.local() as (session, _):
        uid = add_device(session, "global")
    name, *args = (a.format(uid=uid) for a in command)
    args += ["--ttl-hours", "2"]
    local_result = run("device", name, "-d", str(console.data_dir), *args)
    remote_result = remote_run(console, console.admins["root"], "device", name, *args)
    app = MAIL if "--app" in command else None
    for result in (local_result, remote_result):
        assert result.exit_code == 0, result.output
        printed = CHALLENGE_LINE.search(result.stdout)
        assert printed is not None, result.stdout
        assert printed["mode"] == (f"Proxy mode for {MAIL}" if app else "Per-App Tunnel")
        row, _ = stored(console, printed["challenge"])
        assert (row.owner, row.bundle_id) == (owner if "profile" in name else uid, app)
        left = row.expires_at - ca.now()
        assert timedelta(hours=1, minutes=59) < left <= timedelta(hours=2)
        assert audited_apps(console, row.id) == [app]


def audited_apps(console: RunningConsole, token_id: str) -> list[str | None]:
    """The app of each ``scep.challenge.create`` entry of this challenge (newest 20)."""
    with console.local() as (session, _):
        entries = session.execute(
            select(AuditEntry)
            .where(AuditEntry.action == "scep.challenge.create")
            .order_by(AuditEntry.id.desc())
            .limit(20)
        ).scalars()
        return [e.detail["app"] for e in entries if e.detail["token_id"] == token_id]
