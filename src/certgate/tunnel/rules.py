"""Server traffic rules: which destinations a group's tunnel forwards to. Pure.

The console stores them per group (settings ``server_rules``) and ships them to its
tunnels; both sides parse them with ``RuleSet.from_dict``::

    {"default": "deny",
     "rules": [
       {"action": "deny",  "cidrs": ["127.0.0.0/8", "::1/128"]},
       {"action": "allow", "hosts": ["intranet.test", "*.corp.test"], "ports": [443, "8000-8080"]},
       {"action": "allow", "cidrs": ["10.20.0.0/16"], "ports": "any"}
     ]}

Semantics:

* First match wins; when nothing matches, ``default`` applies. A group with no rules, or
  a rule set without ``default``, denies everything (secure default, STYLE.md habit 7).
* A rule matches when the port is in one of its ``ports`` ranges (``"any"``, the default,
  is 1-65535) and the destination matches one of its ``hosts`` *or* its ``cidrs``.
* Hosts: ``intranet.test`` matches exactly that name; ``*.corp.test`` matches names below
  corp.test at any depth but not corp.test itself; ``*`` matches every destination. Names
  compare case-insensitively with one trailing dot removed (RFC 4343, RFC 1034 section
  3.1). Only ASCII is accepted; an ``xn--`` label must be valid punycode that round-trips
  through IDNA (RFC 5891 section 4.2.3.1 reserves every other ``??--`` label).
* CIDRs are checked against the addresses the shell will actually connect to: the IP
  literal itself, or the resolved addresses of a name, passed in by the caller (no DNS
  here). A DENY rule matches if *any* address is inside, so ``evil.test`` resolving to
  127.0.0.1 cannot slip past a deny on 127.0.0.0/8; an ALLOW rule matches only if *all*
  addresses are inside. IPv4-mapped IPv6 addresses are compared as IPv4. Because the
  first match wins, put DENY CIDR rules before ALLOW rules by name: an earlier
  ``allow *.corp.test`` admits ``x.corp.test`` whatever it resolves to.
* Transports: a rule applies to the transports in its ``protocols`` (``"tcp"``,
  ``"udp"``); without that key it applies to TCP only, which is what every rule meant
  before the tunnel carried UDP. ``default`` likewise applies to TCP only: UDP that no
  rule naming ``udp`` matches is denied, so an old ``"default": "allow"`` never opens UDP.
* A name with no resolved addresses is refused (``unresolved``): the shell must resolve
  first, evaluate, then connect only to the addresses it evaluated.
* Names whose last label looks numeric (``127.1``, ``0x7f.0.0.1``) are refused: host
  names never end in a numeric label (RFC 1123 section 2.1), and resolvers parse such
  strings as IPv4 shorthand.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from encodings import idna
from enum import Enum
from typing import TypeGuard

from certgate.errors import ConfigError

__all__ = [
    "ANY_PORT",
    "Action",
    "InvalidRules",
    "PortRange",
    "Rule",
    "RuleDecision",
    "RuleReason",
    "RuleSet",
    "Transport",
    "canonical_host_pattern",
    "canonical_name",
    "evaluate",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_RULES = 1000
MAX_ITEMS_PER_RULE = 1000
_MAX_NAME_LENGTH = 253  # RFC 1035 section 2.3.4, without the trailing dot
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # RFC 1123 section 2.1
_NUMERIC_LABEL_RE = re.compile(r"[0-9]+|0x[0-9a-f]*")
_PORT_RANGE_RE = re.compile(r"([0-9]{1,5})-([0-9]{1,5})")
_RULE_KEYS = frozenset({"action", "hosts", "ports", "cidrs", "protocols"})
_ACTIONS = ("allow", "deny")


def _is_int(value: object) -> TypeGuard[int]:
    return type(value) is int  # not bool: JSON true is not port 1


class InvalidRules(ConfigError, ValueError):
    """A rule set is malformed. Also a ValueError, which the console's settings API
    already translates to 400."""


class Action(Enum):
    ALLOW = "allow"
    DENY = "deny"


class Transport(Enum):
    TCP = "tcp"
    UDP = "udp"


ONLY_TCP = (Transport.TCP,)  # a rule without ``protocols``: what rules meant before UDP


class RuleReason(Enum):
    """Why ``evaluate`` decided as it did. Values are stable for logs and metrics."""

    MATCHED = "matched"
    DEFAULT = "default"
    INVALID_HOST = "invalid_host"
    INVALID_PORT = "invalid_port"
    UNRESOLVED = "unresolved"


@dataclass(frozen=True, slots=True)
class PortRange:
    low: int
    high: int

    def __post_init__(self) -> None:
        if not (_is_int(self.low) and _is_int(self.high) and 1 <= self.low <= self.high <= 65535):
            raise InvalidRules(f"invalid port range {self.low!r}-{self.high!r}")

    def __contains__(self, port: int) -> bool:
        return self.low <= port <= self.high


ANY_PORT = (PortRange(1, 65535),)


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule; hosts must already be canonical (``canonical_host_pattern``)."""

    action: Action
    hosts: tuple[str, ...] = ()
    ports: tuple[PortRange, ...] = ANY_PORT
    cidrs: tuple[IPNetwork, ...] = ()
    protocols: tuple[Transport, ...] = ONLY_TCP

    def __post_init__(self) -> None:
        if not self.protocols or not all(isinstance(p, Transport) for p in self.protocols):
            raise InvalidRules("a rule needs at least one transport (tcp, udp)")
        if not isinstance(self.action, Action):
            raise InvalidRules(f"invalid action {self.action!r}")
        if not all(isinstance(f, tuple) for f in (self.hosts, self.ports, self.cidrs)):
            raise InvalidRules("hosts, ports and cidrs must be tuples")
        if not self.hosts and not self.cidrs:
            raise InvalidRules("a rule needs at least one host pattern or CIDR")
        if not self.ports or not all(isinstance(p, PortRange) for p in self.ports):
            raise InvalidRules("a rule needs at least one port range")
        for pattern in self.hosts:
            if not isinstance(pattern, str) or canonical_host_pattern(pattern) != pattern:
                raise InvalidRules(f"host pattern {pattern!r} is not canonical")
        if not all(
            isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network) for n in self.cidrs
        ):
            raise InvalidRules("cidrs must be ip_network objects")


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Rules in order, and what applies when none matches (deny unless told otherwise)."""

    rules: tuple[Rule, ...] = ()
    default_action: Action = Action.DENY

    def __post_init__(self) -> None:
        if not isinstance(self.rules, tuple) or not all(isinstance(r, Rule) for r in self.rules):
            raise InvalidRules("rules must be a tuple of Rule")
        if not isinstance(self.default_action, Action):
            raise InvalidRules(f"invalid default action {self.default_action!r}")

    @classmethod
    def from_dict(cls, data: object) -> RuleSet:
        """Parse and validate the JSON form (see the module docstring); raise InvalidRules."""
        if not isinstance(data, Mapping) or not {"rules"} <= set(data) <= {"rules", "default"}:
            raise InvalidRules("server rules need 'rules' and optionally 'default'")
        raw_rules = _list(data["rules"], "rules", MAX_RULES)
        rules = tuple(_parse_rule(raw, f"rules[{i}]") for i, raw in enumerate(raw_rules))
        default = _action(data.get("default", Action.DENY.value), "default")
        return cls(rules, default)

    @classmethod
    def from_json(cls, text: str | bytes) -> RuleSet:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidRules(f"server rules are not JSON: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, object]:
        """The JSON form; ``from_dict(to_dict())`` returns an equal rule set."""
        return {"default": self.default_action.value, "rules": [_rule_dict(r) for r in self.rules]}


@dataclass(frozen=True, slots=True)
class RuleDecision:
    allowed: bool
    rule_index: int | None  # None: the default applied, or the destination was invalid
    reason: RuleReason


@dataclass(frozen=True, slots=True)
class _Destination:
    name: str | None  # canonical host name; None for an IP literal
    addresses: tuple[IPAddress, ...]


def evaluate(
    ruleset: RuleSet,
    host: str,
    port: int,
    resolved_ips: Iterable[IPAddress] = (),
    transport: Transport = Transport.TCP,
) -> RuleDecision:
    """Decide whether the tunnel may carry ``transport`` to ``host``:``port``.

    ``host`` is the request's host (a name, an IPv4 literal, or an IPv6 literal with or
    without brackets, RFC 3986 section 3.2.2); ``resolved_ips`` are the addresses the
    shell resolved for a name and will connect to. Never raises for bad input: it denies.
    """
    if not _is_int(port) or not 1 <= port <= 65535:
        return RuleDecision(False, None, RuleReason.INVALID_PORT)
    destination = _destination(host, resolved_ips)
    if destination is None:
        return RuleDecision(False, None, RuleReason.INVALID_HOST)
    if not destination.addresses:
        return RuleDecision(False, None, RuleReason.UNRESOLVED)
    for index, rule in enumerate(ruleset.rules):
        if transport in rule.protocols and _rule_matches(rule, destination, port):
            return RuleDecision(rule.action is Action.ALLOW, index, RuleReason.MATCHED)
    default_allows = ruleset.default_action is Action.ALLOW and transport is Transport.TCP
    return RuleDecision(default_allows, None, RuleReason.DEFAULT)


def canonical_host_pattern(pattern: str) -> str | None:
    """The canonical form of a host pattern (``name``, ``*.name`` or ``*``), or None."""
    if pattern == "*":
        return pattern
    if pattern.startswith("*."):
        suffix = canonical_name(pattern[2:])
        return None if suffix is None else "*." + suffix
    return canonical_name(pattern)


@functools.lru_cache(maxsize=4096)  # pure, and evaluated on every request
def canonical_name(host: str) -> str | None:
    """Lower-case ASCII form of a DNS host name without trailing dot, or None if invalid."""
    if not isinstance(host, str) or len(host) > _MAX_NAME_LENGTH + 1 or not host.isascii():
        return None
    name = host.lower().removesuffix(".")
    if not name or len(name) > _MAX_NAME_LENGTH:
        return None
    labels = name.split(".")
    if _NUMERIC_LABEL_RE.fullmatch(labels[-1]):
        return None
    if all(_LABEL_RE.fullmatch(label) and _valid_a_label(label) for label in labels):
        return name
    return None


def _valid_a_label(label: str) -> bool:
    if label[2:4] != "--":
        return True
    if not label.startswith("xn--"):
        return False  # RFC 5891 section 4.2.3.1: other "??--" labels are reserved
    try:
        unicode_label = label[4:].encode("ascii").decode("punycode")
        # IDNA ToASCII (RFC 3490 section 4.1) must give back exactly this label; an
        # all-ASCII or non-normalised decoding would not.
        return idna.ToASCII(unicode_label) == label.encode("ascii")
    except (UnicodeError, ValueError):
        return False


def _destination(host: object, resolved_ips: Iterable[IPAddress]) -> _Destination | None:
    resolved = tuple(resolved_ips)
    if not isinstance(host, str) or not all(_is_address(a) for a in resolved):
        return None
    resolved = tuple(_normalise_address(a) for a in resolved)
    literal = _ip_literal(host)
    if literal is not None:
        return _Destination(None, (literal, *resolved))
    name = canonical_name(host)
    return None if name is None else _Destination(name, resolved)


@functools.lru_cache(maxsize=4096)
def _ip_literal(host: str) -> IPAddress | None:
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        return None
    if bracketed and address.version != 6:
        return None  # brackets are for IPv6 only (RFC 3986 section 3.2.2)
    return _normalise_address(address)


def _normalise_address(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _rule_matches(rule: Rule, destination: _Destination, port: int) -> bool:
    if not any(port in ports for ports in rule.ports):
        return False
    if any(_host_matches(pattern, destination.name) for pattern in rule.hosts):
        return True
    if not rule.cidrs:
        return False
    inside = [any(a in network for network in rule.cidrs) for a in destination.addresses]
    # Deny if any address is inside; allow only if every address is.
    return any(inside) if rule.action is Action.DENY else all(inside)


def _host_matches(pattern: str, name: str | None) -> bool:
    if pattern == "*":
        return True
    if name is None:
        return False  # IP literals match CIDRs, not names
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])  # ".corp.test": subdomains only, never the apex
    return name == pattern


def _parse_rule(raw: object, where: str) -> Rule:
    if not isinstance(raw, Mapping) or "action" not in raw or not set(raw) <= _RULE_KEYS:
        raise InvalidRules(f"{where}: expected an object with 'action' and {sorted(_RULE_KEYS)}")
    hosts = tuple(
        _host_pattern(value, f"{where}.hosts[{i}]")
        for i, value in enumerate(_list(raw.get("hosts", []), f"{where}.hosts"))
    )
    cidrs = tuple(
        _network(value, f"{where}.cidrs[{i}]")
        for i, value in enumerate(_list(raw.get("cidrs", []), f"{where}.cidrs"))
    )
    ports = _ports(raw.get("ports", "any"), f"{where}.ports")
    protocols = _protocols(raw.get("protocols", ["tcp"]), f"{where}.protocols")
    try:
        return Rule(_action(raw["action"], f"{where}.action"), hosts, ports, cidrs, protocols)
    except InvalidRules as exc:
        raise InvalidRules(f"{where}: {exc}") from exc


def _host_pattern(value: object, where: str) -> str:
    pattern = canonical_host_pattern(value) if isinstance(value, str) else None
    if pattern is None:
        raise InvalidRules(f"{where}: invalid host pattern {value!r}")
    return pattern


def _network(value: object, where: str) -> IPNetwork:
    if not isinstance(value, str):
        raise InvalidRules(f"{where}: expected a CIDR string, got {value!r}")
    try:
        return ipaddress.ip_network(value, strict=True)  # host bits set: a typo, refuse
    except ValueError as exc:
        raise InvalidRules(f"{where}: {exc}") from exc


def _ports(value: object, where: str) -> tuple[PortRange, ...]:
    if value == "any":
        return ANY_PORT
    return tuple(_port_range(item, f"{where}[{i}]") for i, item in enumerate(_list(value, where)))


def _protocols(value: object, where: str) -> tuple[Transport, ...]:
    names = _list(value, where, len(Transport))
    if not names or not all(n in ("tcp", "udp") for n in names) or len(set(names)) < len(names):
        raise InvalidRules(f"{where}: expected a list of 'tcp' and/or 'udp', got {value!r}")
    return tuple(Transport(n) for n in names)


def _port_range(item: object, where: str) -> PortRange:
    if _is_int(item):
        low = high = item
    elif isinstance(item, str) and (match := _PORT_RANGE_RE.fullmatch(item)):
        low, high = int(match[1]), int(match[2])
    else:
        raise InvalidRules(f"{where}: expected a port or 'low-high', got {item!r}")
    try:
        return PortRange(low, high)
    except InvalidRules as exc:
        raise InvalidRules(f"{where}: {exc}") from exc


def _list(value: object, where: str, limit: int = MAX_ITEMS_PER_RULE) -> list[object]:
    if not isinstance(value, list) or len(value) > limit:
        raise InvalidRules(f"{where}: expected a list of at most {limit} items")
    return value


def _action(value: object, where: str) -> Action:
    if value not in _ACTIONS:
        raise InvalidRules(f"{where}: expected 'allow' or 'deny', got {value!r}")
    return Action(value)


def _is_address(value: object) -> TypeGuard[IPAddress]:
    return isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address)


def _rule_dict(rule: Rule) -> dict[str, object]:
    data: dict[str, object] = {
        "action": rule.action.value,
        "hosts": list(rule.hosts),
        "ports": "any" if rule.ports == ANY_PORT else [_port_text(p) for p in rule.ports],
        "cidrs": [str(network) for network in rule.cidrs],
    }
    if rule.protocols != ONLY_TCP:  # TCP-only rules keep the form they had before UDP
        data["protocols"] = [p.value for p in rule.protocols]
    return data


def _port_text(ports: PortRange) -> int | str:
    return ports.low if ports.low == ports.high else f"{ports.low}-{ports.high}"
