"""Tests for certgate.console.renewer and the console's /healthz certificates: renewal
before expiry inside the console, on a real console's database (both backends). The
renewer runs at a moved clock; the console TLS certificate it renews is loaded into the
live listener context, shown by real handshakes on a socket pair."""

from __future__ import annotations

import socket
import ssl
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import select

from certgate.console import local
from certgate.console.config import ConsoleConfig
from certgate.console.renewer import ACTOR, Renewer
from certgate.console.state import ConsoleState
from certgate.console.store.models import AuditEntry
from certgate.errors import ConfigError
from certgate.pki.profiles import RENEWAL_WINDOW
from tests.support import RunningConsole
from tests.tunnel.conftest import COMPLIANT, create_group

pytestmark = pytest.mark.integration  # a real console process

HANDSHAKE_TIMEOUT_S = 30


def served(ctx: ssl.SSLContext, root: x509.Certificate) -> x509.Certificate:
    """The certificate a new connection to a listener of ``ctx`` is shown."""
    client = ssl.create_default_context(cadata=root.public_bytes(Encoding.PEM).decode())
    client.check_hostname = False
    near, far = socket.socketpair()
    near.settimeout(HANDSHAKE_TIMEOUT_S)
    far.settimeout(HANDSHAKE_TIMEOUT_S)

    def serve() -> None:
        try:
            with ctx.wrap_socket(far, server_side=True) as tls:
                tls.sendall(b"x")
        except (ssl.SSLError, OSError):
            pass

    server = threading.Thread(target=serve)
    server.start()
    with client.wrap_socket(near) as tls:
        der = tls.getpeercert(binary_form=True)
        tls.recv(1)
    server.join(HANDSHAKE_TIMEOUT_S)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def audit_actions(console: RunningConsole) -> list[str]:
    """The actions the renewer audited (read from the console's database)."""
    with console.local() as (session, _):
        rows = session.execute(select(AuditEntry).where(AuditEntry.actor == ACTOR)).scalars()
        return [row.action for row in rows]


def test_the_renewer_renews_the_console_tls_and_the_group_identities_when_due(
    console: RunningConsole,
) -> None:
    group = create_group(console, COMPLIANT)
    state = ConsoleState.open(local.load_config(console.data_dir))
    try:
        ctx = state.tls_context()
        root = state.pki.certs["root"]
        first = served(ctx, root)
        renewer = Renewer(state, 3600)
        assert renewer.renew_once() == []  # fresh certificates: nothing due
        assert served(ctx, root) == first

        late = first.not_valid_after_utc - RENEWAL_WINDOW + timedelta(days=1)
        renewed = renewer.renew_once(late)
        assert "console TLS certificate" in renewed
        second = served(ctx, root)  # the live context, renewed in place
        # A new certificate (new serial); its expiry may fall in the same second as
        # the first one's when the console issued that one a moment ago.
        assert second.serial_number != first.serial_number
        assert second.not_valid_after_utc >= first.not_valid_after_utc

        much_later = late + timedelta(days=2 * 365)  # the group identities are due too
        renewed = renewer.renew_once(much_later)
        assert f"tunnel-identity of group {group} (switched)" in renewed
        assert f"console-identity of group {group} (switched)" in renewed
    finally:
        state.db.dispose()
    actions = audit_actions(console)
    assert "console.tls.renewed" in actions and "rotation.renewal" in actions


def test_healthz_lists_the_certificates_in_use_and_warns_within_the_window(
    console: RunningConsole,
) -> None:
    with console.client() as client:
        health = client.get("/healthz").json()
    names = {c["name"] for c in health["certificates"]}
    assert {"console-tls", "root", "device-root", "secure-channel-root", "admin-ca"} <= names
    assert not any(c["renewal_due"] for c in health["certificates"])
    assert health["warnings"] == []
    state = ConsoleState.open(local.load_config(console.data_dir))
    try:
        state.tls_context()
        assert state.tls_cert is not None
        late = state.tls_cert.not_valid_after_utc - timedelta(days=3)
        due = {c.name: c for c in state.certificates_in_use(late.timestamp())}
        assert due["console-tls"].renewal_due and not due["root"].renewal_due
    finally:
        state.db.dispose()


def test_the_renewal_interval_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="renewal interval"):
        ConsoleConfig(data_dir=tmp_path, db_url="sqlite:///x.db", renew_interval_s=5)
    off = ConsoleConfig(data_dir=tmp_path, db_url="sqlite:///x.db", renew_interval_s=0)
    assert off.renew_interval_s == 0
