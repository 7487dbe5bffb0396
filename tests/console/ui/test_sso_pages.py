"""Single sign-on pages of a real console whose provider cannot be reached, and of one
without single sign-on: what a browser gets before any provider answers. The flow through
a real provider: tests/integration/test_web_sso.py."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from certgate.console.config import SSO_SECRET_FILE
from certgate.console.sso_secret import SealedSecret
from certgate.console.store.models import AuditEntry
from certgate.pki.keystore import ENV_VAR, MasterKey
from tests.console.ui.support import browser
from tests.support import CERTGATE, RunningConsole, free_port, init_console, start_console


def _unreachable_console(work: Path, **sso: Any) -> Iterator[RunningConsole]:
    """A console whose provider is a loopback port nobody listens on."""
    data_dir, port = init_console(work)
    settings = data_dir / "console.json"
    config = json.loads(settings.read_text())
    config["sso"] = {
        "issuer": f"https://127.0.0.1:{free_port()}",
        "client_id": "certgate-console",
        "admins": {"alice@example.com": "root"},
        "label": "Example IdP",
        **sso,
    }
    settings.write_text(json.dumps(config))
    running = start_console(work, data_dir, port)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def unreachable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningConsole]:
    yield from _unreachable_console(tmp_path_factory.mktemp("sso-unreachable"))


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningConsole]:
    """Likewise, a confidential client whose secret is the sealed file of its data dir."""
    work = tmp_path_factory.mktemp("sso-sealed")
    yield from _unreachable_console(work, client_secret_sealed=True)


def _last_signin(console: RunningConsole) -> AuditEntry:
    with console.local() as (session, _):
        query = select(AuditEntry).where(AuditEntry.action == "ui.signin")
        entry = session.execute(query.order_by(AuditEntry.id.desc()).limit(1)).scalar_one()
        session.expunge(entry)
    return entry


def test_the_sign_in_page_offers_sso_only_when_configured(
    unreachable: RunningConsole, console: RunningConsole
) -> None:
    with browser(unreachable) as client:
        page = client.get("/ui/login")
    assert 'id="sso" href="/ui/sso/start">Sign in with Example IdP</a>' in page.text
    with browser(console) as client:
        plain = client.get("/ui/login")
        assert 'id="sso"' not in plain.text
        assert client.get("/ui/sso/start").status_code == 404


def test_an_unreachable_provider_is_a_503_page_and_audited(unreachable: RunningConsole) -> None:
    with browser(unreachable) as client:
        answer = client.get("/ui/sso/start")
    assert answer.status_code == 503
    assert "Single sign-on refused: identity provider unreachable" in answer.text
    assert answer.headers["set-cookie"].startswith('__Secure-certgate-sso=""')  # no flow
    assert "Max-Age=0" in answer.headers["set-cookie"]
    with unreachable.local() as (session, _):
        entry = (
            session.execute(
                select(AuditEntry).where(AuditEntry.action == "ui.signin").order_by(AuditEntry.id)
            )
            .scalars()
            .all()[-1]
        )
    assert entry.outcome == "denied" and entry.detail["code"] == "unavailable"


def test_a_callback_without_a_flow_is_refused_and_audited(unreachable: RunningConsole) -> None:
    with browser(unreachable) as client:
        answer = client.get("/ui/sso/callback", params={"code": "c", "state": "s"})
    assert answer.status_code == 401
    assert "no single sign-on in progress in this browser" in answer.text
    with unreachable.local() as (session, _):
        entry = (
            session.execute(
                select(AuditEntry).where(AuditEntry.action == "ui.signin").order_by(AuditEntry.id)
            )
            .scalars()
            .all()[-1]
        )
    assert entry.detail["method"] == "sso" and entry.detail["code"] == "unauthenticated"


def test_the_settings_file_with_a_client_secret_does_not_start(tmp_path: Path) -> None:
    data_dir, port = init_console(tmp_path)
    settings = data_dir / "console.json"
    config = json.loads(settings.read_text())
    config["sso"] = {"issuer": "https://idp.test", "client_id": "c", "admins": {"a": "root"},
                     "client_secret": "in clear"}  # fmt: skip
    settings.write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="must not be in console"):
        start_console(tmp_path, data_dir, port)


def _start_refused(console: RunningConsole, reason: str) -> None:
    """/ui/sso/start answers the provider unavailable (503) for ``reason``, audited."""
    with browser(console) as client:
        answer = client.get("/ui/sso/start")
    assert answer.status_code == 503, answer.text
    assert "Single sign-on refused: " in answer.text and reason in answer.text
    entry = _last_signin(console)
    assert entry.outcome == "denied" and entry.detail["code"] == "unavailable"
    assert reason in entry.detail["reason"]


def test_a_sealed_secret_missing_or_not_opening_makes_the_provider_unavailable(
    sealed: RunningConsole,
) -> None:
    path = sealed.data_dir / SSO_SECRET_FILE
    _start_refused(sealed, f"single sign-on client secret: sealed SSO client secret {path} is "
                           "missing: run `certgate console sso set-secret`")  # fmt: skip
    SealedSecret(path, MasterKey(os.urandom(32))).write("sealed by another console")
    _start_refused(sealed, "wrong master key or tampered data")
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    set_secret = [*CERTGATE, "console", "sso", "set-secret", "-d", str(sealed.data_dir)]
    done = subprocess.run(set_secret, input=b"the-client-secret\n", env=env, timeout=60,
                          capture_output=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x01
    path.write_bytes(bytes(blob))
    _start_refused(sealed, "wrong master key or tampered data")
    done = subprocess.run(set_secret, input=b"the-client-secret\n", env=env, timeout=60,
                          capture_output=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The secret opens: the refusal is now the provider's (nobody listens), not the secret's.
    _start_refused(sealed, "identity provider unreachable")
    assert "the-client-secret" not in sealed.log()
