"""The web console's SSO client secret, sealed under the console's master key.

``certgate console sso set-secret`` seals the secret (AES-GCM, ``keystore.MasterKey``)
into ``sso-client-secret.sealed`` in the data directory, owner only; a console whose
``console.json`` says ``"sso": {..., "client_secret_sealed": true}`` opens it when it
talks to the provider. Nothing of the secret is in clear on disk, and a copy of the file
is worthless without the master key.

The core (``checked``, ``seal``, ``unseal``) is pure; :class:`SealedSecret` is the thin
file shell the CLI and the console share.
"""

from __future__ import annotations

import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from certgate.errors import ConfigError, KeystoreError
from certgate.pki.keystore import MasterKey
from certgate.tunnel.persist import atomic_write

__all__ = ["LABEL", "MAX_BYTES", "SealedSecret", "checked", "seal", "unseal"]

# The sealed blob's associated data: a blob sealed for another purpose does not open here.
LABEL = "console sso client secret"
MAX_BYTES = 1024  # a provider's client secret is tens of bytes; more is a pasting mistake


def checked(value: str) -> str:
    """``value`` if it can be a client secret; ValueError saying why not. Control
    characters would break the token request's Basic header (RFC 6749 §2.3.1) and are a
    sign of a pasted line ending or terminal escape."""
    if not value:
        raise ValueError("the client secret is empty")
    if len(value.encode()) > MAX_BYTES:
        raise ValueError(f"the client secret is over {MAX_BYTES} bytes")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("the client secret contains control characters")
    return value


def seal(master: MasterKey, value: str) -> bytes:
    return master.seal_bytes(checked(value).encode(), LABEL)


def unseal(master: MasterKey, blob: bytes) -> str:
    """The secret ``seal`` made; KeystoreError for another key, a tampered or foreign blob."""
    try:
        return checked(master.unseal_bytes(blob, LABEL).decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise KeystoreError(f"sealed SSO client secret is not a client secret: {exc}") from exc


@dataclass(frozen=True, slots=True)
class SealedSecret:
    """The sealed file of one data directory and the master key that opens it."""

    path: Path
    master: MasterKey

    def write(self, value: str) -> None:
        """Seal and replace atomically (a reader sees the old file or the new), mode 0600."""
        atomic_write(self.path, seal(self.master, value), mode=0o600)

    def remove(self) -> bool:
        """Delete the file; False when there was none."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True

    def read(self) -> str:
        """The secret; ConfigError naming the file and the reason when it cannot be had."""
        try:
            mode = stat.S_IMODE(self.path.stat().st_mode)
            if mode & 0o077:
                raise ConfigError(
                    f"sealed SSO client secret {self.path} has mode {mode:04o}: chmod 600 it"
                )
            return unseal(self.master, self.path.read_bytes())
        except FileNotFoundError as exc:
            raise ConfigError(
                f"sealed SSO client secret {self.path} is missing: "
                "run `certgate console sso set-secret`"
            ) from exc
        except (OSError, KeystoreError) as exc:
            raise ConfigError(f"sealed SSO client secret {self.path}: {exc}") from exc
