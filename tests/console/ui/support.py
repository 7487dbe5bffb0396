"""Web console test helpers: admins with a password and a TOTP factor, signed-in clients.

TOTP codes are single-use per 30 s step (replay is refused), so each sign-in of a test
uses its own admin (``web_admin`` makes a fresh one)."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pyotp

from certgate.console.services import admins, signin
from tests.support import RunningConsole, init_console, start_console

PASSWORD = "correct horse battery"
_names = itertools.count()
CSRF_RE = re.compile(r'name="csrf" value="([0-9a-f]{64})"')


@dataclass(frozen=True)
class WebAdmin:
    username: str
    password: str
    totp: pyotp.TOTP

    def code(self) -> str:
        return self.totp.now()


def web_admin(console: RunningConsole, role: str, group: str, prefix: str = "web") -> WebAdmin:
    username = f"{prefix}{next(_names)}"
    console.make_admin(username, role, group)
    with console.local() as (session, pki):
        admin = admins.by_username(session, username)
        signin.set_password(session, admin, PASSWORD)
        uri = signin.new_totp(session, pki.master, admin)
    secret = parse_qs(urlsplit(uri).query)["secret"][0]
    return WebAdmin(username, PASSWORD, pyotp.TOTP(secret))


def browser(console: RunningConsole) -> httpx.Client:
    """A cookie-keeping client that trusts the console's CA, as a browser would."""
    return httpx.Client(base_url=console.url, verify=console.ssl_context(), timeout=30)


@contextmanager
def sign_in(console: RunningConsole, who: WebAdmin) -> Iterator[httpx.Client]:
    with browser(console) as client:
        answer = client.post(
            "/ui/login",
            data={"username": who.username, "password": who.password, "code": who.code()},
        )
        assert answer.status_code == 303, answer.text
        yield client


def csrf_of(page: httpx.Response) -> str:
    match = CSRF_RE.search(page.text)
    assert match, "no CSRF field in the page"
    return match.group(1)


@contextmanager
def short_sessions(work: Path, idle_s: int = 2) -> Iterator[RunningConsole]:
    """A console whose web sessions go idle after ``idle_s`` seconds."""
    data_dir, port = init_console(work)
    settings = data_dir / "console.json"
    config = json.loads(settings.read_text())
    config.update(ui_idle_timeout_s=idle_s, ui_absolute_timeout_s=60)
    settings.write_text(json.dumps(config))
    running = start_console(work, data_dir, port)
    try:
        yield running
    finally:
        running.stop()
