"""A small certgate hierarchy signed by the real ``Authority``, built once per session.

    root ─┬─ secure-channel-root ── console identity, tunnel identity
          ├─ device-root ────────── device (per-app tunnel) cert, app (proxy mode) cert
          └─ admin-ca ───────────── admin client cert

Keys are generated per test session (never committed). ``shared_hierarchy`` is a plain
function so that tests outside ``tests/pki`` (JWS, TLS contexts) reuse the same keys.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certgate.pki import identity
from certgate.pki.authority import Authority, Issuer, Names
from certgate.pki.keys import KeyAlgorithm, PrivateKey, generate_key
from certgate.pki.profiles import (
    ADMIN_CLIENT,
    APP_CLIENT,
    CONSOLE_IDENTITY,
    DEVICE_CLIENT,
    INTERMEDIATE_CA,
    TUNNEL_IDENTITY,
    Profile,
)
from tests.softhsm import softhsm  # noqa: F401 - a fixture for test_token

GROUP = "group-a"
OTHER_GROUP = "group-b"
DEVICE_UID = "0123456789abcdef0123456789abcdef"
ADMIN_ID = "fedcba9876543210fedcba9876543210"
BUNDLE_ID = "com.example.mail"
TUNNEL_DNS = ("tunnel.example.test",)
TUNNEL_IPS = ("127.0.0.1", "::1")

LEAF_NAMES = ("device", "app", "admin", "tunnel", "console")


@dataclass(frozen=True)
class Leaf:
    """An end-entity certificate with its key and the CA that signed it."""

    cert: x509.Certificate
    key: PrivateKey
    issuer: Issuer
    profile: Profile

    @property
    def chain(self) -> list[x509.Certificate]:
        """What a TLS peer presents: the leaf, then its intermediate."""
        return [self.cert, self.issuer.cert]


@dataclass(frozen=True)
class Hierarchy:
    root: Issuer
    secure_channel_root: Issuer
    device_root: Issuer
    admin_ca: Issuer
    leaves: dict[str, Leaf]

    @property
    def intermediates(self) -> dict[str, Issuer]:
        return {
            "secure-channel-root": self.secure_channel_root,
            "device-root": self.device_root,
            "admin-ca": self.admin_ca,
        }


def make_root(
    authority: Authority, name: str, algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256
) -> Issuer:
    key = generate_key(algorithm)
    return Issuer(authority.create_root(key, Names(name)), key)


def make_intermediate(
    authority: Authority,
    parent: Issuer,
    name: str,
    algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256,
) -> Issuer:
    key = generate_key(algorithm)
    cert = authority.issue(parent, INTERMEDIATE_CA, Names(name), key.public_key())
    return Issuer(cert, key)


def make_leaf(
    authority: Authority,
    issuer: Issuer,
    profile: Profile,
    names: Names,
    algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256,
) -> Leaf:
    key = generate_key(algorithm)
    return Leaf(authority.issue(issuer, profile, names, key.public_key()), key, issuer, profile)


def leaf_names(group: str = GROUP) -> dict[str, tuple[str, Profile, Names]]:
    """For each leaf kind: the CA label that signs it, its profile and its names."""
    return {
        "device": (
            "device-root",
            DEVICE_CLIENT,
            Names(f"device {DEVICE_UID}", identity.device(DEVICE_UID, group)),
        ),
        "app": (
            "device-root",
            APP_CLIENT,
            Names(BUNDLE_ID, identity.app(DEVICE_UID, group, BUNDLE_ID)),
        ),
        "admin": ("admin-ca", ADMIN_CLIENT, Names("admin alice", identity.admin(ADMIN_ID))),
        "tunnel": (
            "secure-channel-root",
            TUNNEL_IDENTITY,
            Names(f"tunnel {group}", identity.tunnel(group), TUNNEL_DNS, TUNNEL_IPS),
        ),
        "console": (
            "secure-channel-root",
            CONSOLE_IDENTITY,
            Names(f"console {group}", identity.console(group)),
        ),
    }


def build_hierarchy(
    root_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256,
    algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256,
    authority: Authority | None = None,
) -> Hierarchy:
    authority = authority or Authority()
    root = make_root(authority, "test Root CA", root_algorithm)
    cas = {
        label: make_intermediate(authority, root, f"test {label}", algorithm)
        for label in ("secure-channel-root", "device-root", "admin-ca")
    }
    leaves = {
        name: make_leaf(authority, cas[ca], profile, names, algorithm)
        for name, (ca, profile, names) in leaf_names().items()
    }
    return Hierarchy(root, cas["secure-channel-root"], cas["device-root"], cas["admin-ca"], leaves)


@functools.cache
def shared_hierarchy() -> Hierarchy:
    """The session's EC P-256 hierarchy (cached: every caller gets the same keys)."""
    return build_hierarchy()


def write_pem(path: Path, certs: Iterable[x509.Certificate]) -> Path:
    path.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in certs))
    return path


def openssl_verify(
    root: Path, untrusted: Path, leaf: Path, purpose: str
) -> subprocess.CompletedProcess[str]:
    """The real ``openssl verify`` (exit status 0 only for a valid chain for ``purpose``)."""
    command = ["openssl", "verify", "-CAfile", str(root), "-untrusted", str(untrusted)]
    command += ["-purpose", purpose, str(leaf)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture(scope="session")
def hierarchy() -> Hierarchy:
    return shared_hierarchy()


@pytest.fixture(scope="session")
def rsa_hierarchy() -> Hierarchy:
    """RSA-3072 root, RSA-2048 intermediates and leaves (RSA generation is slow: once)."""
    return build_hierarchy(KeyAlgorithm.RSA_3072, KeyAlgorithm.RSA_2048)


@pytest.fixture(scope="session")
def pem_dir(tmp_path_factory: pytest.TempPathFactory, hierarchy: Hierarchy) -> Path:
    """``root.pem``, ``<intermediate>.pem`` and ``<leaf>.pem`` of the session hierarchy."""
    return write_hierarchy(tmp_path_factory.mktemp("pem"), hierarchy)


def write_hierarchy(directory: Path, hierarchy: Hierarchy) -> Path:
    write_pem(directory / "root.pem", [hierarchy.root.cert])
    for label, ca in hierarchy.intermediates.items():
        write_pem(directory / f"{label}.pem", [ca.cert])
    for name, leaf in hierarchy.leaves.items():
        write_pem(directory / f"{name}.pem", [leaf.cert])
    return directory
