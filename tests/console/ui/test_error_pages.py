"""The web console's error page in a real browser: Playwright driving Debian's Chromium
against a real console (SQLite; the page does not depend on the store). A signed-in admin
who opens a page that does not exist gets the console's layout with the error, no console
error (the page obeys the Content-Security-Policy), and a link that takes it back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.console.ui.support import web_admin
from tests.support import RunningConsole, init_console, start_console

pytestmark = pytest.mark.integration
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningConsole]:
    work = tmp_path_factory.mktemp("error-pages")
    data_dir, port = init_console(work)
    running = start_console(work, data_dir, port)
    try:
        yield running
    finally:
        running.stop()


def test_a_missing_page_is_an_error_page_with_a_way_back(console: RunningConsole) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: `make sysdeps` installs Debian's chromium")
    who = web_admin(console, "superadmin", "global")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{console.url}/ui/")
            page.fill("input[name=username]", who.username)
            page.fill("input[name=password]", who.password)
            page.fill("input[name=code]", who.code())
            page.click("button[type=submit]")
            page.wait_for_url(f"{console.url}/ui/")
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            answer = page.goto(f"{console.url}/ui/devices/{'0' * 32}")
            assert answer is not None and answer.status == 404
            assert page.title() == "404 not_found · certgate console"
            assert page.locator("h1").inner_text() == "Not found"
            assert page.locator("[role=alert]").inner_text() == f"device '{'0' * 32}' not found"
            page.click("text=Back to the dashboard")
            page.wait_for_url(f"{console.url}/ui/")
            assert page.locator("h1").count() >= 1 and "Not found" not in page.content()
        finally:
            browser.close()
    # Chromium logs the 404 of the page itself as a console error; nothing else may appear.
    assert [e for e in errors if "404" not in e] == []
