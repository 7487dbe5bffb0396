"""The schema of a group's settings: the one statement of what each setting may hold.

The API's request bodies (``PATCH /groups/{id}/settings``, a new group's ``settings``), the
web console's and the CLI's settings editors, and ``groups.validate_settings`` (on the
settings merged with the stored ones) validate with these models, so the OpenAPI document
says exactly what is accepted: enums, bounds, lengths, patterns. The patterns and bounds
are the parsers' own (``device.rules``, ``tunnel.rules``, ``tunnel.kdcproxy``); where a
parser checks more than a regular expression can say, the field names a ``format`` whose
meaning is that parser's function (below, and docs/CONVENTIONS.md) and calls it.

What no schema of one request can state is left to ``groups.validate_settings``, on the
merged settings (400 ``bad_request``): a tunnel needs a host name or an IP address, and the
feed's ``long_poll_s`` at most half its ``max_staleness_s``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    model_validator,
)
from pydantic import Strict as NoCoercion

from certgate.device import rules as device_rules
from certgate.tunnel import kdcproxy
from certgate.tunnel import rules as server_rules

__all__ = [
    "ENROLLMENT_PROTOCOLS",
    "FORMATS",
    "IP_FORMATS",
    "DeviceRulesIn",
    "EnrollmentSwitchesIn",
    "FeedIn",
    "Port",
    "ServerRulesIn",
    "SettingsIn",
    "TunnelIn",
    "whole",
]

ENROLLMENT_PROTOCOLS = ("est", "scep")
MAX_NAMES = 32  # tunnel host names or IP addresses: each one a SAN of the tunnel identity


def whole(value: Any) -> Any:
    """JSON has one number type, and JSON Schema counts 3.0 as the integer 3; strict mode
    alone would refuse it. Only that: "3", 3.5 and true stay refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_Whole = BeforeValidator(whole)


def _checked(check: Callable[[str], object], what: str) -> AfterValidator:
    """A validator calling a parser's own check: a ``None`` or a ``ValueError`` refuses."""

    def validate(value: str) -> str:
        try:
            accepted = check(value) is not None
        except ValueError as exc:
            raise ValueError(f"not {what}: {exc}") from exc
        if not accepted:
            raise ValueError(f"not {what}")
        return value

    return AfterValidator(validate)


def _text(pattern: str, max_length: int, format_name: str | None = None) -> Any:
    extra: dict[str, Any] = {} if format_name is None else {"format": format_name}
    return Field(pattern=f"^(?:{pattern})$", max_length=max_length, json_schema_extra=extra)


# Regular expressions in the syntax JSON Schema shares with Python (no lookaround).
LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"  # RFC 1123 §2.1, any case
DNS_NAME = rf"(?:{LABEL}\.)*{LABEL}\.?"
PORT = r"6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}"


def _port_range(text: str) -> server_rules.PortRange:
    low, high = text.split("-")
    return server_rules.PortRange(int(low), int(high))  # low <= high, or InvalidRules


def _network(text: str) -> object:
    return ipaddress.ip_network(text, strict=True)  # host bits set: a typo, refused


# Formats beyond a regular expression, each the parser's own function (CONVENTIONS.md).
FORMATS: dict[str, tuple[Callable[[str], object], str]] = {
    # LDH labels, not ending in a numeric label, every ``xn--`` label a valid A-label
    "dns-name": (server_rules.canonical_name, "a DNS host name"),
    # a dns-name, ``*.`` and a dns-name (names below it), or ``*``
    "host-pattern": (server_rules.canonical_host_pattern, "a host pattern"),
    # an IPv4 or IPv6 network in CIDR notation without host bits set
    "ip-network": (_network, "a network in CIDR notation"),
    # ``low-high``, 1 <= low <= high <= 65535
    "port-range": (_port_range, "a port range low-high"),
}


def _formatted(pattern: str, max_length: int, format_name: str) -> tuple[Any, AfterValidator]:
    """A string's metadata: its pattern, length and format, and the format's check."""
    return _text(pattern, max_length, format_name), _checked(*FORMATS[format_name])


DnsName = Annotated[str, *_formatted(DNS_NAME, 253, "dns-name")]
HostPattern = Annotated[str, *_formatted(rf"\*|(?:\*\.)?{DNS_NAME}", 255, "host-pattern")]
Network = Annotated[str, *_formatted(r"[0-9A-Fa-f:.]+/[0-9]{1,3}", 49, "ip-network")]
PortRangeText = Annotated[str, *_formatted(rf"(?:{PORT})-(?:{PORT})", 11, "port-range")]
IP_FORMATS: dict[str, Any] = {"anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}
IPAddress = Annotated[
    str,
    Field(max_length=45, json_schema_extra=IP_FORMATS),
    _checked(ipaddress.ip_address, "an IP address"),
]
Port = Annotated[int, Field(ge=1, le=65535), NoCoercion(), _Whole]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TunnelIn(_Strict):
    """Where the group's tunnel nodes are reached (the tunnel identity's names)."""

    hostnames: list[DnsName] | None = Field(None, max_length=MAX_NAMES)
    ip_addresses: list[IPAddress] | None = Field(None, max_length=MAX_NAMES)
    proxy_port: Port | None = None
    per_app_port: Port | None = None


class FeedIn(_Strict):
    """How long a node's long-poll waits, and how old its table may grow before it admits
    nothing new; ``long_poll_s`` at most half ``max_staleness_s`` (checked when merged)."""

    long_poll_s: Annotated[int, Field(ge=1, le=300), NoCoercion(), _Whole] | None = None
    max_staleness_s: (
        Annotated[int, Field(ge=10, le=30 * 24 * 3600), NoCoercion(), _Whole] | None
    ) = None


_DevicePatterns = Field(min_length=1, max_length=device_rules.MAX_RULES)
AppPattern = Annotated[str, _text(rf"\*|{device_rules.APP_PATTERN}", 257)]
DomainPattern = Annotated[str, _text(rf"\*|{device_rules.DOMAIN_PATTERN}", 255)]


class DeviceRuleIn(_Strict):
    apps: list[AppPattern] = _DevicePatterns
    domains: list[DomainPattern] = _DevicePatterns
    action: Literal["tunnel", "bypass", "block"]


class DeviceRulesIn(_Strict):
    """The device's traffic rules (``device.rules``): first match wins, else ``default``."""

    default: Literal["tunnel", "bypass", "block"] | None = None
    rules: list[DeviceRuleIn] | None = Field(None, max_length=device_rules.MAX_RULES)


_Items = Field(None, max_length=server_rules.MAX_ITEMS_PER_RULE)
_SomeItems = Field(min_length=1, max_length=server_rules.MAX_ITEMS_PER_RULE)
# A rule names hosts or networks (``tunnel.rules.Rule``): said in the schema as anyOf.
_NAMES_SOMETHING: dict[str, Any] = {
    "anyOf": [
        {"required": [field], "properties": {field: {"type": "array", "minItems": 1}}}
        for field in ("hosts", "cidrs")
    ]
}


class ServerRuleIn(_Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_NAMES_SOMETHING)

    action: Literal["allow", "deny"]
    hosts: list[HostPattern] | None = _Items
    cidrs: list[Network] | None = _Items
    ports: Literal["any"] | Annotated[list[Port | PortRangeText], _SomeItems] | None = None
    protocols: list[Literal["tcp", "udp"]] | None = Field(
        None, min_length=1, max_length=2, json_schema_extra={"uniqueItems": True}
    )

    @model_validator(mode="after")
    def _names_something(self) -> ServerRuleIn:
        if not self.hosts and not self.cidrs:
            raise ValueError("a rule needs at least one host pattern or CIDR")
        if self.protocols is not None and len(set(self.protocols)) < len(self.protocols):
            raise ValueError("protocols: each of tcp, udp at most once")
        return self


class ServerRulesIn(_Strict):
    """Which destinations the group's tunnel forwards to (``tunnel.rules``)."""

    default: Literal["allow", "deny"] | None = None
    rules: list[ServerRuleIn] | None = Field(None, max_length=server_rules.MAX_RULES)


class EnrollmentSwitchesIn(_Strict):
    """Which enrollment protocols the group answers (``ENROLLMENT_PROTOCOLS``)."""

    est: StrictBool | None = None
    scep: StrictBool | None = None


assert set(EnrollmentSwitchesIn.model_fields) == set(ENROLLMENT_PROTOCOLS)

Realm = Annotated[str, _text(kdcproxy.REALM_PATTERN, 255)]
KDC = Annotated[str, _text(rf"(?:(?:tcp|udp)/)?{kdcproxy.KDC_HOST_PATTERN}(?::(?:{PORT}))?", 300)]
Kerberos = Annotated[
    dict[Realm, Annotated[list[KDC], Field(max_length=kdcproxy.KDC_LIMITS.max_kdcs)]],
    Field(
        max_length=kdcproxy.KDC_LIMITS.max_realms,
        json_schema_extra={"additionalProperties": False},
    ),
]


class SettingsIn(_Strict):
    """A change of settings: each key given replaces or (objects) merges into the stored
    value; ``null`` or absent leaves it as it is."""

    tunnel: TunnelIn | None = None
    feed: FeedIn | None = None
    device_rules: DeviceRulesIn | None = None
    server_rules: ServerRulesIn | None = None
    initial_compliance: Literal["compliant", "noncompliant", "unknown"] | None = None
    enrollment: EnrollmentSwitchesIn | None = None
    kerberos: Kerberos | None = None  # {realm: [KDC]}: the tunnel's KDC proxy

    def changes(self) -> dict[str, Any]:
        """What the request sets, as stored: nulls and absent keys left out."""
        return self.model_dump(exclude_none=True)
