"""Sign-in transactions kept in the console's database, shared by every Access node.

Behind a load balancer that spreads requests (round-robin), ``/authorize``, the
certificate step and ``/token`` of one sign-in may each reach another node. Each node
therefore keeps no transaction itself: it asks the console (``/api/v1/access/...``, see
docs/CONVENTIONS.md "Access sign-in transactions"), over the same mutual TLS and admin key
it reads device status with; the key's role must be ``access`` (``access:signin``).

Only SHA-256 hashes of handles and codes leave this process (``oidc.secret_hash``): the
console can neither hand out nor log a usable secret. Single use, expiry and the state
machine's order are enforced by the console's conditional updates; client, redirect URI
and PKCE bindings are checked here, after the code is spent (``oidc.check_bindings``).
When the console cannot be reached, sign-ins fail closed with 503.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from certgate.access.oidc import (
    HANDLE_BYTES,
    AuthorizationRequest,
    DeviceGrant,
    OAuthError,
    TokenRequest,
    Transaction,
    TxState,
    check_bindings,
    secret_hash,
)

__all__ = ["ConsoleSignIns"]

log = logging.getLogger("certgate.access.signins")
BASE = "/api/v1/access"


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    detail = body.get("detail") if isinstance(body, dict) else None
    return str(detail)[:300] if detail else f"HTTP {response.status_code}"


def _request_of(data: Any) -> AuthorizationRequest:
    try:
        return AuthorizationRequest(
            client_id=str(data["client_id"]),
            redirect_uri=str(data["redirect_uri"]),
            scope=tuple(str(s) for s in data["scope"]),
            state=str(data["state"]),
            nonce=str(data["nonce"]),
            code_challenge=str(data["code_challenge"]),
        )
    except (KeyError, TypeError) as exc:
        raise _unavailable(f"console sign-in record lacks {exc}") from exc


def _grant_of(data: Any) -> DeviceGrant:
    try:
        return DeviceGrant(**{name: data[name] for name in DeviceGrant.__slots__})
    except (KeyError, TypeError) as exc:
        raise _unavailable(f"console grant lacks {exc}") from exc


def _unavailable(reason: str) -> OAuthError:
    return OAuthError("temporarily_unavailable", f"sign-in store unavailable: {reason}", 503)


@dataclass
class ConsoleSignIns:
    """:class:`certgate.access.oidc.SignInStore` on the console's database."""

    client: httpx.AsyncClient
    request_ttl_s: int
    code_ttl_s: int

    async def _call(
        self, method: str, path: str, refusal: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """One console call: its JSON on 2xx; a refusal (404, 409) becomes ``refusal``
        with the console's reason; anything else fails closed with 503."""
        try:
            response = await self.client.request(method, BASE + path, json=body)
        except httpx.HTTPError as exc:
            raise _unavailable(f"console unreachable: {type(exc).__name__}") from exc
        if response.status_code in (404, 409):
            raise OAuthError(refusal, _detail(response))
        if response.status_code == 503:
            raise OAuthError("temporarily_unavailable", _detail(response), 503)
        if not 200 <= response.status_code < 300:
            # 401/403/422 mean Access's credentials or role are wrong: an operator must act.
            log.error("console refused %s %s: %s", method, path.split("/")[1], _detail(response))
            raise _unavailable(f"console answered HTTP {response.status_code}")
        try:
            data = response.json()
        except ValueError as exc:
            raise _unavailable("console answer is not JSON") from exc
        if not isinstance(data, dict):
            raise _unavailable("console answer is not a JSON object")
        return data

    async def begin(self, request: AuthorizationRequest) -> str:
        handle = secrets.token_urlsafe(HANDLE_BYTES)
        body = {
            "handle_hash": secret_hash(handle),
            "request": {**asdict(request), "scope": list(request.scope)},
            "request_ttl_s": self.request_ttl_s,
            "code_ttl_s": self.code_ttl_s,
        }
        await self._call("POST", "/signins", "invalid_request", body)
        return handle

    async def pending(self, handle: str) -> AuthorizationRequest:
        data = await self._call("GET", f"/signins/{secret_hash(handle)}", "invalid_request")
        return _request_of(data.get("request"))

    async def issue_code(self, handle: str, grant: DeviceGrant) -> str:
        code = secrets.token_urlsafe(HANDLE_BYTES)
        body = {
            "code_hash": secret_hash(code),
            "grant": asdict(grant),
            "code_ttl_s": self.code_ttl_s,
        }
        await self._call("POST", f"/signins/{secret_hash(handle)}/code", "invalid_request", body)
        return code

    async def deny(self, handle: str) -> None:
        await self._call("POST", f"/signins/{secret_hash(handle)}/deny", "invalid_request")

    async def redeem(self, token: TokenRequest) -> Transaction:
        path = f"/codes/{secret_hash(token.code)}/redeem"
        data = await self._call("POST", path, "invalid_grant")
        tx = Transaction(
            _request_of(data.get("request")),
            time.monotonic(),
            TxState.REDEEMED,
            _grant_of(data.get("grant")),
        )
        check_bindings(token, tx.request)
        return tx
