"""The console -> tunnel feed contract: one home for its vocabulary, values and versions.

Both sides import this module and nothing else for the wire form (docs/CONVENTIONS.md,
"Device feed"). No I/O, no clock. It owns:

* the status enums (``EnrollmentStatus``, ``ComplianceStatus``), declared once;
* ``Entry`` (an ``upsert``: one device or app certificate as the console describes it),
  ``Delete``, ``PolicyUpdate`` (the group policy a node applies) and ``TrustUpdate`` (a
  step of a rotation of what the node presents or trusts), each with ``encode()`` to its
  JSON object and one ``decode_op`` that validates any of them;
* ``FEED_VERSION``, the contract version, and the rule for versions (below).

Versions. A batch or snapshot page of version 2 or later says so (``"version": N``); one
without the key is version 1 (the format of nodes that predate versions). A node asks
for the version it speaks (``?version=N``) and the console answers in that version or
an older one, never a newer one: version 1 answers carry no ``policy`` operations (the
node keeps the policy of its trust config) and no ``version`` key; version 2 answers
carry no ``trust`` operations (a version 2 node cannot follow a rotation: the console's
rotation status says so, and finishing the rotation waits for it or for ``--force``);
version 3 snapshot pages carry no ``trust`` list (``snapshot_trust``: a version 3 node that
resynchronises from a snapshot during a rotation learns it only at the next step).
Within a version the key sets are exact: a key a node does not know is an error, because
a field that could deny access must never be silently ignored by a node that cannot read
it (fail closed). New fields therefore come only with a new version, which the console
sends only to nodes that asked for it. A node that receives a version newer than its own rejects the
message with that reason (upgrade the node) and keeps its table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from re import Pattern
from typing import Any, TypeVar

from certgate.errors import CertgateError, ConfigError
from certgate.pki.identity import BUNDLE_ID_RE, DEVICE_UID_RE, GROUP_ID_RE
from certgate.pki.thumbprint import is_thumbprint
from certgate.tunnel.rules import RuleSet

__all__ = [
    "ATTRIBUTE_FIELDS",
    "CONSOLE_IDENTITY",
    "FEED_VERSION",
    "MAX_SNAPSHOT_TRUST",
    "MIN_FEED_VERSION",
    "POLICY_VERSION",
    "ROOT",
    "ROOT_TRUST_VERSION",
    "SNAPSHOT_TRUST_VERSION",
    "TRUST_VERSION",
    "TUNNEL_IDENTITY",
    "ComplianceStatus",
    "Delete",
    "EnrollmentStatus",
    "Entry",
    "FeedError",
    "InvalidEntry",
    "Op",
    "PolicyUpdate",
    "RotationPhase",
    "TrustUpdate",
    "decode_op",
    "message_version",
    "snapshot_trust",
    "split_trust",
    "trust_kinds_of",
    "tunnel_key_context",
]

# 2: policy operations, "version" on batches and snapshot pages; 3: trust operations;
# 4: snapshot pages carry the trust operations in use at their seq (``snapshot_trust``);
# 5: Root rotation steps (trust operations of kind ``root``)
FEED_VERSION = 5
MIN_FEED_VERSION = 1
POLICY_VERSION = 2  # the first version with policy operations
TRUST_VERSION = 3  # the first version with trust operations in batches
SNAPSHOT_TRUST_VERSION = 4  # the first version whose snapshot pages carry trust operations
ROOT_TRUST_VERSION = 5  # the first version that reads Root rotation steps
# At most: the console identity, the tunnel identity, the Device Roots, the Secure Channel
# Roots and the Roots in use, and a prepared next console and tunnel identity
# (``snapshot_trust``); a node of version 4 is never sent a Root step, so at most 5.
MAX_SNAPSHOT_TRUST = 6
MAX_NOT_AFTER = 2**63 - 1  # int64, as a node packs it


class FeedError(CertgateError):
    """The content of a (correctly signed) feed snapshot or batch cannot be applied."""


class InvalidEntry(FeedError):
    """An operation breaks the feed schema; the whole snapshot or batch is rejected."""


class EnrollmentStatus(Enum):
    ENROLLED = "enrolled"
    UNENROLLED = "unenrolled"
    WIPED = "wiped"


class ComplianceStatus(Enum):
    COMPLIANT = "compliant"
    NONCOMPLIANT = "noncompliant"
    UNKNOWN = "unknown"


# The fields a format-2 snapshot page dictionary-encodes (docs/CONVENTIONS.md).
ATTRIBUTE_FIELDS = (
    "group_id",
    "app_bundle_id",
    "enrollment_status",
    "compliance_status",
    "blocked",
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One device certificate as the console last described it (a feed ``upsert``)."""

    thumbprint: str
    device_uid: str
    group_id: str
    app_bundle_id: str | None  # None: a Per-App Tunnel device certificate
    enrollment_status: EnrollmentStatus
    compliance_status: ComplianceStatus
    blocked: bool
    not_after: int  # POSIX seconds

    def encode(self) -> dict[str, Any]:
        return {
            "op": "upsert",
            "thumbprint": self.thumbprint,
            "device_uid": self.device_uid,
            "group_id": self.group_id,
            "app_bundle_id": self.app_bundle_id,
            "enrollment_status": self.enrollment_status.value,
            "compliance_status": self.compliance_status.value,
            "blocked": self.blocked,
            "not_after": self.not_after,
        }


@dataclass(frozen=True, slots=True)
class Delete:
    """The certificate is gone (revoked, superseded, device unenrolled)."""

    thumbprint: str
    device_uid: str
    group_id: str

    def encode(self) -> dict[str, Any]:
        return {
            "op": "delete",
            "thumbprint": self.thumbprint,
            "device_uid": self.device_uid,
            "group_id": self.group_id,
        }


@dataclass(frozen=True, slots=True)
class PolicyUpdate:
    """The group policy at ``version``: what every node (and device) of the group applies.

    ``server_rules`` are parsed once, here; ``device_rules`` travel for devices and are
    kept as the console validated them (a node does not apply them). Listener ports are
    part of the policy so that a node can say when it needs a restart to follow them.
    """

    version: int
    server_rules: RuleSet
    device_rules: Mapping[str, Any] = field(compare=False)
    long_poll_s: float
    max_staleness_s: float
    proxy_port: int
    per_app_port: int
    # realm -> KDC addresses the tunnel's KDC proxy forwards to (tunnel/kdcproxy.py);
    # optional on the wire: absent when no realm is served.
    kerberos: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        kerberos = {"kerberos": _kerberos_json(self.kerberos)} if self.kerberos else {}
        return {
            "op": "policy",
            "version": self.version,
            "server_rules": self.server_rules.to_dict(),
            "device_rules": dict(self.device_rules),
            "feed": {"long_poll_s": self.long_poll_s, "max_staleness_s": self.max_staleness_s},
            "tunnel": {"proxy_port": self.proxy_port, "per_app_port": self.per_app_port},
            **kerberos,
        }

    @classmethod
    def from_settings(cls, version: int, settings: Mapping[str, Any]) -> PolicyUpdate:
        """The policy of a group's settings (as the console stores them)."""
        op = {
            "op": "policy",
            "version": version,
            "server_rules": settings["server_rules"],
            "device_rules": settings["device_rules"],
            "feed": {key: settings["feed"][key] for key in _FEED_KEYS},
            "tunnel": {key: settings["tunnel"][key] for key in _TUNNEL_KEYS},
        }
        kerberos = _kerberos_json(settings.get("kerberos", {}))
        if kerberos:
            op["kerberos"] = kerberos
        decoded = decode_op(op, "settings", FEED_VERSION)
        assert isinstance(decoded, PolicyUpdate)
        return decoded


class RotationPhase(Enum):
    """prepare: the new one exists and is distributed, old and new are both trusted;
    switch: the new one is used for new work; finish: the old one is no longer trusted."""

    PREPARE = "prepare"
    SWITCH = "switch"
    FINISH = "finish"


TUNNEL_IDENTITY = "tunnel-identity"
CONSOLE_IDENTITY = "console-identity"
DEVICE_ROOT = "device-root"
SECURE_CHANNEL_ROOT = "secure-channel-root"
ROOT = "root"
TRUST_KINDS = frozenset({TUNNEL_IDENTITY, CONSOLE_IDENTITY, DEVICE_ROOT, SECURE_CHANNEL_ROOT, ROOT})
# The kinds whose trust config alone says what to trust (no identity of the node changes).
CA_TRUST_KINDS = frozenset({DEVICE_ROOT, SECURE_CHANNEL_ROOT, ROOT})
# The first contract version that reads each kind (older nodes would refuse the batch; the
# console's rotation status shows such a node without the new CA, so finish waits for its
# upgrade).
_KIND_SINCE = {SECURE_CHANNEL_ROOT: 4, ROOT: ROOT_TRUST_VERSION}


def trust_kinds_of(version: int) -> frozenset[str]:
    """The rotation kinds a node of contract ``version`` reads: Secure Channel Root steps
    from version 4, Root steps from version 5 (``_KIND_SINCE``)."""
    if version < TRUST_VERSION:
        return frozenset()
    return frozenset(k for k in TRUST_KINDS if version >= _KIND_SINCE.get(k, TRUST_VERSION))


@dataclass(frozen=True, slots=True)
class TrustUpdate:
    """One step of a rotation, for the nodes of the group (version 3).

    ``tunnel-identity``: ``certificate`` is the group's next tunnel identity (PEM),
    ``sealed_key`` its private key sealed to the group's *current* tunnel identity
    (``pki.keywrap``; never a clear key), ``trust`` the trust config (a signed
    ``certgate-trust+jws``) that names the new identity, which the node stores with it.
    ``console-identity``: ``certificate`` is the group's next console identity, announced
    in a batch signed by the current one; ``trust`` is signed by the new one and names it;
    ``sealed_key`` is null (a node never holds a console key).
    ``device-root``: ``certificate`` is the instance's next Device Root; ``trust`` is
    signed by the current console identity and lists every Device Root the node must
    trust from this step on (both during the overlap, the new one alone at finish);
    ``sealed_key`` is null.
    ``secure-channel-root``: as ``device-root``, for the instance's Secure Channel Roots
    (the trust config's ``secure_channel_root`` lists both during the overlap, the current
    one first); the group identities it issues are renewed by their own rotations.
    Every step carries all of it, so a node that missed one catches up at the next. The
    node checks it exactly as at setup before it uses or stores it.
    """

    kind: str
    phase: RotationPhase
    rotation: int
    certificate: str
    sealed_key: Mapping[str, str] | None = field(compare=False)
    trust: str

    @property
    def is_next(self) -> bool:
        """A prepare step of an identity: the node holds it as the next one and nothing in
        use changes (a root's prepare step changes what is trusted at once)."""
        return self.phase is RotationPhase.PREPARE and self.kind not in CA_TRUST_KINDS

    def encode(self) -> dict[str, Any]:
        return {
            "op": "trust",
            "kind": self.kind,
            "phase": self.phase.value,
            "rotation": self.rotation,
            "certificate": self.certificate,
            "sealed_key": None if self.sealed_key is None else dict(self.sealed_key),
            "trust": self.trust,
        }


Op = Entry | Delete | PolicyUpdate | TrustUpdate

_UPSERT_KEYS = frozenset(
    {
        "op",
        "thumbprint",
        "device_uid",
        "group_id",
        "app_bundle_id",
        "enrollment_status",
        "compliance_status",
        "blocked",
        "not_after",
    }
)
_DELETE_KEYS = frozenset({"op", "thumbprint", "device_uid", "group_id"})
_POLICY_KEYS = frozenset({"op", "version", "server_rules", "device_rules", "feed", "tunnel"})
_KERBEROS_KEY = "kerberos"  # the one optional policy key (docs/CONVENTIONS.md)
_TRUST_KEYS = frozenset({"op", "kind", "phase", "rotation", "certificate", "sealed_key", "trust"})
_SEALED_KEYS = frozenset({"alg", "epk", "nonce", "ciphertext"})
_PHASES = {member.value: member for member in RotationPhase}
MAX_TRUST_TEXT = 64 * 1024
_FEED_KEYS = ("long_poll_s", "max_staleness_s")
_TUNNEL_KEYS = ("proxy_port", "per_app_port")
_ENROLLMENT = {member.value: member for member in EnrollmentStatus}
_COMPLIANCE = {member.value: member for member in ComplianceStatus}
_T = TypeVar("_T")


def message_version(payload: Mapping[str, Any], own: int = FEED_VERSION) -> int:
    """The contract version of a verified batch or snapshot page (absent: 1); raises for
    a malformed one or one newer than ``own``, the version the reader asked for (a node
    pinned to an older version reads as a node of that version would)."""
    version = payload.get("version", MIN_FEED_VERSION)
    if type(version) is not int or version < MIN_FEED_VERSION:
        raise FeedError(f"malformed feed version {_show(version)}")
    if "version" in payload and version == MIN_FEED_VERSION:
        raise FeedError("version 1 messages carry no version key")
    if version > own:
        raise FeedError(f"feed version {version} is newer than this node's {own}: upgrade the node")
    return version


def decode_op(raw: object, where: str, version: int) -> Op:
    """Validate one feed operation completely (exact keys of ``version``)."""
    if type(raw) is not dict and not isinstance(raw, Mapping):
        raise InvalidEntry(f"{where}: expected an object, got {type(raw).__name__}")
    op = raw.get("op")
    if op == "upsert":
        return decode_entry(raw, where)
    if op == "delete":
        _require_keys(raw, _DELETE_KEYS, where)
        return Delete(
            thumbprint(raw, where),
            text(raw, "device_uid", DEVICE_UID_RE, where),
            text(raw, "group_id", GROUP_ID_RE, where),
        )
    if op == "policy" and version >= POLICY_VERSION:
        return _decode_policy(raw, where)
    if op == "trust" and version >= TRUST_VERSION:
        return _decode_trust(raw, where, trust_kinds_of(version))
    allowed = ", ".join(_OPS_OF_VERSION[min(version, FEED_VERSION)])
    raise InvalidEntry(f"{where}.op: expected {allowed} (version {version}), got {_show(op)}")


_OPS_OF_VERSION = {
    1: ("'upsert'", "'delete'"),
    2: ("'upsert'", "'delete'", "'policy'"),
    3: ("'upsert'", "'delete'", "'policy'", "'trust'"),
    4: ("'upsert'", "'delete'", "'policy'", "'trust'"),
    5: ("'upsert'", "'delete'", "'policy'", "'trust'"),
}


def _decode_trust(raw: Mapping[Any, Any], where: str, kinds: frozenset[str]) -> TrustUpdate:
    _require_keys(raw, _TRUST_KEYS, where)
    kind = raw["kind"]
    if kind not in kinds:
        raise InvalidEntry(f"{where}.kind: expected one of {sorted(kinds)}, got {_show(kind)}")
    rotation = raw["rotation"]
    if type(rotation) is not int or not 0 < rotation <= MAX_NOT_AFTER:
        raise InvalidEntry(f"{where}.rotation: expected a rotation id, got {_show(rotation)}")
    sealed: Mapping[Any, Any] | None = None
    if kind == TUNNEL_IDENTITY:
        sealed = _mapping(raw["sealed_key"], _SEALED_KEYS, f"{where}.sealed_key")
    elif raw["sealed_key"] is not None:
        raise InvalidEntry(f"{where}.sealed_key: must be null for {kind}")
    texts = [raw["certificate"], raw["trust"], *(sealed or {}).values()]
    if not all(isinstance(t, str) and 0 < len(t) <= MAX_TRUST_TEXT for t in texts):
        raise InvalidEntry(f"{where}: certificate, trust and sealed_key fields must be text")
    return TrustUpdate(
        kind,
        choice(raw, "phase", _PHASES, where),
        rotation,
        raw["certificate"],
        None if sealed is None else dict(sealed),
        raw["trust"],
    )


def tunnel_key_context(group_id: str, tunnel_thumbprint: str) -> bytes:
    """What a sealed tunnel identity key is for (``pki.keywrap`` context): the group and
    the certificate the key belongs to, so that a sealed key cannot pass for another."""
    return f"tunnel-identity:{group_id}:{tunnel_thumbprint}".encode()


def split_trust(entries: list[object], version: int) -> tuple[list[TrustUpdate], list[object]]:
    """The trust operations of a batch (validated) and the rest (for the device table).
    A node applies trust operations itself; the table never holds them."""
    trust: list[TrustUpdate] = []
    rest: list[object] = []
    for i, raw in enumerate(entries):
        if isinstance(raw, Mapping) and raw.get("op") == "trust":
            decoded = decode_op(raw, f"entries[{i}]", version)
            assert isinstance(decoded, TrustUpdate)
            trust.append(decoded)
        else:
            rest.append(raw)
    return trust, rest


def snapshot_trust(raw: object, where: str, version: int) -> tuple[TrustUpdate, ...]:
    """The ``trust`` list of a snapshot page of ``version`` 4 or later (docs/CONVENTIONS.md,
    "Snapshot pages"): the trust operations in use at the page's seq, each validated as
    in a batch, at most one in use and one prepared per kind."""
    if type(raw) is not list or len(raw) > MAX_SNAPSHOT_TRUST:
        raise InvalidEntry(f"{where}: expected a list of at most {MAX_SNAPSHOT_TRUST} operations")
    ops: list[TrustUpdate] = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or item.get("op") != "trust":
            raise InvalidEntry(f"{where}[{i}]: expected a trust operation")
        decoded = decode_op(item, f"{where}[{i}]", version)
        assert isinstance(decoded, TrustUpdate)
        ops.append(decoded)
    roles = [(op.kind, op.is_next) for op in ops]
    if len(set(roles)) != len(roles):
        raise InvalidEntry(f"{where}: two operations of the same kind and role")
    return tuple(ops)


def decode_entry(raw: Mapping[Any, Any], where: str) -> Entry:
    _require_keys(raw, _UPSERT_KEYS, where)
    bundle = raw["app_bundle_id"]
    return Entry(
        thumbprint(raw, where),
        text(raw, "device_uid", DEVICE_UID_RE, where),
        text(raw, "group_id", GROUP_ID_RE, where),
        None if bundle is None else text(raw, "app_bundle_id", BUNDLE_ID_RE, where),
        choice(raw, "enrollment_status", _ENROLLMENT, where),
        choice(raw, "compliance_status", _COMPLIANCE, where),
        boolean(raw, "blocked", where),
        timestamp(raw, "not_after", where),
    )


def _kerberos_json(kerberos: Mapping[str, Any]) -> dict[str, list[str]]:
    """The realms that have KDCs, as JSON (a realm with none is not served)."""
    return {realm: list(kdcs) for realm, kdcs in sorted(kerberos.items()) if kdcs}


def _decode_kerberos(raw: object, where: str) -> dict[str, tuple[str, ...]]:
    from certgate.tunnel.kdcproxy import KDC_LIMITS, KDCAddress  # no feed import there

    if type(raw) is not dict or not 0 < len(raw) <= KDC_LIMITS.max_realms:
        raise InvalidEntry(f"{where}: expected an object of at most {KDC_LIMITS.max_realms} realms")
    realms: dict[str, tuple[str, ...]] = {}
    for realm, kdcs in raw.items():
        if not isinstance(kdcs, list) or not 0 < len(kdcs) <= KDC_LIMITS.max_kdcs:
            raise InvalidEntry(f"{where}.{_show(realm)}: expected 1-{KDC_LIMITS.max_kdcs} KDCs")
        try:
            realms[KDCAddress.check_realm(realm)] = tuple(KDCAddress.parse(k).text for k in kdcs)
        except ValueError as exc:
            raise InvalidEntry(f"{where}.{_show(realm)}: {exc}") from exc
    return realms


def _decode_policy(raw: Mapping[Any, Any], where: str) -> PolicyUpdate:
    kerberos = {}
    if _KERBEROS_KEY in raw:
        kerberos = _decode_kerberos(raw[_KERBEROS_KEY], f"{where}.{_KERBEROS_KEY}")
        raw = {key: value for key, value in raw.items() if key != _KERBEROS_KEY}
    _require_keys(raw, _POLICY_KEYS, where)
    version = raw["version"]
    if type(version) is not int or not 0 <= version <= MAX_NOT_AFTER:
        raise InvalidEntry(f"{where}.version: expected a policy version, got {_show(version)}")
    feed = _mapping(raw["feed"], frozenset(_FEED_KEYS), f"{where}.feed")
    tunnel = _mapping(raw["tunnel"], frozenset(_TUNNEL_KEYS), f"{where}.tunnel")
    long_poll, staleness = (_seconds(feed, key, f"{where}.feed") for key in _FEED_KEYS)
    if 2 * long_poll > staleness:
        raise InvalidEntry(f"{where}.feed: long_poll_s must be at most half of max_staleness_s")
    device_rules = raw["device_rules"]
    if type(device_rules) is not dict:
        raise InvalidEntry(f"{where}.device_rules: expected an object")
    try:
        server_rules = RuleSet.from_dict(raw["server_rules"])
    except ConfigError as exc:
        raise InvalidEntry(f"{where}.server_rules: {exc}") from exc
    ports = [_port(tunnel, key, f"{where}.tunnel") for key in _TUNNEL_KEYS]
    return PolicyUpdate(
        version,
        server_rules,
        dict(device_rules),
        long_poll,
        staleness,
        ports[0],
        ports[1],
        kerberos,
    )


# Field checks, shared with the table's packed decoding of snapshot pages.


def thumbprint(raw: Mapping[Any, Any], where: str) -> str:
    value = raw["thumbprint"]
    if not (isinstance(value, str) and is_thumbprint(value)):
        raise InvalidEntry(f"{where}.thumbprint: expected 64 lower-case hex, got {_show(value)}")
    return value


def text(raw: Mapping[Any, Any], key: str, pattern: Pattern[str], where: str) -> str:
    value = raw[key]
    if not (isinstance(value, str) and pattern.fullmatch(value)):
        raise InvalidEntry(f"{where}.{key}: expected {pattern.pattern}, got {_show(value)}")
    return value


def choice(raw: Mapping[Any, Any], key: str, allowed: Mapping[str, _T], where: str) -> _T:
    value = raw[key]
    if not isinstance(value, str) or value not in allowed:
        raise InvalidEntry(f"{where}.{key}: expected one of {sorted(allowed)}, got {_show(value)}")
    return allowed[value]


def boolean(raw: Mapping[Any, Any], key: str, where: str) -> bool:
    value = raw[key]
    if type(value) is not bool:
        raise InvalidEntry(f"{where}.{key}: expected a boolean, got {_show(value)}")
    return value


def timestamp(raw: Mapping[Any, Any], key: str, where: str) -> int:
    value = raw[key]
    # type() rather than isinstance(): JSON true must not pass as the integer 1.
    if type(value) is not int or not 0 <= value <= MAX_NOT_AFTER:
        raise InvalidEntry(f"{where}.{key}: expected epoch seconds, got {_show(value)}")
    return value


def _seconds(raw: Mapping[Any, Any], key: str, where: str) -> float:
    value = raw[key]
    if type(value) not in (int, float) or not 0 < value <= 30 * 24 * 3600:
        raise InvalidEntry(f"{where}.{key}: expected seconds in (0, 30 days], got {_show(value)}")
    return float(value)


def _port(raw: Mapping[Any, Any], key: str, where: str) -> int:
    value = raw[key]
    if type(value) is not int or not 1 <= value <= 65535:
        raise InvalidEntry(f"{where}.{key}: expected a port 1-65535, got {_show(value)}")
    return value


def _mapping(value: object, keys: frozenset[str], where: str) -> Mapping[Any, Any]:
    if type(value) is not dict:
        raise InvalidEntry(f"{where}: expected an object")
    _require_keys(value, keys, where)
    return value


def _require_keys(raw: Mapping[Any, Any], expected: frozenset[str], where: str) -> None:
    if raw.keys() != expected:  # a keys view compares as a set, without building one
        keys = set(raw)
        missing = sorted(expected - keys)
        extra = sorted(_show(key) for key in keys - expected)[:10]
        raise InvalidEntry(f"{where}: missing keys {missing}, unexpected keys {extra}")


def _show(value: object) -> str:
    """A short repr for error messages (the feed is signed, but keep logs bounded)."""
    rendered = repr(value)
    return rendered if len(rendered) <= 80 else rendered[:77] + "..."
