"""The web console's request plumbing: the signed-in unit of work, forms, CSRF, rendering.

The UI is another door to the same services: ``ui_tx`` is ``api.deps.admin_tx`` with a
session cookie instead of API key + admin certificate, and sets the same request state
(actor, group) so that a failure is audited by the app's one error mapping.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy.orm import Session

from certgate.console.api.deps import state_of
from certgate.console.services import ca, signin
from certgate.console.services.rbac import Permission, permissions_on
from certgate.console.services.signin import SignedIn, Timeouts
from certgate.errors import BadRequest, PermissionDenied
from certgate.ratelimit import SignInLimiter

COOKIE = "__Host-certgate-session"  # __Host-: Secure, Path=/, no Domain (RFC 6265bis 4.1.3)
HERE = Path(__file__).parent
MAX_FIELD = 64 * 1024
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


class CSRFFailed(PermissionDenied):
    """A state change without this session's CSRF token. Maps to 403 csrf_failed."""


class Form(dict[str, str]):
    """An urlencoded form body: one value per field, the last one wins."""

    def one(self, name: str, default: str | None = None) -> str:
        value = self.get(name, default)
        if value is None:
            raise BadRequest(f"form field {name!r} missing")
        return value


async def form_of(request: Request) -> Form:
    """The request's urlencoded form (the app's body limit applies while reading)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/x-www-form-urlencoded":
        raise BadRequest("a form post must be application/x-www-form-urlencoded")
    try:
        fields = parse_qs((await request.body()).decode(), keep_blank_values=True)
    except UnicodeDecodeError as exc:
        raise BadRequest("form body is not UTF-8") from exc
    form = Form({k: v[-1] for k, v in fields.items()})
    if any(len(v) > MAX_FIELD for v in form.values()):
        raise BadRequest(f"a form field exceeds {MAX_FIELD} characters")
    return form


FormBody = Annotated[Form, Depends(form_of)]


def limiter_of(request: Request) -> SignInLimiter:
    limiter: SignInLimiter = request.app.state.ui_limiter
    return limiter


def timeouts_of(request: Request) -> Timeouts:
    config = state_of(request).config
    return Timeouts(
        timedelta(seconds=config.ui_idle_timeout_s),
        timedelta(seconds=config.ui_absolute_timeout_s),
    )


def client_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@contextmanager
def ui_tx(
    request: Request, form: Form | None = None, group_id: str | None = None
) -> Iterator[tuple[Session, SignedIn]]:
    """A transaction of the signed-in admin; for a post (``form``), after the CSRF check."""
    state = state_of(request)
    request.state.group_id = group_id
    with state.db.transaction() as session:
        who = signin.session_for(
            session, request.cookies.get(COOKIE), ca.now(), timeouts_of(request)
        )
        request.state.actor = f"admin:{who.admin.username}"
        if form is not None and not signin.csrf_matches(who, form.get("csrf")):
            raise CSRFFailed("missing or wrong CSRF token for this session")
        yield session, who


def may(session: Session, who: SignedIn, permission: Permission, group_id: str) -> bool:
    """Whether to show a write control: the same grant ``rbac.require`` checks."""
    return permission in permissions_on(session, who.admin, group_id)


def render(template: str, who: SignedIn | None, status: int = 200, **context: Any) -> HTMLResponse:
    page = templates.get_template(template).render(who=who, **context)
    return HTMLResponse(page, status_code=status, headers=SECURITY_HEADERS)


def redirect(url: str, headers: Mapping[str, str] | None = None) -> RedirectResponse:
    response = RedirectResponse(url, status_code=303, headers=dict(headers or {}))
    response.headers.update(SECURITY_HEADERS)
    return response


def error_page(request: Request, status: int, code: str, detail: str) -> Response:
    """The UI's face of the app's error mapping: a page to sign in again, or the error."""
    if status == 401 and request.method == "GET":
        return redirect("/ui/login")
    return HTMLResponse(error_html(status, code, detail), status, SECURITY_HEADERS)


def error_html(status: int, code: str, detail: str) -> bytes:
    """The error page (the layout, the message, a link back), for ``httperrors.ErrorPages``."""
    page = templates.get_template("error.html").render(
        who=None, status=status, code=code, detail=detail
    )
    return page.encode()


def set_session_cookie(response: Response, token: str, max_age_s: int) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=max_age_s,
        path="/",
        secure=True,
        httponly=True,
        samesite="strict",
    )


def monotonic() -> float:
    return time.monotonic()
