"""The Access sign-in transactions API against a real console process over real mTLS, on
SQLite and PostgreSQL: a sign-in's round trip, and every refusal as a precise status with
the JSON error body and an audit entry (replayed or unknown code, wrong role, another
subtree's device, malformed hashes and bounds)."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from certgate.console.store.models import AccessSignIn, AuditEntry
from tests.support import RunningConsole

pytestmark = pytest.mark.integration

REQUEST = {
    "client_id": "com.example.mail",
    "redirect_uri": "com.example.mail:/cb",
    "scope": ["openid"],
    "state": "st",
    "nonce": "no",
    "code_challenge": "c" * 43,
}


@pytest.fixture(scope="module")
def env(console: RunningConsole) -> RunningConsole:
    with console.client(console.admins["root"]) as client:
        for gid in ("acme", "other"):
            response = client.post("/api/v1/groups", json={"id": gid, "parent_id": "global"})
            assert response.status_code == 201, response.text
    console.make_admin("access-acme", "access", "acme")
    console.make_admin("readonly-acme", "read-only", "acme")
    console.make_admin("access-other", "access", "other")
    return console


def new_hash() -> str:
    return hashlib.sha256(secrets.token_bytes(32)).hexdigest()


def grant(group_id: str = "acme") -> dict[str, Any]:
    return {
        "device_uid": secrets.token_hex(16),
        "group_id": group_id,
        "platform": "android",
        "owner": "alice",
        "compliance": "compliant",
        "cert_thumbprint": secrets.token_hex(32),
        "auth_time": 1_800_000_000,
    }


def call(env: RunningConsole, who: str, method: str, path: str, **kw: Any) -> httpx.Response:
    with env.client(env.admins[who]) as client:
        return client.request(method, f"/api/v1/access{path}", **kw)


def begin(env: RunningConsole, who: str = "access-acme") -> str:
    handle = new_hash()
    body = {"handle_hash": handle, "request": REQUEST, "request_ttl_s": 300, "code_ttl_s": 60}
    response = call(env, who, "POST", "/signins", json=body)
    assert response.status_code == 201, response.text
    return handle


def with_code(env: RunningConsole, group_id: str = "acme") -> tuple[str, dict[str, Any]]:
    handle, code, device = begin(env), new_hash(), grant(group_id)
    body = {"code_hash": code, "grant": device, "code_ttl_s": 60}
    response = call(env, "access-acme", "POST", f"/signins/{handle}/code", json=body)
    assert response.status_code == 200, response.text
    return code, device


def assert_refused(
    env: RunningConsole, response: httpx.Response, status: int, error: str, phrase: str
) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error and phrase in body["detail"], body
    with env.local() as (session, _):
        entry = session.scalars(
            select(AuditEntry).where(AuditEntry.outcome == "denied").order_by(AuditEntry.id.desc())
        ).first()
    assert entry is not None and entry.detail["status"] == status
    assert phrase in entry.detail["reason"]


def test_a_sign_in_round_trip_is_stored_by_hash_and_audited(env: RunningConsole) -> None:
    handle = begin(env)
    pending = call(env, "access-acme", "GET", f"/signins/{handle}")
    assert pending.json()["state"] == "awaiting-cert" and pending.json()["request"] == REQUEST
    code, device = with_code(env)
    redeemed = call(env, "access-acme", "POST", f"/codes/{code}/redeem").json()
    assert (redeemed["state"], redeemed["request"], redeemed["grant"]) == (
        "redeemed",
        REQUEST,
        device,
    )
    with env.local() as (session, _):
        row = session.scalars(select(AccessSignIn).where(AccessSignIn.code_hash == code)).one()
        actions = session.scalars(
            select(AuditEntry.action).where(AuditEntry.actor == "admin:access-acme")
        ).all()
    assert row.state == "redeemed" and row.group_id == "acme"
    assert {"access.signin.code", "access.signin.redeemed"} <= set(actions)


def test_a_replayed_code_is_409(env: RunningConsole) -> None:
    code, _ = with_code(env)
    assert call(env, "access-acme", "POST", f"/codes/{code}/redeem").status_code == 200
    replay = call(env, "access-acme", "POST", f"/codes/{code}/redeem")
    assert_refused(env, replay, 409, "conflict", "authorization code already used")


def test_an_unknown_code_is_404(env: RunningConsole) -> None:
    response = call(env, "access-acme", "POST", f"/codes/{new_hash()}/redeem")
    assert_refused(env, response, 404, "not_found", "unknown or expired authorization code")


def test_an_unknown_sign_in_is_404(env: RunningConsole) -> None:
    response = call(env, "access-acme", "GET", f"/signins/{new_hash()}")
    assert_refused(env, response, 404, "not_found", "unknown or expired sign-in")


def test_a_denied_sign_in_gets_no_code(env: RunningConsole) -> None:
    handle = begin(env)
    assert call(env, "access-acme", "POST", f"/signins/{handle}/deny").status_code == 200
    body = {"code_hash": new_hash(), "grant": grant(), "code_ttl_s": 60}
    response = call(env, "access-acme", "POST", f"/signins/{handle}/code", json=body)
    assert_refused(env, response, 409, "conflict", "this sign-in is already denied")


def test_a_role_without_access_signin_is_403(env: RunningConsole) -> None:
    body = {"handle_hash": new_hash(), "request": REQUEST, "request_ttl_s": 300, "code_ttl_s": 60}
    response = call(env, "readonly-acme", "POST", "/signins", json=body)
    assert_refused(env, response, 403, "forbidden", "role lacks access:signin on every group")


def test_a_code_for_another_subtrees_device_is_refused(env: RunningConsole) -> None:
    """Access bound at acme cannot bind a code to a device of group other (not even learn
    that the group exists)."""
    handle = begin(env)
    body = {"code_hash": new_hash(), "grant": grant("other"), "code_ttl_s": 60}
    response = call(env, "access-acme", "POST", f"/signins/{handle}/code", json=body)
    assert_refused(env, response, 404, "not_found", "group 'other' not found")


def test_another_subtrees_access_cannot_spend_a_code(env: RunningConsole) -> None:
    code, _ = with_code(env)
    response = call(env, "access-other", "POST", f"/codes/{code}/redeem")
    assert_refused(env, response, 404, "not_found", "group 'acme' not found")
    # The refused attempt did not spend it: its own Access still can.
    assert call(env, "access-acme", "POST", f"/codes/{code}/redeem").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "phrase"),
    [
        ("/signins/NOT-A-HASH", None, "handle_hash"),
        ("/codes/" + "A" * 64 + "/redeem", None, "code_hash"),
        (
            "/signins",
            {"handle_hash": "ab", "request": REQUEST, "request_ttl_s": 300, "code_ttl_s": 60},
            "body.handle_hash",
        ),
        (
            "/signins",
            {"handle_hash": "a" * 64, "request": REQUEST, "request_ttl_s": 300, "code_ttl_s": 601},
            "body.code_ttl_s",
        ),
        (
            "/signins",
            {"handle_hash": "a" * 64, "request": {**REQUEST, "extra": 1}, "request_ttl_s": 300,
             "code_ttl_s": 60},
            "body.request.extra",
        ),
    ],
)  # fmt: skip
def test_malformed_input_is_422(
    env: RunningConsole, path: str, body: dict[str, Any] | None, phrase: str
) -> None:
    method = "GET" if path.startswith("/signins/") else "POST"
    response = call(env, "access-acme", method, path, json=body)
    assert_refused(env, response, 422, "invalid_request", phrase)
