"""Web console single sign-on in a real browser against a real OpenID Connect provider.

The provider is certgate's own Access service (``certgate access init`` then ``serve``,
with its cert proxy, ``certgate certproxy serve``): a standard authorization code + PKCE
provider whose user authenticates with the certificate of an enrolled, compliant device.
The console is its relying party (client ``certgate-console``, redirect URI
``<console>/ui/sso/callback``, a public client: Access registers no client secrets), and
maps the ID token's ``preferred_username`` (the device owner) to console admins: alice to
admin ``ops``; bob is no admin. Chromium (Playwright, Debian's build) presents the device
certificate to the cert proxy, from memory (``client_certificates``).

Proven here: the SSO button leads through the provider and lands signed in, audited with
the method and subject; an owner who is no admin is refused and audited; a callback with
a state this browser did not start is refused; a code replayed into a new flow is refused
by the provider and so by the console; the exact callback replayed is refused. A second
console (``require_totp``) asks the admin's TOTP code after the provider: a wrong one is
refused and audited, the right one signs in. A third console is a confidential client
(``certgate-console-sealed``): Access made its secret (``certgate access client-secret``),
piped into ``certgate console sso set-secret``, which sealed it under the console's master
key; with it the admin signs in, with a wrong one sealed instead Access refuses the code
redemption (``invalid_client``) and the console says so and audits it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pyotp
import pytest
from playwright.sync_api import Browser, BrowserContext
from sqlalchemy import select

from certgate.console.services import admins, signin
from certgate.console.store.models import AuditEntry
from certgate.pki.keys import private_key_pem
from certgate.tlsconf import pem_of
from tests.access.harness import PublicPKI
from tests.integration.test_access_haproxy import Device, _enroll, _ok, _wait_listening, _write
from tests.support import CERTGATE, RunningConsole, free_port, init_console, start_console

pytestmark = pytest.mark.integration
CLIENT_ID = "certgate-console"
SEALED_CLIENT_ID = "certgate-console-sealed"  # confidential: its secret sealed by the console
CALLBACK = "/ui/sso/callback"


@dataclass
class SSOSetup:
    console: RunningConsole
    access_port: int
    proxy_port: int
    alice: Device
    bob: Device
    work: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    totp_console: RunningConsole | None = None  # require_totp; alice is its admin ops
    ops_totp: pyotp.TOTP | None = None
    sealed_console: RunningConsole | None = None  # SEALED_CLIENT_ID; alice is its admin ops
    client_secret: str = ""  # the one Access made for SEALED_CLIENT_ID

    def audit(self) -> list[AuditEntry]:
        with self.console.local() as (session, _):
            query = select(AuditEntry).where(AuditEntry.action == "ui.signin")
            return list(session.execute(query.order_by(AuditEntry.id)).scalars())


def _configure_sso(
    data_dir: Path, issuer: str, ca_file: Path, totp: bool = False, sealed: bool = False
) -> None:
    settings = data_dir / "console.json"
    config = json.loads(settings.read_text())
    config["sso"] = {
        "require_totp": totp,
        "issuer": issuer,
        "client_id": SEALED_CLIENT_ID if sealed else CLIENT_ID,
        "client_secret_sealed": sealed,
        "admin_claim": "preferred_username",
        "admins": {"alice": "ops"},
        "ca_file": str(ca_file),
        "scope": "openid",
        "label": "certgate Access",
    }
    settings.write_text(json.dumps(config))


def _start(setup: SSOSetup, name: str, args: list[str], port: int) -> None:
    log = setup.work / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    setup.procs.append(proc)
    _wait_listening(port, proc, name, log)


def _access_init(setup: SSOSetup, public: PublicPKI, access_admin: dict[str, str]) -> None:
    w, leaf = setup.work, public.leaf
    consoles = [setup.console, *([setup.totp_console] if setup.totp_console else [])]
    clients = [arg for c in consoles for arg in ("--client", f"{CLIENT_ID}={c.url}{CALLBACK}")]
    if setup.sealed_console is not None:
        clients += ["--client", f"{SEALED_CLIENT_ID}={setup.sealed_console.url}{CALLBACK}"]
    args = [
        *CERTGATE, "access", "init", "-d", str(w / "access"),
        "--issuer", f"https://127.0.0.1:{setup.access_port}",
        "--console-url", setup.console.url,
        "--console-chain", str(setup.console.chain_path),
        "--console-cert", str(_write(w / "admin.pem", access_admin["certificate"].encode())),
        "--console-key",
        str(_write(w / "admin.key", access_admin["private_key"].encode(), 0o600)),
        "--console-api-key-file",
        str(_write(w / "api-key", access_admin["api_key"].encode(), 0o600)),
        "--public-cert", str(_write(w / "public.pem", pem_of([leaf.cert, *leaf.chain]))),
        "--public-key", str(_write(w / "public.key", private_key_pem(leaf.key), 0o600)),
        *clients,
        "--mode", "passthrough",
        "--certproxy-url", f"https://127.0.0.1:{setup.proxy_port}",
        "--port", str(setup.access_port),
        "--dns-name", "localhost", "--ip-address", "127.0.0.1",
    ]  # fmt: skip
    result = subprocess.run(args, capture_output=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def _populate(console: RunningConsole) -> dict[str, str]:
    """Admins ops (alice's) and root, group android, enrollment users alice and bob; the
    answer is Access's console credential (role ``access``)."""
    console.make_admin("root", "superadmin", "global")
    console.make_admin("ops", "superadmin", "global")
    with console.client(console.admins["root"]) as admin:
        _ok(admin.post("/api/v1/groups", json={"id": "android", "parent_id": "global"}), 201)
        for user in ("alice", "bob"):
            body = {"username": user, "password": f"{user}-password"}
            _ok(admin.post("/api/v1/groups/android/enrollment-users", json=body), 201)
        body = {"username": "access-svc", "role": "access", "group_id": "global"}
        created: dict[str, str] = _ok(admin.post("/api/v1/admins", json=body), 201)
    return created


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSOSetup]:
    work = tmp_path_factory.mktemp("web-sso")
    public = PublicPKI.create(("localhost",))
    ca_file = _write(work / "provider-root.pem", pem_of([public.root.cert]))
    access_port, proxy_port = free_port(), free_port()
    issuer = f"https://127.0.0.1:{access_port}"
    data_dir, port = init_console(work)
    _configure_sso(data_dir, issuer, ca_file)
    console = start_console(work, data_dir, port)
    second = work / "second"
    second.mkdir()
    data_dir2, port2 = init_console(second)
    _configure_sso(data_dir2, issuer, ca_file, totp=True)
    totp_console = start_console(second, data_dir2, port2)
    third = work / "third"
    third.mkdir()
    data_dir3, port3 = init_console(third)
    _configure_sso(data_dir3, issuer, ca_file, sealed=True)
    sealed_console = start_console(third, data_dir3, port3)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        access_admin = _populate(console)
        alice = _enroll(console, "compliant", user="alice")
        bob = _enroll(console, "compliant", user="bob")
        running = SSOSetup(console, access_port, proxy_port, alice, bob, work, procs)
        running.totp_console, running.ops_totp = totp_console, _totp_admin(totp_console)
        running.sealed_console = sealed_console
        sealed_console.make_admin("ops", "superadmin", "global")
        _access_init(running, public, access_admin)
        running.client_secret = _confidential_client(running)
        data = ["-d", str(work / "access")]
        _start(running, "access", [*CERTGATE, "access", "serve", *data], access_port)
        proxy = [*CERTGATE, "certproxy", "serve", *data, "--port", str(proxy_port)]
        _start(running, "certproxy", proxy, proxy_port)
        yield running
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=20)
        console.stop()
        totp_console.stop()
        sealed_console.stop()


def _confidential_client(setup: SSOSetup) -> str:
    """Access makes SEALED_CLIENT_ID confidential (before it starts) and prints its secret,
    piped into the sealed console's ``sso set-secret``; answers the secret."""
    made = subprocess.run(
        [*CERTGATE, "access", "client-secret", "-d", str(setup.work / "access"), SEALED_CLIENT_ID],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr.decode()
    secret = made.stdout.decode().strip()
    _seal_client_secret(setup, secret.encode() + b"\n")
    return secret


def _seal_client_secret(setup: SSOSetup, secret: bytes) -> None:
    assert setup.sealed_console is not None
    data_dir = str(setup.sealed_console.data_dir)
    sealed = subprocess.run(
        [*CERTGATE, "console", "sso", "set-secret", "-d", data_dir],
        input=secret, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert sealed.returncode == 0, sealed.stderr.decode()


def _totp_admin(console: RunningConsole) -> pyotp.TOTP:
    """Admin ops of ``console`` with a TOTP factor (no password: SSO is its first factor)."""
    console.make_admin("ops", "superadmin", "global")
    with console.local() as (session, pki):
        uri = signin.new_totp(session, pki.master, admins.by_username(session, "ops"))
    return pyotp.TOTP(parse_qs(urlsplit(uri).query)["secret"][0])


def _device_browser(browser: Browser, setup: SSOSetup, device: Device) -> BrowserContext:
    """A browser holding ``device``'s certificate for the cert proxy only (from memory)."""
    leaf = device.leaf
    certificate = {
        "origin": f"https://127.0.0.1:{setup.proxy_port}",
        "cert": pem_of([leaf.cert, *leaf.chain]),
        "key": private_key_pem(leaf.key),
    }
    return browser.new_context(ignore_https_errors=True, client_certificates=[certificate])  # type: ignore[list-item]


def _sso_sign_in(context: BrowserContext, setup: SSOSetup) -> list[str]:
    """Click the SSO button on the sign-in page; answers the callback URLs the browser
    was sent to."""
    callbacks: list[str] = []
    page = context.new_page()
    page.on("request", lambda r: callbacks.append(r.url) if "/ui/sso/callback" in r.url else None)
    page.goto(f"{setup.console.url}/ui/login")
    page.click("#sso")
    page.wait_for_load_state("load")
    return callbacks


def test_the_sso_button_leads_through_the_provider_and_lands_signed_in(
    setup: SSOSetup, chromium: Browser, tmp_path: Path
) -> None:
    context = _device_browser(chromium, setup, setup.alice)
    callbacks = _sso_sign_in(context, setup)
    page = context.pages[0]
    page.wait_for_url(f"{setup.console.url}/ui/")
    assert page.locator(".me").inner_text() == "ops"
    page.screenshot(path=tmp_path / "sso-signed-in.png", full_page=True)
    assert len(callbacks) == 1 and parse_qs(urlsplit(callbacks[0]).query)["code"]
    cookies = {c["name"]: c for c in context.cookies()}
    session = cookies["__Host-certgate-session"]
    assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Strict"
    assert "__Secure-certgate-sso" not in cookies  # the flow is spent
    signed_in = [e for e in setup.audit() if e.actor == "admin:ops" and e.outcome == "ok"]
    assert signed_in[-1].detail == {"client": "127.0.0.1", "method": "sso", "subject": "alice"}
    context.close()


def test_an_owner_who_is_no_admin_is_refused_and_audited(
    setup: SSOSetup, chromium: Browser, tmp_path: Path
) -> None:
    context = _device_browser(chromium, setup, setup.bob)
    _sso_sign_in(context, setup)
    page = context.pages[0]
    assert "/ui/sso/callback" in page.url
    assert (
        "'bob' (preferred_username) is not a console admin" in page.locator(".error").inner_text()
    )
    page.screenshot(path=tmp_path / "sso-refused.png", full_page=True)
    assert "__Host-certgate-session" not in {c["name"] for c in context.cookies()}
    assert page.goto(f"{setup.console.url}/ui/devices") is not None
    assert page.url.endswith("/ui/login")
    denied = setup.audit()[-1]
    assert denied.outcome == "denied" and denied.detail["method"] == "sso"
    assert "'bob'" in denied.detail["reason"]
    context.close()


def _start_flow(context: BrowserContext, setup: SSOSetup) -> str:
    """A new flow in this browser (its cookie set), not followed: answers its state."""
    answer = context.request.get(f"{setup.console.url}/ui/sso/start", max_redirects=0)
    assert answer.status == 303, answer.text()
    return parse_qs(urlsplit(answer.headers["location"]).query)["state"][0]


def _callback(setup: SSOSetup, code: str, state: str) -> str:
    return f"{setup.console.url}/ui/sso/callback?" + urlencode({"code": code, "state": state})


def test_a_state_this_browser_did_not_start_is_refused(setup: SSOSetup, chromium: Browser) -> None:
    context = _device_browser(chromium, setup, setup.alice)
    state = _start_flow(context, setup)
    page = context.new_page()
    answer = page.goto(_callback(setup, "some-code", state[::-1]))
    assert answer is not None and answer.status == 401
    assert "state does not match" in page.locator(".error").inner_text()
    denied = setup.audit()[-1]
    assert denied.outcome == "denied" and "state does not match" in denied.detail["reason"]
    state = _start_flow(context, setup)  # the state right, the issuer another (RFC 9207)
    mixed_up = page.goto(_callback(setup, "some-code", state) + "&iss=https%3A%2F%2Fevil.test")
    assert mixed_up is not None and mixed_up.status == 401
    assert "names another issuer" in page.locator(".error").inner_text()
    assert "__Host-certgate-session" not in {c["name"] for c in context.cookies()}
    context.close()


def test_a_replayed_code_is_refused(setup: SSOSetup, chromium: Browser) -> None:
    context = _device_browser(chromium, setup, setup.alice)
    callbacks = _sso_sign_in(context, setup)
    context.pages[0].wait_for_url(f"{setup.console.url}/ui/")
    spent = parse_qs(urlsplit(callbacks[0]).query)["code"][0]
    context.clear_cookies()
    page = context.new_page()
    again = page.goto(callbacks[0])  # the same answer again: no flow of this browser
    assert again is not None and again.status == 401
    assert "no single sign-on in progress" in page.locator(".error").inner_text()
    state = _start_flow(context, setup)  # a new flow: the state matches, the code is spent
    replayed = page.goto(_callback(setup, spent, state))
    assert replayed is not None and replayed.status == 401
    assert "provider refused the code" in page.locator(".error").inner_text()
    assert "__Host-certgate-session" not in {c["name"] for c in context.cookies()}
    reasons = [e.detail.get("reason", "") for e in setup.audit()[-2:]]
    assert "no single sign-on in progress" in reasons[0]
    assert "provider refused the code" in reasons[1]
    assert spent not in setup.console.log()  # the access log shows no code
    assert "/ui/sso/callback?<redacted>" in setup.console.log()
    context.close()


def test_a_console_that_also_wants_totp_asks_for_it_after_the_provider(
    setup: SSOSetup, chromium: Browser, tmp_path: Path
) -> None:
    console, totp = setup.totp_console, setup.ops_totp
    assert console is not None and totp is not None
    context = _device_browser(chromium, setup, setup.alice)
    page = context.new_page()
    page.goto(f"{console.url}/ui/login")
    page.click("#sso")
    page.wait_for_load_state("load")
    assert "Second factor" in page.locator("h1").inner_text()
    assert "__Host-certgate-session" not in {c["name"] for c in context.cookies()}
    page.screenshot(path=tmp_path / "sso-totp.png", full_page=True)
    page.fill("input[name=code]", f"{(int(totp.now()) + 1) % 10**6:06d}")
    page.click("button[type=submit]")
    assert "wrong username, password or code" in page.locator(".error").inner_text()
    page.fill("input[name=code]", totp.now())
    page.click("button[type=submit]")
    page.wait_for_url(f"{console.url}/ui/")
    assert page.locator(".me").inner_text() == "ops"
    with console.local() as (session, _):
        rows = session.execute(
            select(AuditEntry).where(AuditEntry.action == "ui.signin").order_by(AuditEntry.id)
        ).scalars()
        outcomes = [(e.outcome, e.detail.get("method")) for e in rows]
    assert outcomes[-2:] == [("denied", "sso"), ("ok", "sso")]
    context.close()


def test_a_confidential_client_whose_secret_is_sealed_signs_in(
    setup: SSOSetup, chromium: Browser, tmp_path: Path
) -> None:
    console, secret = setup.sealed_console, setup.client_secret
    assert console is not None and secret
    sealed_file = console.data_dir / "sso-client-secret.sealed"
    assert secret.encode() not in sealed_file.read_bytes()
    context = _device_browser(chromium, setup, setup.alice)
    page = context.new_page()
    page.goto(f"{console.url}/ui/login")
    page.click("#sso")
    page.wait_for_url(f"{console.url}/ui/")
    assert page.locator(".me").inner_text() == "ops"
    page.screenshot(path=tmp_path / "sso-sealed-signed-in.png", full_page=True)
    context.close()
    access_log = (setup.work / "access.log").read_text(errors="replace")
    assert "issued ID token" in access_log and f"to client {SEALED_CLIENT_ID}" in access_log
    assert secret not in console.log() and secret not in access_log


def test_a_wrong_sealed_secret_is_refused_by_the_provider(
    setup: SSOSetup, chromium: Browser
) -> None:
    console = setup.sealed_console
    assert console is not None
    _seal_client_secret(setup, b"not-the-secret-access-made")
    try:
        context = _device_browser(chromium, setup, setup.alice)
        page = context.new_page()
        page.goto(f"{console.url}/ui/login")
        page.click("#sso")
        page.wait_for_load_state("load")
        assert "/ui/sso/callback" in page.url
        error = page.locator(".error").inner_text()
        assert "provider refused the code" in error and "wrong client secret" in error
        assert "__Host-certgate-session" not in {c["name"] for c in context.cookies()}
        context.close()
    finally:
        _seal_client_secret(setup, setup.client_secret.encode())
    with console.local() as (session, _):
        query = select(AuditEntry).where(AuditEntry.action == "ui.signin")
        denied = session.execute(query.order_by(AuditEntry.id.desc()).limit(1)).scalar_one()
        assert denied.outcome == "denied" and "wrong client secret" in denied.detail["reason"]
    access_log = (setup.work / "access.log").read_text(errors="replace")
    assert "invalid_client (wrong client secret)" in access_log
