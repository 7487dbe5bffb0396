"""Tests for certgate.access.app's console channel (``ConsoleTransport``): after a Root
rotation it trusts exactly the console Roots taken, so a retired Root no longer verifies
the console. Real TLS: ``openssl s_server`` plays two consoles, one whose certificate
chains to the Root pinned at install, one to a new Root."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from certgate.access.app import ConsoleTransport
from certgate.pki.authority import Issuer, Names
from certgate.pki.profiles import CONSOLE_TLS
from tests.access.harness import ConsolePKI, PublicPKI, install_request, installed, issue, new_root
from tests.integration.cluster import stop_process
from tests.support import free_port, wait_for_tls_port

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed (make sysdeps)")


@contextlib.contextmanager
def console_stand_in(root: Issuer, work: Path) -> Iterator[str]:
    """``openssl s_server -www`` on loopback with a certificate issued by ``root``; yields
    its URL."""
    assert OPENSSL is not None
    names = Names("console", ip_addresses=("127.0.0.1",))
    cert, key = issue(root, CONSOLE_TLS, names).write(work, f"console-{free_port()}")
    port = free_port()
    command = [OPENSSL, "s_server", "-www", "-accept", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [*command, "-cert", str(cert), "-key", str(key)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_tls_port(port, proc, 30)
        yield f"https://127.0.0.1:{port}/"
    finally:
        stop_process(proc)


async def status_of(client: httpx.AsyncClient, url: str) -> int | str:
    """The answer's status, or the connection error's kind."""
    try:
        return (await client.get(url)).status_code
    except httpx.ConnectError as exc:
        return "certificate verify failed" if "CERTIFICATE_VERIFY" in str(exc) else str(exc)


def test_the_console_channel_trusts_exactly_the_roots_it_is_told(tmp_path: Path) -> None:
    console, successor = ConsolePKI(), new_root("certgate Root CA")
    material = installed(tmp_path / "access", install_request(console, PublicPKI.create())).material
    with (
        console_stand_in(console.root, tmp_path) as old_console,
        console_stand_in(successor, tmp_path) as new_console,
    ):

        async def scenario() -> list[int | str]:
            transport, seen = ConsoleTransport(material), []
            async with httpx.AsyncClient(transport=transport, timeout=10) as client:
                for roots in (None, (successor.cert, console.root.cert), (successor.cert,)):
                    if roots is not None:
                        transport.trust(roots)  # as TrustFollower does on a Root step
                    seen += [await status_of(client, old_console)]
                    seen += [await status_of(client, new_console)]
            return seen

        refused = "certificate verify failed"
        # At install: the pinned Root only. During the rotation: both. After finish: the
        # new Root alone, the old one dropped although it was pinned at install.
        assert asyncio.run(scenario()) == [200, refused, 200, 200, refused, 200]
