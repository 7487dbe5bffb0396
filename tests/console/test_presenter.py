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

import pytest
from cryptography import x509

from certgate.console import local
from certgate.console.services import ca
from tests.console.test_cli import succeed
from tests.console.test_rotation_root import handshake
from tests.support import RunningConsole

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
