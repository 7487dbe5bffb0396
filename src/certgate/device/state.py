"""The device's state directory: enrollment, credential, keys and certificates on disk.

Layout, under one directory of mode 0700, every file mode 0600::

    node.key                 this device's node key, unless ``$CERTGATE_DEVICE_NODE_KEY``
                             gives it: the secrets below are sealed under it
    enrollment.json          console URL, DeviceUid, group, platform (no secret)
    credential               the device credential (sealed), sent as ``Authorization: Bearer``
    console-ca.pem           the console's root, pinned at enrollment
    device.sealed            Per-App Tunnel identity (sealed): certificate, chain, key
    profile.json             the last profile: version, tunnel endpoints, trust, rules,
                             and the group policy version its rules and endpoints are of
    apps/<bundle>/identity.sealed   Proxy-mode identity of one app (sealed)
    apps/<bundle>/cert.pem          its certificate and chain, for curl and browsers
    apps/<bundle>/{key.pem,identity.p12}   exports of its key under an export password
                             (an encrypted PKCS#8 PEM and a PKCS#12), written only with one
    agent.json               a running agent's pid and listeners (for ``device exec``)

Writes are atomic (temporary file in the same directory, fsync, rename, fsync of the
directory): a crash leaves the old file or the new one, never a torn one. Certificate and
key share one file, so a replaced identity can never pair a new certificate with an old
key. Private keys are generated here and are never on disk in clear: sealed with the one
keystore primitive (``certgate.pki.keystore``), or exported under a password.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    KeySerializationEncryption,
    pkcs12,
)

from certgate.errors import ConfigError, PKIError
from certgate.pki.identity import BUNDLE_ID_RE
from certgate.pki.keys import PrivateKey, load_private_key_pem, private_key_pem
from certgate.pki.keystore import MasterKey, load_master_key, open_or_create_key
from certgate.pki.thumbprint import thumbprint

__all__ = [
    "AppFiles",
    "CertifiedKey",
    "Enrollment",
    "NotEnrolled",
    "StateDir",
    "write_atomic",
]

DIR_MODE = 0o700
FILE_MODE = 0o600
NODE_KEY = "node.key"
NODE_KEY_ENV = "CERTGATE_DEVICE_NODE_KEY"
_PEM_BLOCK_RE = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL
)
_KNOWN_FILES = (
    "enrollment.json",
    "credential",
    "console-ca.pem",
    "device.sealed",
    "profile.json",
    "agent.json",
)


class NotEnrolled(ConfigError):
    """The state directory holds no enrollment (run ``certgate device enroll``)."""


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What enrollment told the device about itself; no secret in here."""

    console_url: str
    device_uid: str
    group_id: str
    platform: str
    name: str
    enrolled_at: str

    def to_dict(self) -> dict[str, str]:
        return {
            "console_url": self.console_url,
            "device_uid": self.device_uid,
            "group_id": self.group_id,
            "platform": self.platform,
            "name": self.name,
            "enrolled_at": self.enrolled_at,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Enrollment:
        fields = ("console_url", "device_uid", "group_id", "platform", "name", "enrolled_at")
        if not isinstance(data, dict) or not all(isinstance(data.get(f), str) for f in fields):
            raise ConfigError("enrollment.json is malformed")
        return cls(*(data[f] for f in fields))


@dataclass(frozen=True, slots=True)
class CertifiedKey:
    """A private key with its certificate and the CA chain above it (issuer first)."""

    key: PrivateKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def thumbprint(self) -> str:
        return thumbprint(self.cert)

    def cert_pem(self) -> bytes:
        """Certificate then chain, as TLS clients present them."""
        return b"".join(c.public_bytes(Encoding.PEM) for c in (self.cert, *self.chain))

    def to_pem(self) -> bytes:
        """Certificate, chain, then key: one file that curl and ``ssl`` both accept."""
        return self.cert_pem() + private_key_pem(self.key)

    @classmethod
    def from_pem(cls, data: bytes) -> CertifiedKey:
        keys, certs = [], []
        for match in _PEM_BLOCK_RE.finditer(data):
            kind, block = match.group(1), match.group(0)
            if kind == b"CERTIFICATE":
                certs.append(x509.load_pem_x509_certificate(block))
            elif kind.endswith(b"PRIVATE KEY"):
                keys.append(load_private_key_pem(block))
        if len(keys) != 1 or not certs:
            raise PKIError("an identity file needs exactly one private key and a certificate")
        identity = cls(keys[0], certs[0], tuple(certs[1:]))
        identity.check_pair()
        return identity

    def check_pair(self) -> None:
        if self.cert.public_key() != self.key.public_key():
            raise PKIError("certificate does not certify this private key")

    def to_pkcs12(self, name: str, password: bytes) -> bytes:
        return pkcs12.serialize_key_and_certificates(
            name.encode(), self.key, self.cert, list(self.chain) or None, _encryption(password)
        )

    def key_export(self, password: bytes) -> bytes:
        """The key as an encrypted PKCS#8 PEM (curl ``--key`` with ``--pass``)."""
        return private_key_pem(self.key, _check_export_password(password))


def _check_export_password(password: bytes) -> bytes:
    if not password:
        raise ConfigError("an export of a private key needs a password")
    return password


def _encryption(password: bytes) -> KeySerializationEncryption:
    return BestAvailableEncryption(_check_export_password(password))


@dataclass(frozen=True, slots=True)
class AppFiles:
    """Where one app's Proxy-mode identity and its exports live."""

    directory: Path

    @property
    def identity(self) -> Path:
        return self.directory / "identity.sealed"

    @property
    def cert(self) -> Path:
        return self.directory / "cert.pem"

    @property
    def key(self) -> Path:
        return self.directory / "key.pem"

    @property
    def pkcs12(self) -> Path:
        return self.directory / "identity.p12"


def write_atomic(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``data`` atomically; the file never exists wider than ``mode``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk too.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_private(path: Path, what: str) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{what} {path} is accessible by group or others (mode {mode:04o}); "
            f"run: chmod {'700' if path.is_dir() else '600'} {path}"
        )


class StateDir:
    """All device state in one private directory (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._node_key: MasterKey | None = None

    # -- the directory ------------------------------------------------------------------

    def create(self) -> None:
        """Create the directory with mode 0700, or check an existing one is private."""
        self.path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        _check_private(self.path, "state directory")

    def check(self) -> None:
        if not self.path.is_dir():
            raise NotEnrolled(f"no device state in {self.path}: run certgate device enroll")
        _check_private(self.path, "state directory")

    def wipe(self) -> None:
        """Forget a previous enrollment: only files this module writes are removed."""
        for name in _KNOWN_FILES:
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / "apps", ignore_errors=True)

    def _read(self, name: str) -> bytes | None:
        path = self.path / name
        if not path.exists():
            return None
        _check_private(path, "state file")
        return path.read_bytes()

    def _read_json(self, name: str) -> Any:
        data = self._read(name)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"{self.path / name} is not valid JSON") from exc

    def _write_json(self, name: str, value: Any) -> None:
        write_atomic(self.path / name, json.dumps(value, indent=2, sort_keys=True).encode())

    # -- sealed secrets ---------------------------------------------------------------

    def node_key(self, *, create: bool = False) -> MasterKey:
        """The key the secrets are sealed under; created (0600) only when writing them."""
        if self._node_key is None:
            path = self.path / NODE_KEY
            self._node_key = (
                open_or_create_key(path, NODE_KEY_ENV)
                if create
                else load_master_key(path, NODE_KEY_ENV)
            )
        return self._node_key

    def _write_sealed(self, name: str, plain: bytes) -> None:
        # The relative path is the associated data: a blob moved to another file won't open.
        write_atomic(self.path / name, self.node_key(create=True).seal_bytes(plain, name))

    def _read_sealed(self, name: str) -> bytes | None:
        blob = self._read(name)
        return None if blob is None else self.node_key().unseal_bytes(blob, name)

    # -- enrollment ---------------------------------------------------------------------

    def is_enrolled(self) -> bool:
        return (self.path / "enrollment.json").exists()

    def save_enrollment(self, enrollment: Enrollment, credential: str, console_ca: bytes) -> None:
        # The credential and the pinned root first: enrollment.json is what marks the
        # directory as enrolled, so it is written last.
        self._write_sealed("credential", credential.encode())
        write_atomic(self.path / "console-ca.pem", console_ca)
        self._write_json("enrollment.json", enrollment.to_dict())

    def enrollment(self) -> Enrollment:
        self.check()
        data = self._read_json("enrollment.json")
        if data is None:
            raise NotEnrolled(f"{self.path} holds no enrollment: run certgate device enroll")
        return Enrollment.from_dict(data)

    def credential(self) -> str:
        data = self._read_sealed("credential")
        if data is None:
            raise NotEnrolled(f"{self.path} holds no device credential: enroll again")
        return data.decode().strip()

    @property
    def console_ca_path(self) -> Path:
        return self.path / "console-ca.pem"

    def add_console_roots(self, roots: list[x509.Certificate]) -> None:
        """Pin more console Roots beside those of enrollment (a Root rotation's new one)."""
        pinned = self.console_ca()
        added = [r for r in roots if r not in pinned]
        if added:
            data = b"".join(c.public_bytes(Encoding.PEM) for c in [*pinned, *added])
            write_atomic(self.path / "console-ca.pem", data)

    def console_ca(self) -> list[x509.Certificate]:
        data = self._read("console-ca.pem")
        if data is None:
            raise NotEnrolled(f"{self.path} holds no console root: enroll again")
        return x509.load_pem_x509_certificates(data)

    # -- Per-App Tunnel: device identity and profile -------------------------------------

    def save_profile(self, identity: CertifiedKey, profile: dict[str, Any]) -> None:
        """Replace the device identity, then the profile. The old key is gone afterwards:
        the rename overwrote the only file that held it."""
        self._write_sealed("device.sealed", identity.to_pem())
        self._write_json("profile.json", profile)

    def save_profile_data(self, profile: dict[str, Any]) -> None:
        """Replace the profile alone (a policy update): the device identity is untouched."""
        self._write_json("profile.json", profile)

    def device_identity(self) -> CertifiedKey | None:
        data = self._read_sealed("device.sealed")
        return None if data is None else CertifiedKey.from_pem(data)

    def profile_data(self) -> dict[str, Any] | None:
        data = self._read_json("profile.json")
        if data is not None and not isinstance(data, dict):
            raise ConfigError("profile.json is malformed")
        return data

    # -- Proxy mode: one identity per app ------------------------------------------------

    def app_files(self, bundle_id: str) -> AppFiles:
        if not BUNDLE_ID_RE.fullmatch(bundle_id):
            raise ConfigError(f"invalid application bundle id {bundle_id!r}")
        return AppFiles(self.path / "apps" / bundle_id)

    def save_app(
        self, bundle_id: str, identity: CertifiedKey, export_password: bytes | None = None
    ) -> AppFiles:
        """Store the app identity sealed, then refresh its exports from it: the key only
        under ``export_password``; without one, older key exports are removed (they would
        pair with a replaced certificate)."""
        files = self.app_files(bundle_id)
        for directory in (files.directory.parent, files.directory):
            directory.mkdir(mode=DIR_MODE, exist_ok=True)
        self._write_sealed(str(files.identity.relative_to(self.path)), identity.to_pem())
        write_atomic(files.cert, identity.cert_pem())
        if export_password:
            write_atomic(files.key, identity.key_export(export_password))
            write_atomic(files.pkcs12, identity.to_pkcs12(bundle_id, export_password))
        else:
            files.key.unlink(missing_ok=True)
            files.pkcs12.unlink(missing_ok=True)
        return files

    def app_identity(self, bundle_id: str) -> CertifiedKey | None:
        files = self.app_files(bundle_id)
        data = self._read_sealed(str(files.identity.relative_to(self.path)))
        return None if data is None else CertifiedKey.from_pem(data)

    def apps(self) -> list[str]:
        apps = self.path / "apps"
        if not apps.is_dir():
            return []
        return sorted(p.name for p in apps.iterdir() if (p / "identity.sealed").exists())

    # -- a running agent ------------------------------------------------------------------

    def save_runtime(self, runtime: dict[str, Any]) -> None:
        self._write_json("agent.json", runtime)

    def runtime(self) -> dict[str, Any] | None:
        data = self._read_json("agent.json")
        return data if isinstance(data, dict) else None

    def clear_runtime(self, pid: int) -> None:
        """Remove agent.json if it still describes process ``pid`` (not a newer agent)."""
        runtime = self.runtime()
        if runtime is not None and runtime.get("pid") == pid:
            (self.path / "agent.json").unlink(missing_ok=True)
