"""Sign-in and sign-out pages. Failures are rate-limited per account and per client address
(``certgate.ratelimit``) and every failure, refusal and success is audited as ``ui.signin``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from certgate.console.api.deps import state_of
from certgate.console.config import SSOConfig
from certgate.console.services import audit, ca, signin
from certgate.console.ui.web import (
    COOKIE,
    Form,
    FormBody,
    client_of,
    limiter_of,
    monotonic,
    redirect,
    render,
    set_session_cookie,
    timeouts_of,
    ui_tx,
)
from certgate.errors import AuthError

router = APIRouter(prefix="/ui")


@router.get("/login")
def login_page(request: Request) -> Response:
    return render("login.html", None, sso=_sso(request))


@router.post("/login")
def login(request: Request, form: FormBody) -> Response:
    username, address = form.get("username", "")[:128], client_of(request)
    limiter, now = limiter_of(request), monotonic()
    wait_s = limiter.retry_after(username, address, now)
    if wait_s:
        _audit_signin(request, username, "denied", code="rate_limited", retry_after_s=wait_s)
        page = render(
            "login.html", None, status=429, error="Too many failed sign-ins.", sso=_sso(request)
        )
        page.headers["retry-after"] = str(wait_s)
        return page
    try:
        token = _sign_in(request, username, form)
    except AuthError as exc:
        limiter.failed(username, address, now)
        request.app.state.metrics.signin_failures.labels("web").inc()
        _audit_signin(request, username, "denied", code="unauthenticated", reason=str(exc))
        return render(
            "login.html", None, status=401, error=str(exc), username=username, sso=_sso(request)
        )
    response = redirect("/ui/")
    set_session_cookie(response, token, state_of(request).config.ui_absolute_timeout_s)
    return response


def _sso(request: Request) -> SSOConfig | None:
    return state_of(request).config.sso_config


def _sign_in(request: Request, username: str, form: Form) -> str:
    state = state_of(request)
    with state.db.transaction() as session:
        admin = signin.verify_factors(
            session,
            state.pki.master,
            username,
            form.get("password", ""),
            form.get("code", "").strip(),
            ca.now(),
        )
        token = signin.open_session(session, admin, client_of(request), timeouts_of(request))
        audit.append(session, f"admin:{admin.username}", "ui.signin", client=client_of(request))
        return token


def _audit_signin(request: Request, username: str, outcome: str, **detail: Any) -> None:
    """In its own transaction: the sign-in's was rolled back."""
    with state_of(request).db.transaction() as session:
        actor = f"anonymous@{client_of(request)}"
        audit.append(session, actor, "ui.signin", outcome, username=username, **detail)


@router.post("/logout")
def logout(request: Request, form: FormBody) -> Response:
    with ui_tx(request, form) as (session, who):
        signin.close_session(session, who.session_id)
        audit.append(session, request.state.actor, "ui.signout")
    response = redirect("/ui/login")
    response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response
