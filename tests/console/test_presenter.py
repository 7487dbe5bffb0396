"""Tests for certgate.console.presenter on a real console process (both storage
backends; its own console: the rotation is instance-wide): a Root rotation taken through
prepare, switch and finish by the CLI (another process: it opens the database itself),
never by the console's API. The running console presents what each step calls for within
a bounded wait, with no restart and no renewal tick (an hour by default): after the
switch a client anchored on the new Root alone verifies it, and after finish its chain
ends at the cross certificate the old Root signed for the new one."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from sqlalchemy import select

from certgate.console import local
from certgate.console.presenter import ACTOR, Presenter
from certgate.console.services import ca
from certgate.console.state import ConsoleState
from certgate.console.store.models import AuditEntry
from tests.console.test_cli import succeed
from tests.console.test_renewer import served
from tests.console.test_rotation_root import handshake
from tests.support import RunningConsole, init_console, issued_by

pytestmark = pytest.mark.integration

WAIT_S = 60.0  # generous: the presenter looks every 5 s


def chain_for(console: RunningConsole, anchor: x509.Certificate) -> list[x509.Certificate]:
    """The console's chain once a client anchored on ``anchor`` alone verifies it (bounded
    wait: the step was made by another process)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return handshake(console, anchor)
        except ssl.SSLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_root_rotation_steps_made_by_the_cli_are_presented(console: RunningConsole) -> None:
    data_dir = str(console.data_dir)
    with console.local() as (_, pki):
        old_root = pki.certs[ca.ROOT]
    succeed("rotate", "root", local.TOP_GROUP, "-d", data_dir, "--overlap", "0s")
    succeed("rotate", "switch", "root", local.TOP_GROUP, "-d", data_dir)
    with console.local() as (_, pki):
        new_root = pki.certs[ca.ROOT]
        (cross,) = [c for c in pki.root_crosses() if c.public_key() == new_root.public_key()]
    assert new_root != old_root
    assert chain_for(console, new_root)[-1] == cross  # the switch's chain, for either Root

    succeed("rotate", "finish", "root", local.TOP_GROUP, "-d", data_dir, "--force")
    assert chain_for(console, new_root)[-1] == cross  # the offered cross after finish
    assert handshake(console, old_root)[-1] == cross  # the old Root alone climbs
    with console.local() as (_, pki):
        assert pki.root_crosses() == [cross]


def test_a_rotation_switched_by_another_process_reaches_the_live_tls_within_seconds(
    tmp_path: Path,
) -> None:
    """The CLI (its own connection to the database) switches the Secure Channel Root: the
    console's live TLS context presents a TLS certificate of the new root within seconds
    (a ConsoleState on its own SQLite data directory, with its presenter)."""
    data_dir, _ = init_console(tmp_path)
    state = ConsoleState.open(local.load_config(data_dir))
    presenter = Presenter(state)
    try:
        ctx = state.tls_context()
        root, old_root = state.pki.certs["root"], state.pki.certs["secure-channel-root"]
        assert issued_by(served(ctx, root), old_root)
        presenter.start()
        scr, group = "secure-channel-root", local.TOP_GROUP
        succeed("rotate", scr, group, "-d", str(data_dir), "--overlap", "0s")
        succeed("rotate", "switch", scr, group, "-d", str(data_dir))
        deadline = time.monotonic() + WAIT_S
        while issued_by(served(ctx, root), old_root):
            assert time.monotonic() < deadline, "the live TLS context kept the old root's leaf"
            time.sleep(0.5)
        new_root = state.pki.certs["secure-channel-root"]
        assert new_root != old_root and issued_by(served(ctx, root), new_root)
        with state.db.read_only() as session:
            actions = session.execute(select(AuditEntry.action).where(AuditEntry.actor == ACTOR))
            assert "console.tls.renewed" in actions.scalars().all()
    finally:
        presenter.stop()
        state.db.dispose()
