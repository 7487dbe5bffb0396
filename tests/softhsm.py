"""A throwaway SoftHSM v2 (Debian ``softhsm2``) for the PKCS#11 tests: a real token, in a
temporary directory, never the machine's own.

SoftHSM reads ``SOFTHSM2_CONF`` and lists its tokens once, when a process first loads the
module (C_Initialize), and sees no token created after that. So one instance serves the
whole test process: :func:`shared` sets the variable for the process and creates every
token the tests use up front (``TOKENS``); a console started as a subprocess inherits the
variable and lists the tokens afresh. Deleting a token is seen at once: that is how a test
removes one.
"""

from __future__ import annotations

import atexit
import functools
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from certgate.pki.token import TokenConfig

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN_ENV = "CERTGATE_TEST_TOKEN_PIN"
# One token per purpose: a test that removes its token must not take another test's.
TOKENS = ("authority", "rsa", "failures", "removed", "console", "api", "rotation", "root-rotation")


@dataclass(frozen=True)
class SoftHSM:
    directory: Path
    pin: str

    def config(self, token: str) -> TokenConfig:
        assert token in TOKENS, f"add {token!r} to TOKENS: SoftHSM sees no later token"
        return TokenConfig(MODULE, token, PIN_ENV)

    def delete(self, token: str) -> None:
        self._util("--delete-token", "--token", token)

    def _util(self, *args: str) -> None:
        env = {**os.environ, "SOFTHSM2_CONF": str(self.directory / "softhsm2.conf")}
        subprocess.run(["softhsm2-util", *args], env=env, check=True, capture_output=True)


@functools.cache
def shared() -> SoftHSM:
    if shutil.which("softhsm2-util") is None or not os.path.exists(MODULE):
        pytest.skip("softhsm2 is not installed (make sysdeps installs it)")
    directory = Path(tempfile.mkdtemp(prefix="certgate-softhsm-"))
    atexit.register(shutil.rmtree, directory, True)
    (directory / "tokens").mkdir()
    (directory / "softhsm2.conf").write_text(
        f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\n"
    )
    hsm = SoftHSM(directory, secrets.token_hex(8))
    for label in TOKENS:
        so_pin = secrets.token_hex(8)
        hsm._util("--init-token", "--free", "--label", label, "--pin", hsm.pin, "--so-pin", so_pin)
    os.environ["SOFTHSM2_CONF"] = str(directory / "softhsm2.conf")  # for the whole process
    return hsm


@pytest.fixture
def softhsm(monkeypatch: pytest.MonkeyPatch) -> SoftHSM:
    """The shared SoftHSM, with the user PIN in ``PIN_ENV`` for this test."""
    hsm = shared()
    monkeypatch.setenv(PIN_ENV, hsm.pin)
    return hsm
