"""The shared error path: which failures are storage failures (503 + Retry-After) and what
escapes as a JSON 500 with a logged id. The exceptions are the real ones, raised for real
where that is possible (SQLite on a read-only file, ENOSPC from /dev/full)."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import sqlite3
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from certgate.httperrors import (
    RETRY_AFTER_S,
    ErrorPages,
    ErrorShield,
    classify,
    prefers_html,
    storage_reason,
)


def _enospc() -> OSError:
    try:
        with open("/dev/full", "wb", buffering=0) as full:
            full.write(b"x")
    except OSError as exc:
        return exc
    raise AssertionError("/dev/full accepted a write")


def _sqlalchemy_error(tmp_path: Path) -> OperationalError:
    engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("opened a database in a missing directory")


def test_storage_failures_are_503_with_retry_after(tmp_path: Path) -> None:
    for exc in (_enospc(), _sqlalchemy_error(tmp_path), sqlite3.OperationalError("disk full")):
        failure = classify(exc, "GET /x")
        assert failure.status == 503 and failure.error == "storage_unavailable"
        assert ("retry-after", str(RETRY_AFTER_S)) in failure.headers


def test_a_storage_failure_behind_another_error_is_found(tmp_path: Path) -> None:
    try:
        try:
            raise _enospc()
        except OSError as exc:
            raise RuntimeError("while writing the state") from exc
    except RuntimeError as wrapped:
        assert storage_reason(wrapped) == "disk: No space left on device"


def test_the_sql_statement_stays_out_of_the_detail(tmp_path: Path) -> None:
    reason = storage_reason(_sqlalchemy_error(tmp_path)) or ""
    assert reason.startswith("database: ") and "SELECT" not in reason and "\n" not in reason


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("bug"),
        ValueError("bad"),
        OSError(errno.ECONNRESET, "reset"),
        IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE")),
    ],
)
def test_other_failures_are_a_500_with_an_id_in_the_log(
    exc: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, "certgate.errors"):
        failure = classify(exc, "POST /y")
    assert failure.status == 500 and failure.error == "internal_error" and not failure.headers
    error_id = re.search(r"id ([0-9a-f]{16})$", failure.detail)
    assert error_id is not None
    assert error_id.group(1) in caplog.text and "POST /y" in caplog.text


async def _boom(request: Request) -> Response:
    raise KeyError("no such thing")


async def _full(request: Request) -> Response:
    raise _enospc()


async def _get_both(app: Starlette) -> tuple[httpx.Response, httpx.Response]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get("/boom"), await client.get("/full")


def test_the_shield_answers_json_instead_of_text() -> None:
    # In process (httpx's ASGI transport): the middleware is the unit; the disk-full
    # scenario covers it in a real console process on real sockets.
    app = Starlette(routes=[Route("/boom", _boom), Route("/full", _full)])
    app.add_middleware(ErrorShield)
    boom, full = asyncio.run(_get_both(app))
    assert boom.status_code == 500 and boom.headers["content-type"] == "application/json"
    assert boom.json()["error"] == "internal_error"
    assert full.status_code == 503 and full.headers["retry-after"] == str(RETRY_AFTER_S)
    assert full.json()["error"] == "storage_unavailable"


BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (BROWSER, True),
        ("text/html", True),
        ("*/*", False),  # curl, httpx
        ("", False),
        ("application/json", False),
        ("application/json, text/html;q=0.5", False),
        ("text/html;q=0.5, application/json;q=0.9", False),
        ("text/html;q=bad", False),
    ],
)
def test_a_browser_is_told_by_its_accept_header(accept: str, html: bool) -> None:
    assert prefers_html(accept) is html


PAGES = ErrorPages("/ui", lambda status, code, detail: f"<p>{status} {code}</p>".encode())


@pytest.mark.parametrize(
    ("path", "accept", "routed", "page"),
    [
        ("/ui/devices", "*/*", True, True),  # a UI route: always the page
        ("/ui", "", False, True),
        ("/nowhere", BROWSER, False, True),  # a browser at a wrong address
        ("/nowhere", "*/*", False, False),
        ("/api/v1/nowhere", BROWSER, False, False),  # the API is JSON, whoever asks
        ("/scep", BROWSER, True, False),  # an API route answers JSON
        ("/uix", BROWSER, True, False),
    ],
)
def test_which_errors_are_pages(path: str, accept: str, routed: bool, page: bool) -> None:
    assert PAGES.wanted(path, accept, routed) is page


def test_the_shield_answers_a_page_to_a_browser_on_a_page() -> None:
    # The same in-process unit as above (the ENOSPC is real, from /dev/full).
    app = Starlette(routes=[Route("/ui/full", _full), Route("/api/full", _full)])
    app.add_middleware(ErrorShield, pages=PAGES)

    async def both() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            headers = {"accept": BROWSER}
            return await client.get("/ui/full"), await client.get("/api/full", headers=headers)

    page, api = asyncio.run(both())
    assert (page.status_code, page.headers["content-type"]) == (503, "text/html; charset=utf-8")
    assert page.text == "<p>503 storage_unavailable</p>"
    assert page.headers["retry-after"] == str(RETRY_AFTER_S)
    assert api.status_code == 503 and api.json()["error"] == "storage_unavailable"
