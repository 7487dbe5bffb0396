"""certgate.console.services.settings: the settings schema accepts what the rule parsers
accept and refuses the rest with the field's path; what only the merged settings can
break is groups.validate_settings' 400."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from certgate.console.services import groups
from certgate.console.services.settings import (
    DNS_NAME,
    HostPattern,
    Network,
    PortRangeText,
    SettingsIn,
)
from certgate.device.rules import DeviceRules
from certgate.errors import BadRequest
from certgate.tunnel import rules
from certgate.tunnel.rules import RuleSet

GOOD: dict[str, Any] = {
    "tunnel": {"hostnames": ["tunnel.example", "xn--bcher-kva.example"], "proxy_port": 2020.0},
    "feed": {"long_poll_s": 10, "max_staleness_s": 60},
    "device_rules": {
        "default": "block",
        "rules": [{"apps": ["com.example.*"], "domains": ["*.corp.test"], "action": "tunnel"}],
    },
    "server_rules": {
        "default": "deny",
        "rules": [
            {"action": "deny", "cidrs": ["127.0.0.0/8", "::1/128"]},
            {"action": "allow", "hosts": ["*.corp.test"], "ports": [443, "8000-8080"]},
            {"action": "allow", "cidrs": ["10.20.0.0/16"], "protocols": ["udp", "tcp"]},
        ],
    },
    "kerberos": {"CORP.TEST": ["kdc.corp.test", "udp/[::1]:88"]},
    "enrollment": {"est": True},
}


def test_what_the_parsers_accept_is_accepted_and_stored_as_sent() -> None:
    changes = SettingsIn.model_validate(GOOD).changes()
    assert changes["tunnel"]["proxy_port"] == 2020  # a whole float is the integer
    assert changes["server_rules"] == GOOD["server_rules"]  # no defaults added
    DeviceRules.from_dict(changes["device_rules"])
    RuleSet.from_dict(changes["server_rules"])


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        (("tunnel", "hostnames"), ["127.1"], "tunnel.hostnames.0"),  # numeric last label
        (("tunnel", "hostnames"), ["xn--zz.example"], "tunnel.hostnames.0"),  # no A-label
        (("tunnel", "ip_addresses"), ["1.2.3"], "tunnel.ip_addresses.0"),
        (("tunnel", "proxy_port"), 0, "tunnel.proxy_port"),
        (("feed", "long_poll_s"), True, "feed.long_poll_s"),
        (("feed", "max_staleness_s"), 9, "feed.max_staleness_s"),
        (("device_rules", "default"), "allow", "device_rules.default"),
        (("server_rules", "rules"), [{"action": "allow"}], "server_rules.rules.0"),
        (("server_rules", "rules"), [{"action": "allow", "cidrs": ["10.0.0.1/8"]}], "cidrs.0"),
        (("server_rules", "rules"), [{"action": "allow", "hosts": ["a"], "ports": ["9-8"]}], ""),
        (("server_rules", "rules"), [{"action": "allow", "hosts": ["a"], "ports": []}], ""),
        (("kerberos",), {"BAD REALM": []}, "kerberos.BAD REALM"),
        (("kerberos",), {"R": ["kdc:65536"]}, "kerberos.R.0"),
    ],
)
def test_what_a_parser_refuses_is_refused_with_its_path(
    path: tuple[str, ...], value: object, where: str
) -> None:
    body = copy.deepcopy(GOOD)
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with pytest.raises(ValidationError) as refused:
        SettingsIn.model_validate(body)
    assert where in groups.problems(refused.value)


NAMES = st.from_regex(rf"\A(?:\*|(?:\*\.)?{DNS_NAME})\Z").filter(lambda n: len(n) <= 255)


@given(NAMES)
def test_host_patterns_are_what_the_tunnel_parser_accepts(pattern: str) -> None:
    accepted = rules.canonical_host_pattern(pattern) is not None
    try:
        TypeAdapter(HostPattern).validate_python(pattern)
    except ValidationError:
        assert not accepted
    else:
        assert accepted


@given(st.ip_addresses(), st.integers(0, 128))
def test_networks_are_what_the_tunnel_parser_accepts(address: Any, bits: int) -> None:
    text = f"{address}/{bits}"
    try:
        ipaddress.ip_network(text, strict=True)
        accepted = True
    except ValueError:
        accepted = False
    try:
        TypeAdapter(Network).validate_python(text)
    except ValidationError:
        assert not accepted
    else:
        assert accepted


@given(st.integers(1, 65535), st.integers(1, 65535))
def test_port_ranges_are_what_the_tunnel_parser_accepts(low: int, high: int) -> None:
    text = f"{low}-{high}"
    try:
        TypeAdapter(PortRangeText).validate_python(text)
    except ValidationError:
        assert low > high
    else:
        assert RuleSet.from_dict({"rules": [{"action": "allow", "hosts": ["*"], "ports": [text]}]})


def _stored(**changes: Any) -> dict[str, Any]:
    return {**copy.deepcopy(groups.DEFAULT_SETTINGS), **changes}


def test_the_merged_settings_keep_the_rules_no_schema_of_a_request_states() -> None:
    groups.validate_settings(_stored())
    with pytest.raises(BadRequest, match="at most half"):
        groups.validate_settings(_stored(feed={"long_poll_s": 200, "max_staleness_s": 300}))
    empty = {**groups.DEFAULT_SETTINGS["tunnel"], "hostnames": [], "ip_addresses": []}
    with pytest.raises(BadRequest, match="at least one hostname or IP"):
        groups.validate_settings(_stored(tunnel=empty))
    with pytest.raises(BadRequest, match=r"settings: server_rules\.default"):
        groups.validate_settings(_stored(server_rules={"default": "maybe", "rules": []}))
