"""Access's console-backed sign-in store (``certgate.access.signins``) against a real
console process (SQLite and PostgreSQL) over real mutual TLS: the round trip, what reaches
the console (hashes only), a code spent by a failed redemption, and fail-closed answers
when the console refuses the credential or cannot be reached."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import pytest
from sqlalchemy import select

from certgate.access.oidc import (
    AuthorizationRequest,
    DeviceGrant,
    OAuthError,
    TokenRequest,
    TxState,
    s256,
    secret_hash,
)
from certgate.access.signins import ConsoleSignIns
from certgate.console.store.models import AccessSignIn
from tests.support import AdminCreds, RunningConsole, free_port

pytestmark = pytest.mark.integration
T = TypeVar("T")
VERIFIER = "v" * 43
REQUEST = AuthorizationRequest(
    "com.example.mail", "com.example.mail:/cb", ("openid",), "st", "no", s256(VERIFIER)
)


@pytest.fixture(scope="module")
def env(console: RunningConsole) -> RunningConsole:
    with console.client(console.admins["root"]) as client:
        response = client.post("/api/v1/groups", json={"id": "android", "parent_id": "global"})
        assert response.status_code == 201, response.text
    console.make_admin("access-svc", "access", "global")
    console.make_admin("reader", "read-only", "global")
    return console


def run(console: RunningConsole, creds: AdminCreds, act: Callable[[ConsoleSignIns], Awaitable[T]],
        url: str | None = None) -> T:  # fmt: skip
    async def main() -> T:
        ctx = console.ssl_context(creds.cert_path, creds.key_path)
        headers = {"authorization": f"Bearer {creds.api_key}"}
        async with httpx.AsyncClient(
            base_url=url or console.url, verify=ctx, headers=headers, timeout=30
        ) as client:
            return await act(ConsoleSignIns(client, 300, 60))

    return asyncio.run(main())


def grant() -> DeviceGrant:
    return DeviceGrant(
        secrets.token_hex(16), "android", "android", "alice", "compliant", "ab" * 32, 1
    )


def token(code: str, verifier: str = VERIFIER) -> TokenRequest:
    return TokenRequest(code, REQUEST.redirect_uri, REQUEST.client_id, verifier)


def test_a_sign_in_round_trip_reaches_the_console_as_hashes(env: RunningConsole) -> None:
    device = grant()

    async def flow(store: ConsoleSignIns) -> tuple[str, str, TxState, DeviceGrant | None]:
        handle = await store.begin(REQUEST)
        assert await store.pending(handle) == REQUEST
        code = await store.issue_code(handle, device)
        tx = await store.redeem(token(code))
        return handle, code, tx.state, tx.grant

    handle, code, state, got = run(env, env.admins["access-svc"], flow)
    assert (state, got) == (TxState.REDEEMED, device)
    with env.local() as (session, _):
        row = session.get(AccessSignIn, secret_hash(handle))
        assert row is not None and row.code_hash == secret_hash(code)
        assert not session.scalars(
            select(AccessSignIn).where(AccessSignIn.handle_hash == handle)
        ).all()


def test_a_failed_redemption_spends_the_code(env: RunningConsole) -> None:
    async def flow(store: ConsoleSignIns) -> list[str]:
        handle = await store.begin(REQUEST)
        code = await store.issue_code(handle, grant())
        errors = []
        for verifier in ("w" * 43, VERIFIER):
            try:
                await store.redeem(token(code, verifier))
            except OAuthError as exc:
                errors.append(f"{exc.error}: {exc.description}")
        return errors

    assert run(env, env.admins["access-svc"], flow) == [
        "invalid_grant: code_verifier does not match the code_challenge",
        "invalid_grant: authorization code already used",
    ]


def test_a_certificate_step_after_a_denial_is_refused(env: RunningConsole) -> None:
    async def flow(store: ConsoleSignIns) -> OAuthError:
        handle = await store.begin(REQUEST)
        await store.deny(handle)
        with pytest.raises(OAuthError) as caught:
            await store.issue_code(handle, grant())
        return caught.value

    refused = run(env, env.admins["access-svc"], flow)
    assert (refused.error, refused.description) == (
        "invalid_request",
        "this sign-in is already denied",
    )


def test_a_credential_without_access_signin_fails_closed(
    env: RunningConsole, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, "certgate.access.signins"):
        with pytest.raises(OAuthError) as caught:
            run(env, env.admins["reader"], lambda store: store.begin(REQUEST))
    assert (caught.value.error, caught.value.status) == ("temporarily_unavailable", 503)
    assert "console answered HTTP 403" in caught.value.description
    assert any("role lacks access:signin" in r.getMessage() for r in caplog.records)


def test_an_unreachable_console_fails_closed(env: RunningConsole) -> None:
    closed = f"https://127.0.0.1:{free_port()}"
    with pytest.raises(OAuthError) as caught:
        run(env, env.admins["access-svc"], lambda store: store.begin(REQUEST), closed)
    assert (caught.value.error, caught.value.status) == ("temporarily_unavailable", 503)
    assert "console unreachable: ConnectError" in caught.value.description
