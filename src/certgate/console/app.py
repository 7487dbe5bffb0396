"""The console's FastAPI application: error mapping, body limits, failure auditing.

Status mapping lives here and only here (the error tree is in ``certgate.errors``). Every
request that fails authentication, authorization or validation is answered with a precise
4xx and leaves an audit entry with its reason; nothing escapes as a 500 by design.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from certgate import errors
from certgate.console import ui
from certgate.console.api import access_signin, admin, compliance, est, public, scep
from certgate.console.api import device as device_api
from certgate.console.api import rotation as rotation_api
from certgate.console.api import tunnel as tunnel_api
from certgate.console.services import audit
from certgate.console.state import ConsoleState

log = logging.getLogger("certgate.console")
ROUTERS = (
    device_api,
    tunnel_api,
    public,
    admin,
    rotation_api,
    compliance,
    est,
    scep,
    access_signin,
)

STATUS: tuple[tuple[type[errors.CertgateError], int, str], ...] = (
    (errors.AuthError, 401, "unauthenticated"),
    (ui.CSRFFailed, 403, "csrf_failed"),
    (errors.PermissionDenied, 403, "forbidden"),
    (errors.NotFound, 404, "not_found"),
    (errors.Conflict, 409, "conflict"),
    (errors.TooLarge, 413, "too_large"),
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
    """The JSON error body, or for a web console page the same error as a page."""
    if ui.is_ui(request.url.path):
        return ui.error_page(request, status, code, detail)
    return _error(status, code, detail)


async def _certgate_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.CertgateError)
    status, code = status_of(exc)
    await _audit_failure(request, code, status, str(exc))
    return _answer(request, status, code, str(exc))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
    )
    await _audit_failure(request, "invalid_request", 422, detail)
    return _answer(request, 422, "invalid_request", detail)


async def _integrity_error(request: Request, exc: Exception) -> Response:
    await _audit_failure(request, "conflict", 409, "conflicts with existing data")
    return _answer(request, 409, "conflict", "the request conflicts with existing data")


class BodyLimit:
    """Reject bodies over ``limit`` bytes with 413, by Content-Length or while streaming."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _send_413(send, self.limit)
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


async def _send_413(send: Any, limit: int) -> None:
    body = f'{{"error":"too_large","detail":"request body exceeds {limit} bytes"}}'.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


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
        sweeper = asyncio.get_running_loop().create_task(compliance.sweep_forever(state))
        try:
            yield
        finally:
            sweeper.cancel()
            if state.change_watcher is not None:
                state.change_watcher.stop()
            if state.renewer is not None:
                state.renewer.stop()
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
    # Matched in this order, so the busiest routes come first: devices and tunnel nodes call
    # far more often than admins (no path of one router matches another's; tested).
    for module in ROUTERS:
        app.include_router(module.router)
    ui.mount(app)  # the web console, after the API: its paths are all under /ui
    app.add_middleware(BodyLimit, limit=state.config.max_body_bytes)
    return app
