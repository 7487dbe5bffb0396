"""One error path for every certgate server: what a failure the handlers did not map becomes.

A storage failure (the database or the disk under it: SQLite's "database or disk is full",
ENOSPC, a lost PostgreSQL connection) is the service being unable to work *now*, not a
bug: it is answered ``503`` with ``Retry-After`` so a load balancer and a client both back
off and retry. Anything else that escapes is answered with a JSON ``500`` carrying an error
id, and the traceback is logged under that id: a text/plain 500 never reaches a client.

:func:`classify` is the decision (pure); :class:`ErrorShield` is the ASGI shell that the
console and Access install, and the cert proxy and the tunnel's admin listener call
:func:`classify` from their own loops.

An error is a JSON body, except for a browser on a web page: :class:`ErrorPages` (the
console's web UI gives one) says which requests get the same error as an HTML page
(:meth:`ErrorPages.wanted`, the one decision), and every error the app answers (its
handlers, :class:`ErrorShield`, the body limit) asks it. ``/api`` is always JSON.
"""

from __future__ import annotations

import errno
import json
import logging
import secrets
import sqlite3
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FAILURE_KINDS",
    "RETRY_AFTER_S",
    "ErrorPages",
    "ErrorShield",
    "Failure",
    "classify",
    "prefers_html",
    "send_error",
    "send_failure",
    "storage_reason",
]

log = logging.getLogger("certgate.errors")
RETRY_AFTER_S = 30  # long enough for an operator's cleanup or a database failover to start
FAILURE_KINDS = ("database", "disk", "unexpected")
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


@dataclass(frozen=True, slots=True)
class Failure:
    """How an unmapped exception is answered: status, the JSON body, extra headers."""

    status: int
    kind: str  # one of FAILURE_KINDS
    error: str
    detail: str
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> bytes:
        return json.dumps({"error": self.error, "detail": self.detail}).encode()


def storage_reason(exc: BaseException) -> str | None:
    """Why ``exc`` (or an exception it was raised from) is a storage failure, or None."""
    seen: BaseException | None = exc
    for _ in range(5):  # the cause chain is short; a bound guards against cycles
        if seen is None:
            return None
        reason = _own_storage_reason(seen)
        if reason is not None:
            return reason
        seen = seen.__cause__ or seen.__context__
    return None


def _own_storage_reason(exc: BaseException) -> str | None:
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return f"disk: {exc.strerror or errno.errorcode.get(exc.errno or 0, 'error')}"
    if isinstance(exc, sqlite3.OperationalError):
        return f"database: {_first_line(exc)}"
    # Only consulted when loaded: a process without the library cannot have raised its errors
    # (Access and the cert proxy never import SQLAlchemy or psycopg).
    sa = sys.modules.get("sqlalchemy.exc")
    if sa is not None and isinstance(exc, sa.OperationalError | sa.InterfaceError):
        inner = _own_storage_reason(exc.orig) if exc.orig is not None else None
        return inner or "database: unavailable"
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        # Not its message: that names the server's host and port, and this detail goes to
        # unauthenticated clients (/healthz). The log line has the message.
        sqlstate = getattr(exc, "sqlstate", None)
        return f"database: PostgreSQL error {sqlstate}" if sqlstate else _PG_CONNECTION
    return None


_PG_CONNECTION = "database: no connection to PostgreSQL"


def _first_line(exc: BaseException) -> str:
    # The first line only: SQLAlchemy appends the SQL statement and its parameters.
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def classify(exc: BaseException, where: str) -> Failure:
    """The answer to ``exc`` escaping while serving ``where`` (e.g. ``"GET /healthz"``),
    logged here: a storage failure as one line, anything else with its traceback and id."""
    reason = storage_reason(exc)
    if reason is not None:
        log.error("storage unavailable on %s: %s (%s)", where, reason, _first_line(exc))
        retry = (("retry-after", str(RETRY_AFTER_S)),)
        kind = reason.split(":", 1)[0]
        return Failure(503, kind, "storage_unavailable", f"{reason}; retry later", retry)
    error_id = secrets.token_hex(8)
    log.error("unexpected error %s on %s", error_id, where, exc_info=exc)
    detail = f"unexpected error, logged with id {error_id}"
    return Failure(500, "unexpected", "internal_error", detail)


def prefers_html(accept: str) -> bool:
    """Whether an ``Accept`` header (RFC 9110 §12.5.1) ranks ``text/html`` above JSON, as a
    browser asking for a page does; ``*/*`` alone (curl, httpx, API clients) does not."""
    ranks: dict[str, float] = {}
    for item in accept.lower().split(",")[:32]:  # bounded: the header comes from the client
        media, _, params = item.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        ranks[media.strip()] = max(quality, ranks.get(media.strip(), 0.0))
    json = max(ranks.get(m, 0.0) for m in ("application/json", "application/*", "*/*"))
    return ranks.get("text/html", 0.0) > json


@dataclass(frozen=True, slots=True)
class ErrorPages:
    """A web UI's error page: where it is wanted and how it is drawn."""

    prefix: str  # the UI's paths: "/ui" and below
    render: Callable[[int, str, str], bytes]  # (status, code, detail) -> an HTML page
    headers: tuple[tuple[str, str], ...] = ()  # the UI's security headers

    def wanted(self, path: str, accept: str, routed: bool) -> bool:
        """A page on the UI's paths; elsewhere only where no route answers (a browser that
        opened a wrong address), never under /api, and only for a client asking for HTML."""
        if path == self.prefix or path.startswith(f"{self.prefix}/"):
            return True
        return not routed and not path.startswith("/api/") and prefers_html(accept)

    def wanted_by(self, scope: Mapping[str, Any]) -> bool:
        accept = dict(scope.get("headers") or ()).get(b"accept", b"")
        routed = scope.get("route") is not None
        return self.wanted(scope.get("path", ""), accept.decode("latin-1"), routed)


class ErrorShield:
    """ASGI middleware: an exception no handler mapped is answered by :func:`classify`.

    Installed with ``app.add_middleware`` it sits inside Starlette's ServerErrorMiddleware
    (whose answer is text/plain) and outside the exception handlers, so it sees exactly what
    they left. After the response has started nothing can be said: it is logged and re-raised.
    """

    def __init__(
        self,
        app: Any,
        on_failure: Callable[[Failure], None] | None = None,
        pages: ErrorPages | None = None,
    ) -> None:
        self.app, self.on_failure, self.pages = app, on_failure, pages

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            failure = classify(exc, f"{scope.get('method')} {scope.get('path')}")
            if self.on_failure is not None:
                self.on_failure(failure)
            if started:
                raise
            await send_failure(send, failure, scope, self.pages)


async def send_failure(
    send: Any,
    failure: Failure,
    scope: dict[str, Any] | None = None,
    pages: ErrorPages | None = None,
) -> None:
    await send_error(
        send, scope or {}, failure.status, failure.error, failure.detail, failure.headers, pages
    )


async def send_error(
    send: Any,
    scope: dict[str, Any],
    status: int,
    error: str,
    detail: str,
    headers: tuple[tuple[str, str], ...] = (),
    pages: ErrorPages | None = None,
) -> None:
    """Answer an error from ASGI: the JSON error body, or the page if ``pages`` wants one."""
    if pages is not None and pages.wanted_by(scope):
        media, body = b"text/html; charset=utf-8", pages.render(status, error, detail)
        headers = (*pages.headers, *headers)
    else:
        media, body = b"application/json", json.dumps({"error": error, "detail": detail}).encode()
    fields = [
        (b"content-type", media),
        (b"content-length", str(len(body)).encode()),
        *((name.encode(), value.encode()) for name, value in headers),
    ]
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body})
