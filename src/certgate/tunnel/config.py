"""A tunnel node's state directory, parsed once and verified into a frozen ``TunnelState``.

``certgate tunnel setup`` / ``install`` write the directory; ``load_state`` reads it at
startup and checks everything again (STYLE.md habit 7), so a tampered or half-written
directory stops the tunnel with a reason instead of weakening it:

=======================  ===========================================================
``state.json``           format, group id, console URL, node name (written last)
``root.pem``             the instance Root: the only trust anchor (two during a Root
                         rotation, the current one first, as the trust config lists them)
``chain.pem``            Secure Channel Root + Root, sent after the tunnel cert (rewritten
                         with the root that issued it when a rotation renews it; during a
                         Root rotation its cross certificate stands for the Root)
``console-identity.pem`` the group's console identity, pinned: it alone signs messages
``tunnel.pem``           the group's tunnel identity (the same on every node)
``tunnel.key``           its private key, sealed under the node key (keystore format,
                         mode 0600, refused if group/other can read)
``node.key``             this node's key (mode 0600), unless ``$CERTGATE_TUNNEL_NODE_KEY``
                         gives it: each HA node seals the group key under its own
``trust.jws``            the signed trust config (docs/CONVENTIONS.md, "Signed messages")
=======================  ===========================================================

``load_identity`` is the one function that reads the private key; ``store_identity`` the
one that writes it. No private key is ever on this node's disk in clear.

The persisted device table (``persist.py``) lives in the same directory.

Feed defaults: when the trust config's ``feed`` settings omit them, the long-poll waits
``DEFAULT_LONG_POLL_S`` (25 s) and the staleness budget is ``DEFAULT_MAX_STALENESS_S``
(300 s): past it without a successful exchange with the console, the device list counts
as stale and the tunnel fails closed for new connections.
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from certgate import jws
from certgate.errors import CertgateError, ConfigError
from certgate.feed import FEED_VERSION, FeedError, PolicyUpdate, decode_op
from certgate.pki import identity
from certgate.pki.authority import utcnow
from certgate.pki.keys import PrivateKey
from certgate.pki.keystore import is_sealed, load_master_key, open_or_create_key
from certgate.pki.thumbprint import thumbprint
from certgate.pki.verify import verify_client_chain, vouched_roots
from certgate.tunnel.persist import atomic_write

__all__ = [
    "DEFAULT_LONG_POLL_S",
    "DEFAULT_MAX_STALENESS_S",
    "NODE_NAME_RE",
    "STATE_FILES",
    "STATE_FORMAT",
    "FeedSettings",
    "TrustConfig",
    "TunnelSettings",
    "TunnelState",
    "chain_pem",
    "check_node_name",
    "load_certs",
    "load_identity",
    "load_root",
    "load_roots",
    "load_secure_channel_root",
    "load_single_cert",
    "load_state",
    "parse_trust",
    "roots_pem",
    "state_from_files",
    "state_json",
    "store_identity",
    "verify_identity",
    "verify_signed_by_root",
]

STATE_FORMAT = "certgate-tunnel-state/1"
STATE_JSON = "state.json"
ROOT_PEM = "root.pem"
CHAIN_PEM = "chain.pem"
CONSOLE_IDENTITY_PEM = "console-identity.pem"
TUNNEL_PEM = "tunnel.pem"
TUNNEL_KEY = "tunnel.key"
TRUST_JWS = "trust.jws"
NODE_KEY = "node.key"
NODE_KEY_ENV = "CERTGATE_TUNNEL_NODE_KEY"
TUNNEL_KEY_LABEL = "tunnel-identity"  # the sealed blob's associated data
# The public files, verified by ``state_from_files``; the key is ``load_identity``'s.
STATE_FILES = (ROOT_PEM, CHAIN_PEM, CONSOLE_IDENTITY_PEM, TUNNEL_PEM, TRUST_JWS)
SECRET_FILES = frozenset({TUNNEL_KEY, NODE_KEY})

DEFAULT_LONG_POLL_S = 25.0
DEFAULT_MAX_STALENESS_S = 300.0
# Used in the Certgate-Node header and in logs: keep it to a safe token (RFC 9110 §5.6.2).
NODE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_FILE_BYTES = 1024 * 1024

MAX_DEVICE_ROOTS = 2  # the current one and a rotation's other one
MAX_SECURE_CHANNEL_ROOTS = 2  # likewise
MAX_ROOTS = 2  # the current Root and a Root rotation's other one


@dataclass(frozen=True, slots=True)
class TunnelSettings:
    """Where the data plane listens and which names its identity cert carries."""

    hostnames: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    proxy_port: int
    per_app_port: int


@dataclass(frozen=True, slots=True)
class FeedSettings:
    snapshot_path: str
    feed_path: str
    long_poll_s: float
    max_staleness_s: float


@dataclass(frozen=True, slots=True)
class TrustConfig:
    """The verified payload of ``trust.jws``."""

    group_id: str
    console_url: str
    tunnel: TunnelSettings
    feed: FeedSettings
    policy: PolicyUpdate  # the group policy at setup; the feed brings newer ones
    issued_at: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class TunnelState:
    """Everything a tunnel node trusts and presents, verified."""

    state_dir: Path
    group_id: str
    console_url: str
    node_name: str
    # The instance Roots trusted: the current one first, two during a Root rotation.
    roots: tuple[x509.Certificate, ...]
    # A running Root rotation's cross certificates (trust config ``root_cross``).
    root_crosses: tuple[x509.Certificate, ...]
    # The Secure Channel Roots whose group identities are trusted: the current one first,
    # two during its rotation (from the trust config).
    secure_channel_roots: tuple[x509.Certificate, ...]
    device_roots: tuple[x509.Certificate, ...]  # the current one first (rotation overlap)
    console_identity: x509.Certificate
    tunnel_cert: x509.Certificate
    tunnel_chain: tuple[x509.Certificate, ...]  # after the leaf: Secure Channel Root, Root
    tunnel_key: PrivateKey = field(repr=False)
    trust: TrustConfig

    @property
    def tunnel_thumbprint(self) -> str:
        return thumbprint(self.tunnel_cert)

    @property
    def root(self) -> x509.Certificate:
        """The current instance Root."""
        return self.roots[0]

    @property
    def secure_channel_root(self) -> x509.Certificate:
        """The Secure Channel Root that issued the tunnel identity (sent after it)."""
        return self.tunnel_chain[0]

    @property
    def device_root(self) -> x509.Certificate:
        """The Device Root the console issues with now."""
        return self.device_roots[0]


def check_node_name(name: str) -> str:
    if not NODE_NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid node name {name!r}: use 1-128 of [A-Za-z0-9._-]")
    return name


def load_certs(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{what}: no PEM certificate ({exc})") from exc
    return certs


def verify_signed_by_root(cert: x509.Certificate, root: x509.Certificate, what: str) -> None:
    """``cert`` is a CA certificate directly signed by ``root`` (an instance intermediate)."""
    try:
        cert.verify_directly_issued_by(root)
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound) as exc:
        reason = str(exc) or "bad signature"
        raise ConfigError(f"{what} is not issued by the instance root: {reason}") from exc
    if not is_ca:
        raise ConfigError(f"{what} is not a CA certificate")


def load_root(data: bytes, what: str) -> x509.Certificate:
    certs = load_certs(data, what)
    roots = [c for c in certs if c.issuer == c.subject]
    if len(certs) != 1 or len(roots) != 1:
        raise ConfigError(f"{what}: expected exactly one self-signed root certificate")
    verify_signed_by_root(roots[0], roots[0], what)
    return roots[0]


def load_roots(data: bytes, what: str) -> tuple[x509.Certificate, ...]:
    """One self-signed Root, or two during a Root rotation (the current one first)."""
    certs = load_certs(data, what)
    if not 1 <= len(certs) <= MAX_ROOTS or len(set(certs)) != len(certs):
        raise ConfigError(f"{what}: expected 1 to {MAX_ROOTS} self-signed root certificates")
    for cert in certs:
        if cert.issuer != cert.subject:
            raise ConfigError(f"{what}: {cert.subject.rfc4514_string()} is not self-signed")
        verify_signed_by_root(cert, cert, what)
    return tuple(certs)


def verify_signed_by_a_root(
    cert: x509.Certificate, roots: Sequence[x509.Certificate], what: str
) -> x509.Certificate:
    """``cert`` is a CA certificate directly signed by one of ``roots``; returns that Root."""
    failures = []
    for root in roots:
        try:
            verify_signed_by_root(cert, root, what)
        except ConfigError as exc:
            failures.append(str(exc))
        else:
            return root
    raise ConfigError("; ".join(failures))


def load_secure_channel_root(
    chain_pem: bytes, roots: x509.Certificate | Sequence[x509.Certificate]
) -> x509.Certificate:
    anchors = [roots] if isinstance(roots, x509.Certificate) else list(roots)
    chain = load_certs(chain_pem, CHAIN_PEM)
    # The second is a Root or, during a Root rotation, its cross certificate (same subject).
    if (
        len(chain) != 2
        or chain[0].issuer == chain[0].subject
        or chain[1].subject not in {root.subject for root in anchors}
    ):
        raise ConfigError(f"{CHAIN_PEM}: expected Secure Channel Root then the instance root")
    verify_signed_by_a_root(chain[0], anchors, "Secure Channel Root")
    return chain[0]


def above(
    ca_cert: x509.Certificate,
    state_roots: Sequence[x509.Certificate],
    crosses: Sequence[x509.Certificate],
) -> x509.Certificate:
    """What is sent after ``ca_cert`` (an intermediate): its Root or, during a Root
    rotation, that Root's cross certificate, so a party trusting either Root verifies
    (the console's ``InstancePKI.chain_of`` rule)."""
    for candidate in (*crosses, *state_roots):
        try:
            verify_signed_by_root(ca_cert, candidate, "intermediate")
        except ConfigError:
            continue
        return candidate
    raise ConfigError(f"no trusted Root issued {ca_cert.subject.rfc4514_string()}")


def verify_identity(
    cert: x509.Certificate,
    scrs: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    expected: identity.Identity,
) -> x509.Certificate:
    """``cert`` chains one of ``roots`` -> one of the Secure Channel Roots ``scrs`` -> cert
    and names ``expected``; returns that Secure Channel Root, the first of ``scrs`` that
    verifies (during a Root rotation two certificates of one key: the current one first)."""
    failures = []
    for scr in scrs:
        try:
            chain = verify_client_chain(cert, [scr], list(roots), at=utcnow())
        except CertgateError as exc:
            failures.append(str(exc))
            continue
        if len(chain) >= 2 and chain[1] == scr:
            _check_name(cert, expected)
            return scr
    detail = "; ".join(failures) or "not issued by a trusted Secure Channel Root"
    raise ConfigError(f"{expected.uri()}: {detail}")


def _check_name(cert: x509.Certificate, expected: identity.Identity) -> None:
    try:
        found = identity.identity_of(cert)
    except CertgateError as exc:
        raise ConfigError(f"{expected.uri()}: {exc}") from exc
    if found != expected:
        raise ConfigError(f"certificate names {found.uri()}, expected {expected.uri()}")


def _check_key_matches(key: PrivateKey, cert: x509.Certificate) -> None:
    raw = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*raw) != cert.public_key().public_bytes(*raw):
        raise ConfigError(f"{TUNNEL_KEY} does not belong to the tunnel identity certificate")


def _field(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"trust config: {where}{key} is missing or malformed")
    return value


def _tunnel_settings(raw: Mapping[str, Any]) -> TunnelSettings:
    hostnames = _field(raw, "hostnames", list, "tunnel.")
    ips = _field(raw, "ip_addresses", list, "tunnel.")
    if not all(isinstance(v, str) for v in [*hostnames, *ips]):
        raise ConfigError("trust config: tunnel names must be strings")
    return TunnelSettings(
        tuple(hostnames),
        tuple(ips),
        _field(raw, "proxy_port", int, "tunnel."),
        _field(raw, "per_app_port", int, "tunnel."),
    )


def _feed_settings(raw: Mapping[str, Any]) -> FeedSettings:
    number = (int, float)
    long_poll = raw.get("long_poll_s", DEFAULT_LONG_POLL_S)
    staleness = raw.get("max_staleness_s", DEFAULT_MAX_STALENESS_S)
    values = {"long_poll_s": long_poll, "max_staleness_s": staleness}
    settings = FeedSettings(
        _field(raw, "snapshot_path", str, "feed."),
        _field(raw, "feed_path", str, "feed."),
        float(_field(values, "long_poll_s", number, "feed.")),
        float(_field(values, "max_staleness_s", number, "feed.")),
    )
    if not settings.long_poll_s > 0 or not settings.max_staleness_s > 0:
        raise ConfigError("trust config: feed timings must be positive")
    for path in (settings.snapshot_path, settings.feed_path):
        if not path.startswith("/") or "//" in path or "?" in path:
            raise ConfigError(f"trust config: feed path {path!r} must be an absolute path")
    return settings


def _initial_policy(
    payload: Mapping[str, Any], tunnel: TunnelSettings, feed: FeedSettings
) -> PolicyUpdate:
    """The policy the trust config was signed with, in the feed's own terms (version 0
    when the console predates policy versions), parsed once."""
    op = {
        "op": "policy",
        "version": payload.get("policy_version", 0),
        "server_rules": _field(payload, "server_rules", dict, ""),
        "device_rules": payload.get("device_rules", {}),
        "feed": {"long_poll_s": feed.long_poll_s, "max_staleness_s": feed.max_staleness_s},
        "tunnel": {"proxy_port": tunnel.proxy_port, "per_app_port": tunnel.per_app_port},
    }
    try:
        policy = decode_op(op, "trust config", FEED_VERSION)
    except FeedError as exc:
        raise ConfigError(f"trust config: invalid policy: {exc}") from exc
    assert isinstance(policy, PolicyUpdate)
    return policy


def parse_trust(payload: Mapping[str, Any]) -> TrustConfig:
    """The verified trust payload as typed settings (signature already checked)."""
    tunnel = _tunnel_settings(_field(payload, "tunnel", dict, ""))
    feed = _feed_settings(_field(payload, "feed", dict, ""))
    return TrustConfig(
        group_id=_field(payload, "group_id", str, ""),
        console_url=_field(payload, "console_url", str, ""),
        tunnel=tunnel,
        feed=feed,
        policy=_initial_policy(payload, tunnel, feed),
        issued_at=_field(payload, "iat", int, ""),
        expires_at=_field(payload, "exp", int, ""),
    )


@dataclass(frozen=True, slots=True)
class _Trusted:
    """What a verified trust config says to trust."""

    config: TrustConfig
    device_roots: tuple[x509.Certificate, ...]
    secure_channel_roots: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    root_crosses: tuple[x509.Certificate, ...]


def _intermediates(
    payload: Mapping[str, Any],
    key: str,
    what: str,
    most: int,
    roots: Sequence[x509.Certificate],
) -> tuple[x509.Certificate, ...]:
    """The 1 to ``most`` CA certificates of ``payload[key]``, each issued by one of
    ``roots``."""
    certs = load_certs(str(payload.get(key, "")).encode(), what)
    if not 1 <= len(certs) <= most:
        raise ConfigError(f"trust config: expected 1 to {most} {what}s")
    for cert in certs:
        verify_signed_by_a_root(cert, roots, what)
    return tuple(certs)


def _vouched_roots(
    payload: Mapping[str, Any], pinned: Sequence[x509.Certificate]
) -> tuple[tuple[x509.Certificate, ...], tuple[x509.Certificate, ...]]:
    """The Roots the trust config lists (the current one first) and its cross
    certificates. A Root the node does not pin yet is taken only when a cross certificate
    of the trust config, signed by a pinned Root, certifies its subject and key: the
    console identity alone never brings a new anchor."""
    roots = load_roots(str(payload.get("root", "")).encode(), "trust config root")
    crosses: tuple[x509.Certificate, ...] = ()
    if payload.get("root_cross"):
        crosses = tuple(load_certs(str(payload["root_cross"]).encode(), "trust config root_cross"))
    try:
        return vouched_roots(roots, crosses, pinned), crosses
    except CertgateError as exc:
        raise ConfigError(f"trust config: {exc}") from exc


def _verified_trust(
    token: bytes,
    console: x509.Certificate,
    group_id: str,
    pinned: dict[str, x509.Certificate],
    pinned_roots: Sequence[x509.Certificate],
) -> _Trusted:
    """Verify ``trust.jws`` with the pinned console identity's key; cross-check the root
    and the identities it names against the files; return the settings, the Device Roots
    and the Secure Channel Roots it carries (two of a kind during its rotation). The
    identities' chains are checked against those roots by the caller."""
    try:
        payload = jws.verify(token, console, jws.TYP_TRUST, group_id)
    except CertgateError as exc:
        raise ConfigError(f"{TRUST_JWS}: {exc}") from exc
    roots, crosses = _vouched_roots(payload, pinned_roots)
    for key, name in (
        ("console_identity_thumbprint", "console"),
        ("tunnel_identity_thumbprint", "tunnel"),
    ):
        if payload.get(key) != thumbprint(pinned[name]):
            raise ConfigError(f"trust config names a different {name} identity")
    return _Trusted(
        parse_trust(payload),
        _intermediates(payload, "device_root", "Device Root", MAX_DEVICE_ROOTS, roots),
        _intermediates(
            payload, "secure_channel_root", "Secure Channel Root", MAX_SECURE_CHANNEL_ROOTS, roots
        ),
        roots,
        crosses,
    )


def _state_json(data: bytes) -> tuple[str, str, str]:
    try:
        meta = json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"{STATE_JSON} is not JSON") from exc
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise ConfigError(f"{STATE_JSON}: unknown format (expected {STATE_FORMAT})")
    group_id = _field(meta, "group_id", str, "")
    if not identity.GROUP_ID_RE.fullmatch(group_id):
        raise ConfigError(f"{STATE_JSON}: invalid group id {group_id!r}")
    console_url = _field(meta, "console_url", str, "")
    return group_id, console_url, check_node_name(_field(meta, "node_name", str, ""))


def state_json(group_id: str, console_url: str, node_name: str) -> bytes:
    meta = {
        "format": STATE_FORMAT,
        "group_id": group_id,
        "console_url": console_url,
        "node_name": node_name,
    }
    return json.dumps(meta, indent=2, sort_keys=True).encode() + b"\n"


def state_from_files(files: Mapping[str, bytes], state_dir: Path, key: PrivateKey) -> TunnelState:
    """Verify the contents of a state directory (``STATE_FILES`` and ``state.json``) and
    that ``key`` is the tunnel identity's."""
    missing = [name for name in (*STATE_FILES, STATE_JSON) if name not in files]
    if missing:
        raise ConfigError(f"state directory {state_dir} lacks {', '.join(missing)}")
    group_id, console_url, node_name = _state_json(files[STATE_JSON])
    pinned_roots = load_roots(files[ROOT_PEM], ROOT_PEM)
    console = load_single_cert(files[CONSOLE_IDENTITY_PEM], CONSOLE_IDENTITY_PEM)
    _check_name(console, identity.console(group_id))
    tunnel = load_single_cert(files[TUNNEL_PEM], TUNNEL_PEM)
    _check_name(tunnel, identity.tunnel(group_id))
    _check_key_matches(key, tunnel)
    pinned = {"console": console, "tunnel": tunnel}
    trusted = _verified_trust(files[TRUST_JWS], console, group_id, pinned, pinned_roots)
    scrs, roots = trusted.secure_channel_roots, trusted.roots
    # Well formed, under a Root listed or pinned: the chain is derived (and written again
    # from it), and a snapshot's Root step may drop the Root the stored one was under.
    load_secure_channel_root(files[CHAIN_PEM], (*roots, *pinned_roots))
    verify_identity(console, scrs, roots, identity.console(group_id))
    issuer = verify_identity(tunnel, scrs, roots, identity.tunnel(group_id))
    return TunnelState(
        state_dir=state_dir,
        group_id=group_id,
        console_url=console_url,
        node_name=node_name,
        roots=roots,
        root_crosses=trusted.root_crosses,
        secure_channel_roots=scrs,
        device_roots=trusted.device_roots,
        console_identity=console,
        tunnel_cert=tunnel,
        tunnel_chain=(issuer, above(issuer, roots, trusted.root_crosses)),
        tunnel_key=key,
        trust=trusted.config,
    )


def roots_pem(state: TunnelState) -> bytes:
    """``root.pem`` of ``state``: the Roots it trusts, the current one first."""
    return b"".join(c.public_bytes(Encoding.PEM) for c in state.roots)


def chain_pem(state: TunnelState) -> bytes:
    """``chain.pem`` of ``state``: the Secure Channel Root that issued its tunnel identity,
    then the Root (what the node sends after the tunnel certificate)."""
    return b"".join(c.public_bytes(Encoding.PEM) for c in state.tunnel_chain)


def load_single_cert(data: bytes, what: str) -> x509.Certificate:
    certs = load_certs(data, what)
    if len(certs) != 1:
        raise ConfigError(f"{what}: expected exactly one certificate, found {len(certs)}")
    return certs[0]


def _read_private(path: Path) -> bytes:
    """Read a state file, refusing one that others could read (keys) or that is huge."""
    try:
        info = path.stat()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} is missing: run 'certgate tunnel setup' first") from exc
    if path.name in SECRET_FILES and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} is accessible by group/others; chmod 600 it")
    if info.st_size > _MAX_FILE_BYTES:
        raise ConfigError(f"{path} is larger than {_MAX_FILE_BYTES} bytes")
    return path.read_bytes()


def load_state(state_dir: Path) -> TunnelState:
    """Read and verify a state directory; raise ``ConfigError`` with the reason."""
    if not state_dir.is_dir():
        raise ConfigError(f"state directory {state_dir} does not exist")
    if state_dir.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"state directory {state_dir} is writable by group/others")
    files = {name: _read_private(state_dir / name) for name in (*STATE_FILES, STATE_JSON)}
    return state_from_files(files, state_dir, load_identity(state_dir))


def load_identity(state_dir: Path) -> PrivateKey:
    """The tunnel identity's private key, unsealed with this node's key: the one place a
    node reads it. A missing or wrong node key fails here, naming the file or variable."""
    path = state_dir / TUNNEL_KEY
    blob = _read_private(path)
    if not is_sealed(blob):
        raise ConfigError(
            f"{path} is not sealed (a key in clear from an older setup?): "
            "run 'certgate tunnel setup' again"
        )
    node_key = load_master_key(state_dir / NODE_KEY, NODE_KEY_ENV)
    try:
        return node_key.unseal(blob, TUNNEL_KEY_LABEL)
    except CertgateError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def store_identity(state_dir: Path, key: PrivateKey) -> None:
    """Seal ``key`` under this node's key (created 0600 unless ``$CERTGATE_TUNNEL_NODE_KEY``
    gives it) and replace ``tunnel.key`` atomically."""
    node_key = open_or_create_key(state_dir / NODE_KEY, NODE_KEY_ENV)
    atomic_write(state_dir / TUNNEL_KEY, node_key.seal(key, TUNNEL_KEY_LABEL), 0o600)
