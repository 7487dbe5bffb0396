"""The admin web console: server-rendered pages on the console's services (docs/WEB_CONSOLE.md).

``mount`` adds the pages, the stylesheet and the sign-in limiter to the console app."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from certgate.console.ui import access, fleet, manage, sso
from certgate.console.ui.web import HERE, SECURITY_HEADERS, CSRFFailed, error_html, error_page
from certgate.httperrors import ErrorPages
from certgate.ratelimit import SignInLimiter

__all__ = ["PAGES", "CSRFFailed", "error_page", "is_ui", "mount"]

# Errors a browser gets as a page (the app's handlers, its error shield, its body limit).
PAGES = ErrorPages("/ui", error_html, tuple(SECURITY_HEADERS.items()))


def is_ui(path: str) -> bool:
    return path == "/ui" or path.startswith("/ui/")


def mount(app: FastAPI) -> None:
    app.state.ui_limiter = SignInLimiter()
    sso.redact_access_log()
    for module in (access, fleet, manage, sso):
        app.include_router(module.router, include_in_schema=False)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.add_api_route(
        "/ui", lambda: RedirectResponse("/ui/", status_code=308), include_in_schema=False
    )
