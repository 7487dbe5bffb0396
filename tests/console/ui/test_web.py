"""The web console against a real console process (SQLite and PostgreSQL), over real TLS:
sign-in factors, cookie attributes, rate limits, CSRF, role and group scoping, sign-out,
session expiry, keyset pages. Browser rendering is tested with Chromium in
tests/integration/test_web_console.py."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from certgate.console import paging
from certgate.console.services import groups
from certgate.console.store.models import AuditEntry, Device, Group
from certgate.ratelimit import ACCOUNT_BURST
from tests.console.conftest import add_device
from tests.console.ui.support import browser, csrf_of, short_sessions, sign_in, web_admin
from tests.support import RunningConsole


def _audit(console: RunningConsole, action: str) -> list[AuditEntry]:
    with console.local() as (session, _):
        rows = session.execute(
            select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.id)
        ).scalars()
        return list(rows)


def test_password_and_totp_sign_in_sets_a_strict_host_cookie(console: RunningConsole) -> None:
    who = web_admin(console, "superadmin", "global")
    with browser(console) as client:
        answer = client.post(
            "/ui/login",
            data={"username": who.username, "password": who.password, "code": who.code()},
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/"
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith("__Host-certgate-session=cgs_")
        for attribute in ("Secure", "HttpOnly", "SameSite=strict", "Path=/"):
            assert attribute.lower() in cookie.lower()
        page = client.get("/ui/")
        assert page.status_code == 200 and who.username in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
    assert any(e.actor == f"admin:{who.username}" for e in _audit(console, "ui.signin"))


@pytest.mark.parametrize("field", ["password", "code"])
def test_a_wrong_factor_is_refused_and_audited(console: RunningConsole, field: str) -> None:
    who = web_admin(console, "superadmin", "global")
    form = {"username": who.username, "password": who.password, "code": who.code()}
    form[field] = (
        "wrong password" if field == "password" else f"{(int(form['code']) + 1) % 10**6:06d}"
    )
    with browser(console) as client:
        answer = client.post("/ui/login", data=form)
        assert answer.status_code == 401
        assert "wrong username, password or code" in answer.text
        assert "set-cookie" not in answer.headers
        assert client.get("/ui/").status_code == 303  # still signed out
    denied = [e for e in _audit(console, "ui.signin") if e.outcome == "denied"]
    assert any(e.detail.get("username") == who.username for e in denied)


def test_a_totp_code_cannot_be_replayed(console: RunningConsole) -> None:
    who = web_admin(console, "superadmin", "global")
    code = who.code()
    form = {"username": who.username, "password": who.password, "code": code}
    with browser(console) as first, browser(console) as second:
        assert first.post("/ui/login", data=form).status_code == 303
        assert second.post("/ui/login", data=form).status_code == 401


def test_failed_sign_ins_of_an_account_are_rate_limited(console: RunningConsole) -> None:
    who = web_admin(console, "superadmin", "global")
    bad = {"username": who.username, "password": "not the password", "code": "000000"}
    with browser(console) as client:
        for _ in range(ACCOUNT_BURST):
            assert client.post("/ui/login", data=bad).status_code == 401
        limited = client.post(
            "/ui/login", data={**bad, "password": who.password, "code": who.code()}
        )
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) > 0
    limited_rows = [
        e for e in _audit(console, "ui.signin") if e.detail.get("code") == "rate_limited"
    ]
    assert any(e.detail.get("username") == who.username for e in limited_rows)


def test_a_post_without_the_sessions_csrf_token_is_refused(console: RunningConsole) -> None:
    who = web_admin(console, "superadmin", "global")
    with console.local() as (session, _):
        uid = add_device(session, "global")
    with sign_in(console, who) as client:
        for token in (None, "0" * 64):
            data = {"reason": "x"} if token is None else {"csrf": token}
            answer = client.post(f"/ui/devices/{uid}/block", data=data)
            assert answer.status_code == 403 and "csrf" in answer.text.lower()
        with console.local() as (session, _):
            assert session.get(Device, uid).blocked is False
        page = client.get(f"/ui/devices/{uid}")
        assert (
            client.post(f"/ui/devices/{uid}/block", data={"csrf": csrf_of(page)}).status_code == 303
        )
    with console.local() as (session, _):
        assert session.get(Device, uid).blocked is True
    assert any(
        e.detail.get("code") == "csrf_failed"
        for e in _audit(console, "POST /ui/devices/{uid}/{action}")
    )


def test_a_read_only_admin_sees_no_write_button_and_is_refused(console: RunningConsole) -> None:
    who = web_admin(console, "read-only", "global")
    with console.local() as (session, _):
        uid = add_device(session, "global")
    with sign_in(console, who) as client:
        page = client.get(f"/ui/devices/{uid}")
        assert page.status_code == 200 and uid in page.text
        assert "/confirm/" not in page.text and "read-only" in page.text
        answer = client.post(f"/ui/devices/{uid}/noncompliant", data={"csrf": csrf_of(page)})
        assert answer.status_code == 403
        assert client.get(f"/ui/devices/{uid}/confirm/wipe").status_code == 403
    with console.local() as (session, _):
        assert session.get(Device, uid).compliance_status != "noncompliant"


def test_an_admin_of_one_group_sees_nothing_of_another(console: RunningConsole) -> None:
    with console.local() as (session, pki):
        for name in ("teama", "teamb"):
            if session.get(Group, name) is None:
                groups.create_group(session, pki, name, name, "global")
        mine, theirs = add_device(session, "teama"), add_device(session, "teamb")
    who = web_admin(console, "superadmin", "teama")
    with sign_in(console, who) as client:
        listing = client.get("/ui/devices")
        assert mine in listing.text and theirs not in listing.text
        assert client.get(f"/ui/devices/{theirs}").status_code == 404
        assert client.get("/ui/devices", params={"group": "teamb"}).status_code == 404
        assert "teamb" not in client.get("/ui/groups").text
        assert client.get("/ui/audit", params={"group": "teamb"}).status_code == 404


def test_sign_out_ends_the_session_on_the_server(console: RunningConsole) -> None:
    who = web_admin(console, "superadmin", "global")
    with sign_in(console, who) as client:
        cookie = client.cookies["__Host-certgate-session"]
        page = client.get("/ui/")
        assert client.post("/ui/logout", data={"csrf": csrf_of(page)}).status_code == 303
    with browser(console) as replay:
        replay.cookies.set("__Host-certgate-session", cookie, domain="127.0.0.1")
        assert replay.get("/ui/").headers.get("location") == "/ui/login"


def test_device_pages_are_keyset_pages_in_order(console: RunningConsole) -> None:
    with console.local() as (session, pki):
        if session.get(Group, "paged") is None:
            groups.create_group(session, pki, "paged", "paged", "global")
        uids = sorted(add_device(session, "paged") for _ in range(120))
    who = web_admin(console, "read-only", "global")
    seen: list[str] = []
    with sign_in(console, who) as client:
        url = "/ui/devices?group=paged"
        for _ in range(5):
            page = client.get(url)
            assert page.status_code == 200
            seen += [u for u in uids if f'/ui/devices/{u}"' in page.text]
            if 'rel="next"' not in page.text:
                break
            url = page.text.split('rel="next"')[0].rsplit('href="', 1)[1].split('"')[0]
            url = url.replace("&amp;", "&")
        assert client.get("/ui/devices?after=!!notacursor").status_code == 400
        assert client.get("/ui/audit?before=" + paging.encode_cursor(["x"])).status_code == 400
    assert seen == uids


def test_audit_exports_as_csv_and_json(console: RunningConsole) -> None:
    who = web_admin(console, "superadmin", "global")
    with console.local() as (session, _):
        uid = add_device(session, "global")
    with sign_in(console, who) as client:
        page = client.get(f"/ui/devices/{uid}")
        client.post(f"/ui/devices/{uid}/unblock", data={"csrf": csrf_of(page)})
        as_json = client.get("/ui/audit", params={"group": "global", "format": "json"})
        assert as_json.status_code == 200 and "attachment" in as_json.headers["content-disposition"]
        entries = json.loads(as_json.text)
        assert entries[0]["action"] == "device.unblock"
        assert entries[0]["actor"] == f"admin:{who.username}"
        assert {"id", "ts", "group_id", "outcome", "detail", "hash"} <= set(entries[0])
        as_csv = client.get("/ui/audit", params={"group": "global", "format": "csv"})
        assert as_csv.text.splitlines()[0].startswith("id,ts,actor")
        everything = client.get("/ui/audit").text
        assert "verified" in everything and "ui.signin" in everything


@pytest.fixture
def short_lived(tmp_path: Path) -> Iterator[RunningConsole]:
    with short_sessions(tmp_path) as running:
        yield running


def test_an_idle_session_expires(short_lived: RunningConsole) -> None:
    who = web_admin(short_lived, "superadmin", "global")
    with sign_in(short_lived, who) as client:
        assert client.get("/ui/").status_code == 200
        time.sleep(3)  # beyond the 2 s idle timeout
        assert client.get("/ui/").headers.get("location") == "/ui/login"
        assert client.post("/ui/logout", data={"csrf": "x"}).status_code == 401


def test_a_new_api_key_is_shown_once_and_works(console: RunningConsole) -> None:
    who = web_admin(console, "superadmin", "global")
    with sign_in(console, who) as client:
        page = client.get("/ui/admins")
        assert page.status_code == 200 and who.username in page.text
        admin_id = console.admins[who.username].id
        shown = client.post(f"/ui/admins/{admin_id}/api-keys", data={"csrf": csrf_of(page)})
        token = shown.text.split('id="new-key">')[1].split("<")[0]
        assert token.startswith("cgk_")
        assert token not in client.get("/ui/admins").text
    creds = console.admins[who.username]
    with console.client(creds, api_key=token) as api:
        assert api.get("/api/v1/groups").status_code == 200


def test_the_rules_editor_shows_the_dry_run_before_saving(console: RunningConsole) -> None:
    with console.local() as (session, pki):
        if session.get(Group, "rules") is None:
            groups.create_group(session, pki, "rules", "rules", "global")
    who = web_admin(console, "device-admin", "rules")
    rules = {
        "server_rules": {"default": "deny", "rules": [{"action": "allow", "cidrs": ["10.0.0.0/8"]}]}
    }
    with sign_in(console, who) as client:
        page = client.get("/ui/groups/rules")
        assert page.status_code == 200 and "Preview (dry-run)" in page.text
        form = {"csrf": csrf_of(page), "settings": json.dumps(rules)}
        preview = client.post("/ui/groups/rules/settings", data=form)
        assert preview.status_code == 200 and "Who would lose access" in preview.text
        with console.local() as (session, _):
            assert session.get(Group, "rules").settings.get("server_rules") != rules["server_rules"]
        saved = client.post("/ui/groups/rules/settings", data={**form, "confirm": "yes"})
        assert saved.status_code == 200 and "Saved." in saved.text
        bad = client.post("/ui/groups/rules/settings", data={**form, "settings": "{not json"})
        assert bad.status_code == 400 and "settings:" in bad.text
        wider = client.post(
            "/ui/groups/rules/settings",
            data={**form, "settings": json.dumps({"feed": {"long_poll_s": 5}})},
        )
        assert wider.status_code == 403  # device-admin holds rules:write, not groups:write
    with console.local() as (session, _):
        assert session.get(Group, "rules").settings["server_rules"] == rules["server_rules"]
    assert any(e.detail.get("via") == "ui" for e in _audit(console, "group.settings"))
    assert _audit(console, "group.settings.dry_run")


def test_the_installer_downloads_for_tunnel_setup_admins_only(console: RunningConsole) -> None:
    setup = web_admin(console, "tunnel-setup", "global")
    with sign_in(console, setup) as client:
        page = client.get("/ui/nodes")
        assert "Download the installer for global" in page.text
        archive = client.post("/ui/groups/global/installer", data={"csrf": csrf_of(page)})
        assert archive.status_code == 200
        assert archive.headers["content-type"] == "application/gzip"
        with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
            assert {"manifest.jws", "install-token"} <= set(tar.getnames())
    reader = web_admin(console, "read-only", "global")
    with sign_in(console, reader) as client:
        page = client.get("/ui/nodes")
        assert "Download the installer" not in page.text
        refused = client.post("/ui/groups/global/installer", data={"csrf": csrf_of(page)})
        assert refused.status_code == 403
    assert any(e.detail.get("via") == "ui" for e in _audit(console, "tunnel.installer"))


BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def _error_page(answer: httpx.Response, status: int, heading: str) -> None:
    """The error in the console's layout: its status, the message, a link back."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert answer.headers["content-security-policy"].startswith("default-src 'none'")
    assert '<a class="brand" href="/ui/">certgate</a>' in answer.text
    assert '<a href="/ui/">Back to the dashboard</a>' in answer.text
    assert f"<h1>{heading}</h1>" in answer.text


def _json_error(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"] == code


def test_a_browser_gets_errors_as_pages_and_the_api_keeps_json(console: RunningConsole) -> None:
    who = web_admin(console, "superadmin", "global")
    too_big = b"x" * (1024 * 1024 + 1)  # over the console's max_body_bytes
    form = {"content-type": "application/x-www-form-urlencoded"}
    with sign_in(console, who) as client:
        client.headers["accept"] = BROWSER_ACCEPT
        missing = client.get("/ui/devices/" + "0" * 32)
        _error_page(missing, 404, "Not found")
        assert f"{'0' * 32}&#39; not found</p>" in missing.text  # the message, escaped
        _error_page(client.get("/ui/no/such/page"), 404, "Not found")
        stolen = {"csrf": "0" * 64}  # not this session's token
        _error_page(client.post("/ui/logout", data=stolen), 403, "Csrf failed")
        wrong_method = client.put("/ui/login")
        _error_page(wrong_method, 405, "Method not allowed")
        assert wrong_method.headers["allow"] == "GET, POST"
        _error_page(client.post("/ui/login", content=too_big, headers=form), 413, "Too large")
        _error_page(client.get("/no/such/page"), 404, "Not found")  # a wrong address
        # The API answers JSON to a browser too; elsewhere only a browser gets pages.
        _json_error(client.get("/api/v1/no/such/route"), 404, "not_found")
        _json_error(client.post("/api/v1/enroll", content=too_big), 413, "too_large")
        _json_error(client.get("/api/v1/groups"), 401, "unauthenticated")
        client.headers["accept"] = "*/*"
        _json_error(client.get("/no/such/page"), 404, "not_found")
