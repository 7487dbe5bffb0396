"""The web console in a real browser: Playwright driving Debian's Chromium against a real
console, a real tunnel node behind HAProxy and a real enrolled app (tests/integration/
cluster.py). Nothing is downloaded at run time (no `playwright install`).

Each page is screenshotted (laptop and phone widths) under the test's tmp dir; the path is
printed. A page "renders without console errors" when Chromium logs no error and no
uncaught exception while loading it: that includes Content-Security-Policy violations,
so an inline script or style that slipped into a template fails here.

The browser is told to accept the console's certificate (``ignore_https_errors``): it is
issued by the instance's own secure-channel root, which Chromium's store does not hold.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page

from tests.console.ui.support import WebAdmin, short_sessions, web_admin
from tests.integration.cluster import (
    GROUP,
    Cluster,
    closed_within,
    curl,
    open_tunnel,
    start_cluster,
)
from tests.support import RunningConsole

pytestmark = pytest.mark.integration
LAPTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("web"), node_names=("node-1",)) as running:
        yield running


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("screenshots")
    print(f"\nweb console screenshots: {path}")
    return path


class Watched:
    """A page whose console errors and uncaught exceptions are collected."""

    def __init__(self, page: Page) -> None:
        self.page, self.errors = page, []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))


def new_page(browser: Browser, viewport: dict[str, int] = LAPTOP) -> Watched:
    context = browser.new_context(ignore_https_errors=True, viewport=viewport)  # type: ignore[arg-type]
    return Watched(context.new_page())


def sign_in(watched: Watched, console: RunningConsole, who: WebAdmin, code: str = "") -> None:
    page = watched.page
    page.goto(f"{console.url}/ui/")
    assert page.url.endswith("/ui/login")  # signed out: sent to the sign-in page
    page.fill("input[name=username]", who.username)
    page.fill("input[name=password]", who.password)
    page.fill("input[name=code]", code or who.code())
    page.click("button[type=submit]")


def test_sign_in_with_password_and_totp_and_every_page_renders(
    cluster: Cluster, chromium: Browser, shots: Path
) -> None:
    uid = cluster.device_uid
    pages = {
        "dashboard": "/ui/",
        "devices": "/ui/devices",
        "device": f"/ui/devices/{uid}",
        "confirm-block": f"/ui/devices/{uid}/confirm/block",
        "groups": "/ui/groups",
        "group": f"/ui/groups/{GROUP}",
        "nodes": "/ui/nodes",
        "certificates": f"/ui/certificates?group={GROUP}",
        "audit": "/ui/audit",
        "admins": "/ui/admins",
    }
    for width, viewport in (("laptop", LAPTOP), ("phone", PHONE)):
        watched = new_page(chromium, viewport)
        sign_in(watched, cluster.console, web_admin(cluster.console, "superadmin", "global"))
        assert watched.page.url.endswith("/ui/"), watched.page.content()
        for name, path in pages.items():
            answer = watched.page.goto(f"{cluster.console.url}{path}")
            assert answer is not None and answer.status == 200, (name, answer)
            assert watched.page.locator("h1").count() >= 1
            watched.page.screenshot(path=shots / f"{width}-{name}.png", full_page=True)
        assert watched.errors == [], watched.errors
        watched.page.context.close()


def test_a_wrong_totp_code_is_refused(cluster: Cluster, chromium: Browser, shots: Path) -> None:
    who = web_admin(cluster.console, "superadmin", "global")
    watched = new_page(chromium)
    wrong = f"{(int(who.code()) + 1) % 10**6:06d}"
    sign_in(watched, cluster.console, who, code=wrong)
    page = watched.page
    assert page.url.endswith("/ui/login")
    assert "wrong username, password or code" in page.locator(".error").inner_text()
    page.screenshot(path=shots / "login-refused.png")
    assert page.goto(f"{cluster.console.url}/ui/devices") is not None
    assert page.url.endswith("/ui/login")
    page.context.close()


def test_marking_a_device_non_compliant_closes_its_live_tunnel(
    cluster: Cluster, chromium: Browser, shots: Path
) -> None:
    with open_tunnel(cluster, cluster.nodes[0]) as tunnel:
        non_compliant_in_the_ui(cluster, chromium, shots, tunnel)


def non_compliant_in_the_ui(
    cluster: Cluster, chromium: Browser, shots: Path, tunnel: ssl.SSLSocket
) -> None:
    watched = new_page(chromium)
    sign_in(watched, cluster.console, web_admin(cluster.console, "device-admin", GROUP))
    page = watched.page
    page.goto(f"{cluster.console.url}/ui/devices/{cluster.device_uid}")
    page.click("a.button:has-text('Mark non-compliant')")
    assert "/confirm/noncompliant" in page.url
    assert "closes its live tunnels" in page.content()
    page.screenshot(path=shots / "confirm-noncompliant.png", full_page=True)
    page.click("#confirm")
    assert page.url.endswith(f"/ui/devices/{cluster.device_uid}")
    assert "noncompliant" in page.locator("#compliance").inner_text()
    assert closed_within(tunnel, 30) is not None, "the node kept the live tunnel open"
    refused = curl(cluster, "-o", "/dev/null", "-w", "%{http_code}")
    assert refused.stdout != "200"
    assert watched.errors == [], watched.errors
    page.context.close()


def test_a_post_without_the_csrf_token_is_refused(cluster: Cluster, chromium: Browser) -> None:
    watched = new_page(chromium)
    sign_in(watched, cluster.console, web_admin(cluster.console, "superadmin", "global"))
    answer = watched.page.request.post(
        f"{cluster.console.url}/ui/devices/{cluster.device_uid}/block", form={"reason": "x"}
    )
    assert answer.status == 403 and "csrf" in answer.text().lower()
    watched.page.goto(f"{cluster.console.url}/ui/devices/{cluster.device_uid}")
    assert "blocked" not in watched.page.locator("#compliance").inner_text()
    watched.page.context.close()


def test_a_read_only_admin_has_no_write_controls_and_is_refused(
    cluster: Cluster, chromium: Browser, shots: Path
) -> None:
    watched = new_page(chromium)
    sign_in(watched, cluster.console, web_admin(cluster.console, "read-only", GROUP))
    page = watched.page
    page.goto(f"{cluster.console.url}/ui/devices/{cluster.device_uid}")
    assert page.locator("a[href*='/confirm/']").count() == 0
    page.screenshot(path=shots / "device-read-only.png", full_page=True)
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    answer = page.request.post(
        f"{cluster.console.url}/ui/devices/{cluster.device_uid}/wipe", form={"csrf": csrf or ""}
    )
    assert answer.status == 403
    page.context.close()


def test_an_idle_session_expires_in_the_browser(
    chromium: Browser, tmp_path: Path, shots: Path
) -> None:
    with short_sessions(tmp_path, idle_s=2) as console:
        watched = new_page(chromium)
        sign_in(watched, console, web_admin(console, "superadmin", "global"))
        page = watched.page
        assert page.url.endswith("/ui/")
        page.wait_for_timeout(3500)  # beyond the 2 s idle timeout
        page.goto(f"{console.url}/ui/devices")
        assert page.url.endswith("/ui/login")
        page.screenshot(path=shots / "session-expired.png")
        page.context.close()
