"""Single sign-on pages: start at the provider, come back with a code, land signed in.

The flow's cookie is SameSite=Lax and scoped to /ui/sso: the provider's redirect back is a
cross-site top-level navigation, on which a Strict cookie is not sent. For the same reason
the callback answers a page that moves on to /ui/ itself (a same-site navigation), so the
Strict session cookie it sets is sent there. Every refusal is audited as ``ui.signin``
(outcome ``denied``, ``method: sso``) and spends the client address's sign-in budget.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response

from certgate.console.api.deps import state_of
from certgate.console.config import SSOConfig
from certgate.console.services import admins, audit, ca, signin, sso
from certgate.console.sso_secret import SealedSecret
from certgate.console.ui.web import (
    FormBody,
    client_of,
    limiter_of,
    monotonic,
    redirect,
    render,
    set_session_cookie,
    timeouts_of,
)
from certgate.errors import AuthError, NotFound, Unavailable
from certgate.pki.keystore import MasterKey

router = APIRouter(prefix="/ui/sso")
FLOW_COOKIE = "__Secure-certgate-sso"
PENDING_COOKIE = "__Secure-certgate-sso-totp"
COOKIE_PATH = "/ui/sso"
TOTP_TTL_S = 300  # the TOTP page after the provider must be answered within five minutes


class RedactCallback(logging.Filter):
    """Keeps the code and state of a callback out of the HTTP access log (uvicorn logs the
    path with its query): a code is a bearer secret until it is redeemed."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path = args[2]
            if path.startswith(sso.CALLBACK_PATH + "?"):
                record.args = (*args[:2], sso.CALLBACK_PATH + "?<redacted>", *args[3:])
        return True


def redact_access_log() -> None:
    log = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactCallback) for f in log.filters):
        log.addFilter(RedactCallback())


def provider_of(request: Request) -> sso.Provider:
    """The app's provider, made at the first use (discovery is fetched lazily)."""
    state = state_of(request)
    config, settings = state.config, state.config.sso_config
    if settings is None:
        raise NotFound("single sign-on is not configured")
    provider: sso.Provider | None = getattr(request.app.state, "sso_provider", None)
    if provider is None:
        callback = config.public_url.rstrip("/") + sso.CALLBACK_PATH
        sealed = SealedSecret(config.sso_secret_file, state.pki.master)
        provider = sso.Provider(settings, callback, sealed)
        request.app.state.sso_provider = provider
    return provider


def sso_settings(request: Request) -> SSOConfig | None:
    return state_of(request).config.sso_config


@router.get("/start")
def start(request: Request) -> Response:
    provider = provider_of(request)
    flow = sso.new_flow(sso.now())
    try:
        url = provider.authorization_url(flow)
    except Unavailable as exc:
        _audit_refusal(request, "unavailable", str(exc))
        return _refused(request, 503, str(exc))
    response = redirect(url)
    payload = {"state": flow.state, "nonce": flow.nonce, "verifier": flow.verifier}
    value = sso.seal(_master(request), "flow", {**payload, "expires": flow.expires})
    _set_cookie(response, FLOW_COOKIE, value, "lax", sso.FLOW_TTL_S)
    return response


@router.get("/callback")
def callback(request: Request) -> Response:
    """OIDC Core §3.1.2.5-7: this flow's state, the code redeemed with its verifier, the ID
    token verified with its nonce, then the claim mapped to an admin."""
    provider, address = provider_of(request), client_of(request)
    limiter = limiter_of(request)
    wait_s = limiter.retry_after(None, address, monotonic())
    if wait_s:
        _audit_refusal(request, "rate_limited", "too many failed sign-ins", retry_after_s=wait_s)
        page = _refused(request, 429, "Too many failed sign-ins.")
        page.headers["retry-after"] = str(wait_s)
        return page
    try:
        flow = _flow_for(request)
        claims = provider.redeem(request.query_params.get("code", ""), flow)
        admin_name = _admin_of(request, claims)
    except AuthError as exc:
        return _failed(request, 401, str(exc))
    except Unavailable as exc:
        _audit_refusal(request, "unavailable", str(exc))
        return _refused(request, 503, str(exc))
    settings = provider.config
    if settings.require_totp:
        return _ask_totp(request, admin_name)
    return _signed_in(request, admin_name, claims.get(settings.admin_claim))


def _flow_for(request: Request) -> sso.Flow:
    """The flow this browser started, if the provider's answer is for it (RFC 6749 §10.12)."""
    params = request.query_params
    payload = sso.open_sealed(_master(request), "flow", request.cookies.get(FLOW_COOKIE), sso.now())
    flow = sso.flow_of(payload)
    if not hmac.compare_digest(params.get("state", "").encode(), flow.state.encode()):
        raise AuthError("state does not match the sign-in this browser started")
    issuer = provider_of(request).config.issuer
    if "iss" in params and params["iss"] != issuer:  # RFC 9207 §2.4: a mix-up
        raise AuthError("the answer names another issuer")
    if "error" in params:  # RFC 6749 §4.1.2.1: the provider refused
        raise AuthError(
            f"provider refused: {params['error']} {params.get('error_description', '')}"
        )
    if not params.get("code"):
        raise AuthError("provider answered without a code")
    return flow


def _admin_of(request: Request, claims: dict[str, Any]) -> str:
    settings = provider_of(request).config
    with state_of(request).db.transaction() as session:
        return sso.admin_for(session, settings, claims).username


def _signed_in(request: Request, username: str, subject: Any) -> Response:
    state = state_of(request)
    with state.db.transaction() as session:
        admin = admins.by_username(session, username)
        token = signin.open_session(session, admin, client_of(request), timeouts_of(request))
        actor = f"admin:{admin.username}"
        audit.append(
            session,
            actor,
            "ui.signin",
            client=client_of(request),
            method="sso",
            subject=str(subject),
        )
    response = render("sso_continue.html", None)
    set_session_cookie(response, token, state.config.ui_absolute_timeout_s)
    _clear(response, FLOW_COOKIE)
    _clear(response, PENDING_COOKIE)
    return response


def _ask_totp(request: Request, username: str) -> Response:
    pending = {"username": username, "expires": sso.now() + TOTP_TTL_S}
    response = render("sso_totp.html", None)
    _set_cookie(
        response, PENDING_COOKIE, sso.seal(_master(request), "totp", pending), "strict", TOTP_TTL_S
    )
    _clear(response, FLOW_COOKIE)
    return response


@router.post("/totp")
def totp(request: Request, form: FormBody) -> Response:
    """The second factor after the provider, when ``require_totp`` is set."""
    if sso_settings(request) is None:
        raise NotFound("single sign-on is not configured")
    limiter, address, at = limiter_of(request), client_of(request), monotonic()
    try:
        pending = sso.open_sealed(
            _master(request), "totp", request.cookies.get(PENDING_COOKIE), sso.now()
        )
        username = str(pending["username"])
    except AuthError as exc:
        return _failed(request, 401, str(exc))
    wait_s = limiter.retry_after(username, address, at)
    if wait_s:
        _audit_refusal(request, "rate_limited", "too many failed sign-ins", username=username)
        page = _refused(request, 429, "Too many failed sign-ins.")
        page.headers["retry-after"] = str(wait_s)
        return page
    try:
        _check_totp(request, username, form.get("code", "").strip())
    except AuthError as exc:
        limiter.failed(username, address, at)
        _audit_refusal(request, "unauthenticated", str(exc), username=username)
        return render("sso_totp.html", None, status=401, error=str(exc))
    return _signed_in(request, username, username)


def _check_totp(request: Request, username: str, code: str) -> None:
    state = state_of(request)
    with state.db.transaction() as session:
        try:
            admin = admins.by_username(session, username)
        except NotFound as exc:
            raise AuthError("admin account missing") from exc
        signin.verify_totp(session, state.pki.master, admin, code, ca.now())


def _failed(request: Request, status: int, reason: str) -> Response:
    limiter_of(request).failed(None, client_of(request), monotonic())
    request.app.state.metrics.signin_failures.labels("web").inc()
    _audit_refusal(request, "unauthenticated", reason)
    return _refused(request, status, reason)


def _refused(request: Request, status: int, reason: str) -> Response:
    response = render(
        "login.html",
        None,
        status=status,
        error=f"Single sign-on refused: {reason}",
        sso=sso_settings(request),
    )
    _clear(response, FLOW_COOKIE)
    return response


def _audit_refusal(request: Request, code: str, reason: str, **detail: Any) -> None:
    with state_of(request).db.transaction() as session:
        actor = f"anonymous@{client_of(request)}"
        audit.append(
            session,
            actor,
            "ui.signin",
            "denied",
            method="sso",
            code=code,
            reason=reason[:500],
            **detail,
        )


def _master(request: Request) -> MasterKey:
    return state_of(request).pki.master


def _set_cookie(
    response: Response, name: str, value: str, samesite: Literal["lax", "strict"], max_age: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=COOKIE_PATH,
        secure=True,
        httponly=True,
        samesite=samesite,
    )


def _clear(response: Response, name: str) -> None:
    response.delete_cookie(name, path=COOKIE_PATH, secure=True, httponly=True)
