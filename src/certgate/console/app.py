"""The console's FastAPI application: error mapping, body limits, failure auditing.

Status mapping lives here and only here (the error tree is in ``certgate.errors``). Every
request that fails authentication, authorization or validation is answered with a precise
4xx and leaves an audit entry with its reason. What no handler maps goes to
``certgate.httperrors``: a storage failure is a 503 with Retry-After, anything else a JSON
500 with an error id in the log.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from time import monotonic
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.routing import Match

from certgate import errors
from certgate.console import ui
from certgate.console.api import (
    access_signin,
    access_trust,
    admin,
    admin_accounts,
    compliance,
    est,
    public,
    renewal,
    scep,
)
from certgate.console.api import device as device_api
from certgate.console.api import rotation as rotation_api
from certgate.console.api import tunnel as tunnel_api
from certgate.console.metrics import ConsoleCollector
from certgate.console.services import audit
from certgate.console.state import ConsoleState
from certgate.httperrors import RETRY_AFTER_S, ErrorPages, ErrorShield, send_error
from certgate.metrics import HttpMetrics, MetricsMiddleware, metrics_endpoint, route_templates
from certgate.ratelimit import SignInLimiter, TokenBuckets

log = logging.getLogger("certgate.console")
HTTP_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
ROUTERS = (
    device_api,
    tunnel_api,
    public,
    admin,
    admin_accounts,
    rotation_api,
    renewal,
    compliance,
    est,
    scep,
    access_signin,
    access_trust,
)

STATUS: tuple[tuple[type[errors.CertgateError], int, str], ...] = (
    (errors.AuthError, 401, "unauthenticated"),
    (ui.CSRFFailed, 403, "csrf_failed"),
    (errors.PermissionDenied, 403, "forbidden"),
    (errors.NotFound, 404, "not_found"),
    (errors.Conflict, 409, "conflict"),
    (errors.TooLarge, 413, "too_large"),
    (errors.RateLimited, 429, "rate_limited"),
    (errors.Unavailable, 503, "unavailable"),
    (errors.InvalidCSR, 422, "invalid_csr"),
    (errors.ChainError, 401, "certificate_rejected"),
    (errors.SignatureError, 400, "bad_signature"),
    (errors.BadRequest, 400, "bad_request"),
    (errors.PKIError, 422, "pki_rejected"),
    (errors.CertgateError, 400, "error"),
)


def status_of(exc: errors.CertgateError) -> tuple[int, str]:
    for family, status, code in STATUS:
        if isinstance(exc, family):
            return status, code
    raise AssertionError("CertgateError is the last row")  # pragma: no cover


async def _audit_failure(request: Request, code: str, status: int, reason: str) -> None:
    """Record the failure in its own transaction (the request's was rolled back), on a worker
    thread: the event loop must not wait for the database's write lock."""
    await run_in_threadpool(_write_failure, request, code, status, reason)
    log.warning("denied %s %s: %s %s (%s)", request.method, request.url.path, status, code, reason)


def _write_failure(request: Request, code: str, status: int, reason: str) -> None:
    state: ConsoleState = request.app.state.console
    actor = getattr(request.state, "actor", None) or f"anonymous@{_client(request)}"
    try:
        with state.db.transaction() as session:
            audit.append(
                session,
                actor,
                f"{request.method} {_route(request)}",
                "denied",
                getattr(request.state, "group_id", None),
                status=status,
                code=code,
                reason=reason[:500],
            )
    except Exception:  # the answer must still go out; the log line carries the reason
        log.exception("could not write audit entry for a failed request")


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _route(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", request.url.path)


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def _answer(request: Request, status: int, code: str, detail: str) -> Response:
    """The JSON error body, or for a browser on a web console page the same error as a
    page (``httperrors.ErrorPages.wanted``, shared with the error shield and body limit)."""
    if ui.PAGES.wanted_by(request.scope):
        return ui.error_page(request, status, code, detail)
    return _error(status, code, detail)


async def _certgate_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.CertgateError)
    status, code = status_of(exc)
    if status == 401:
        request.app.state.metrics.signin_failures.labels("api").inc()
        if not ui.is_ui(request.url.path):  # the web sign-in form has its own limiter
            _api_limiter(request).failed(_account(request), _client(request), monotonic())
    await _audit_failure(request, code, status, str(exc))
    response = _answer(request, status, code, str(exc))
    if status == 503:
        response.headers["retry-after"] = str(RETRY_AFTER_S)
    if isinstance(exc, errors.RateLimited):
        response.headers["retry-after"] = str(exc.retry_after_s)
    return response


API_ADDRESS_BURST, API_ADDRESS_REFILL_S = 100, 1.0  # 100 failures, then one a second
# Routes whose JSON body names the account being authenticated, and the field that does.
ACCOUNT_FIELDS = {"/api/v1/enroll": "username"}


async def failure_gate(request: Request) -> None:
    """Refuse (429) before any credential is checked when this address, or the account the
    body names, has used up its failures (``certgate.ratelimit``). Only failures count."""
    account = None
    field = ACCOUNT_FIELDS.get(_route(request))
    if field is not None:
        try:
            body = await request.json()
        except ValueError:  # not JSON: validation answers it, with no account to name
            body = None
        value = body.get(field) if isinstance(body, dict) else None
        account = value[:128] if isinstance(value, str) and value else None
    request.state.rate_account = account
    wait_s = _api_limiter(request).retry_after(account, _client(request), monotonic())
    if wait_s:
        who = f"account {account!r} or address" if account else "address"
        raise errors.RateLimited(
            f"too many failed authentications for this {who}; retry in {wait_s} s", wait_s
        )


def api_limiter(burst: int = API_ADDRESS_BURST) -> SignInLimiter:
    """The web form's per-account buckets; a wider per-address one, since many devices may
    share an address (a NAT) and one agent with a dead credential must not lock them out.
    Guessing a key or token gains nothing at this rate; a password is held by its account."""
    return SignInLimiter(addresses=TokenBuckets(burst, API_ADDRESS_REFILL_S))


def _api_limiter(request: Request) -> SignInLimiter:
    limiter: SignInLimiter = request.app.state.api_limiter
    return limiter


def _account(request: Request) -> str | None:
    account: str | None = getattr(request.state, "rate_account", None)
    return account


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
    )
    await _audit_failure(request, "invalid_request", 422, detail)
    return _answer(request, 422, "invalid_request", detail)


async def _routing_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no route: 404, no such method on the path: 405) in the
    project's error body. A 405's ``Allow`` names every method of every route on the path
    (RFC 9110 §15.5.6), not only those of the first route Starlette tried."""
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    code = HTTPStatus(status).phrase.lower().replace(" ", "_")
    await _audit_failure(request, code, status, exc.detail)
    answer = _answer(request, status, code, exc.detail)
    if status == 405:
        answer.headers["allow"] = ", ".join(_methods_on_path(request))
    return answer


def _methods_on_path(request: Request) -> list[str]:
    """The methods some route fully matches on this path (the routes of included routers
    are not flat, so each method is asked rather than read from the routes)."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(r.matches({**request.scope, "method": method})[0] == Match.FULL for r in routes)
    ]


async def _integrity_error(request: Request, exc: Exception) -> Response:
    await _audit_failure(request, "conflict", 409, "conflicts with existing data")
    return _answer(request, 409, "conflict", "the request conflicts with existing data")


class BodyLimit:
    """Reject bodies over ``limit`` bytes with 413, by Content-Length or while streaming."""

    def __init__(self, app: Any, limit: int, pages: ErrorPages | None = None) -> None:
        self.app, self.limit, self.pages = app, limit, pages

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            detail = f"request body exceeds {self.limit} bytes"
            await send_error(send, scope, 413, "too_large", detail, pages=self.pages)
            return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message: dict[str, Any] = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise errors.TooLarge(f"request body exceeds {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def create_app(state: ConsoleState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import asyncio

        state.notifier.bind(asyncio.get_running_loop())
        if state.change_watcher is not None:
            state.change_watcher.start()
        state.writer.start()
        if state.checkpointer is not None:
            state.checkpointer.start()
        if state.renewer is not None:
            state.renewer.start()
        if state.presenter is not None:
            state.presenter.start()
        sweeper = asyncio.get_running_loop().create_task(compliance.sweep_forever(state))
        try:
            yield
        finally:
            sweeper.cancel()
            if state.change_watcher is not None:
                state.change_watcher.stop()
            if state.renewer is not None:
                state.renewer.stop()
            if state.presenter is not None:
                state.presenter.stop()
            state.writer.stop()
            if state.checkpointer is not None:  # after the writer: its last commits count
                state.checkpointer.stop()
            state.snapshot_pages.close()

    app = FastAPI(
        title="certgate console", version="1", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.console = state
    app.add_exception_handler(errors.CertgateError, _certgate_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(IntegrityError, _integrity_error)
    app.add_exception_handler(HTTPException, _routing_error)
    # Matched in this order, so the busiest routes come first: devices and tunnel nodes call
    # far more often than admins (no path of one router matches another's; tested).
    app.state.api_limiter = api_limiter(state.config.api_failures_per_address)
    for module in ROUTERS:
        gate = [] if module is public else [Depends(failure_gate)]  # health, trust anchors
        app.include_router(module.router, dependencies=gate)
    ui.mount(app)  # the web console, after the API: its paths are all under /ui
    metrics = HttpMetrics("console", ())
    app.add_api_route(
        "/metrics", metrics_endpoint(metrics), methods=["GET"], include_in_schema=False
    )
    metrics.seed(route_templates(app, *(module.router for module in ROUTERS)))
    metrics.registry.register(ConsoleCollector(state))
    app.state.metrics = metrics
    # storage failures: 503; the unexpected: a JSON 500; both counted
    app.add_middleware(ErrorShield, on_failure=metrics.failed, pages=ui.PAGES)
    app.add_middleware(BodyLimit, limit=state.config.max_body_bytes, pages=ui.PAGES)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: sees every answer
    return app
