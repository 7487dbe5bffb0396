"""Tests for certgate.tunnel.rules: strict parsing, first-match evaluation, CIDR bypasses."""

from __future__ import annotations

import ipaddress
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certgate.errors import ConfigError
from certgate.tunnel.rules import (
    ANY_PORT,
    MAX_RULES,
    Action,
    InvalidRules,
    PortRange,
    Rule,
    RuleDecision,
    RuleReason,
    RuleSet,
    Transport,
    canonical_host_pattern,
    canonical_name,
    evaluate,
)

ip = ipaddress.ip_address

RULES = RuleSet.from_dict(
    {
        "default": "deny",
        "rules": [
            {"action": "deny", "cidrs": ["127.0.0.0/8", "::1/128", "169.254.0.0/16"]},
            {"action": "allow", "hosts": ["intranet.test", "*.corp.test"], "ports": [443]},
            {"action": "deny", "hosts": ["secret.corp.test"]},
            {"action": "allow", "hosts": ["*.corp.test"], "ports": ["8000-8080"]},
            {"action": "allow", "cidrs": ["10.20.0.0/16", "2001:db8::/32"]},
            {"action": "deny", "hosts": ["*"], "ports": [25]},
        ],
    }
)


class Case(NamedTuple):
    name: str
    host: Any
    port: Any
    resolved: tuple[str, ...]
    expected: RuleDecision


def allowed(index: int) -> RuleDecision:
    return RuleDecision(True, index, RuleReason.MATCHED)


def denied(index: int) -> RuleDecision:
    return RuleDecision(False, index, RuleReason.MATCHED)


DEFAULT = RuleDecision(False, None, RuleReason.DEFAULT)
INVALID_HOST = RuleDecision(False, None, RuleReason.INVALID_HOST)
INVALID_PORT = RuleDecision(False, None, RuleReason.INVALID_PORT)
UNRESOLVED = RuleDecision(False, None, RuleReason.UNRESOLVED)
PUBLIC = ("192.0.2.10",)

CASES = [
    Case("exact", "intranet.test", 443, PUBLIC, allowed(1)),
    Case("exact-other-port", "intranet.test", 80, PUBLIC, DEFAULT),
    Case("case-insensitive", "InTrAnEt.TEST", 443, PUBLIC, allowed(1)),
    Case("trailing-dot", "intranet.test.", 443, PUBLIC, allowed(1)),
    Case("wildcard-one-level", "wiki.corp.test", 443, PUBLIC, allowed(1)),
    Case("wildcard-deep", "a.b.corp.test", 443, PUBLIC, allowed(1)),
    Case("wildcard-not-apex", "corp.test", 443, PUBLIC, DEFAULT),
    Case("wildcard-not-suffix", "evilcorp.test", 443, PUBLIC, DEFAULT),
    Case("first-match-wins-allow", "secret.corp.test", 443, PUBLIC, allowed(1)),
    Case("first-match-wins-deny", "secret.corp.test", 8080, PUBLIC, denied(2)),
    Case("port-range", "wiki.corp.test", 8000, PUBLIC, allowed(3)),
    Case("port-range-end", "wiki.corp.test", 8081, PUBLIC, DEFAULT),
    Case("deny-cidr-beats-name", "evil.corp.test", 443, ("127.0.0.1",), denied(0)),
    Case("deny-cidr-any-address", "evil.test", 443, ("192.0.2.1", "169.254.169.254"), denied(0)),
    Case("deny-cidr-ipv6-resolved", "evil.test", 443, ("::1",), denied(0)),
    Case("deny-cidr-mapped-resolved", "evil.test", 443, ("::ffff:127.0.0.1",), denied(0)),
    Case("deny-cidr-literal", "127.0.0.1", 443, (), denied(0)),
    Case("deny-cidr-mapped-literal", "[::ffff:127.0.0.1]", 443, (), denied(0)),
    Case("deny-cidr-bracketed-v6", "[::1]", 443, (), denied(0)),
    Case("allow-cidr-name", "db.test", 5432, ("10.20.1.1",), allowed(4)),
    Case("allow-cidr-needs-all", "db.test", 5432, ("10.20.1.1", "192.0.2.1"), DEFAULT),
    Case("allow-cidr-literal", "10.20.3.4", 22, (), allowed(4)),
    Case("allow-cidr-v6-literal", "2001:db8::5", 22, (), allowed(4)),
    Case("star-matches-literal", "192.0.2.7", 25, (), denied(5)),
    Case("star-matches-name", "mail.test", 25, PUBLIC, denied(5)),
    Case("unresolved-name", "intranet.test", 443, (), UNRESOLVED),
    Case("numeric-shorthand", "127.1", 443, ("127.0.0.1",), INVALID_HOST),
    Case("hex-shorthand", "0x7f.0.0.1", 443, ("127.0.0.1",), INVALID_HOST),
    Case("non-ascii", "bücher.corp.test", 443, PUBLIC, INVALID_HOST),
    Case("punycode", "xn--bcher-kva.corp.test", 443, PUBLIC, allowed(1)),
    Case("bad-punycode", "xn--a.corp.test", 443, PUBLIC, INVALID_HOST),
    Case("reserved-hyphens", "ab--c.corp.test", 443, PUBLIC, INVALID_HOST),
    Case("empty-label", "a..corp.test", 443, PUBLIC, INVALID_HOST),
    Case("empty", "", 443, PUBLIC, INVALID_HOST),
    Case("underscore", "a_b.corp.test", 443, PUBLIC, INVALID_HOST),
    Case("bracketed-v4", "[10.20.0.1]", 443, (), INVALID_HOST),
    Case("too-long", "a." * 130 + "test", 443, PUBLIC, INVALID_HOST),
    Case("not-a-string", b"intranet.test", 443, PUBLIC, INVALID_HOST),
    Case("port-zero", "intranet.test", 0, PUBLIC, INVALID_PORT),
    Case("port-too-big", "intranet.test", 65536, PUBLIC, INVALID_PORT),
    Case("port-bool", "intranet.test", True, PUBLIC, INVALID_PORT),
    Case("port-string", "intranet.test", "443", PUBLIC, INVALID_PORT),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_evaluate(case: Case) -> None:
    resolved = [ip(a) for a in case.resolved]
    assert evaluate(RULES, case.host, case.port, resolved) == case.expected


def test_non_address_resolutions_are_refused() -> None:
    resolved: list[Any] = ["127.0.0.1"]
    assert evaluate(RULES, "intranet.test", 443, resolved) == INVALID_HOST


def test_empty_rule_set_denies_everything() -> None:
    for ruleset in (RuleSet(), RuleSet.from_dict({"rules": []})):
        assert ruleset.default_action is Action.DENY
        assert evaluate(ruleset, "intranet.test", 443, [ip("192.0.2.1")]) == DEFAULT


def test_default_allow_still_honours_deny_cidrs() -> None:
    ruleset = RuleSet.from_dict(
        {"default": "allow", "rules": [{"action": "deny", "cidrs": ["10.0.0.0/8"]}]}
    )
    assert evaluate(ruleset, "internal.test", 80, [ip("10.1.2.3")]) == denied(0)
    allowed_by_default = evaluate(ruleset, "example.test", 80, [ip("192.0.2.1")])
    assert allowed_by_default == RuleDecision(True, None, RuleReason.DEFAULT)


def test_parsed_form() -> None:
    assert RULES.rules[1] == Rule(
        Action.ALLOW, ("intranet.test", "*.corp.test"), (PortRange(443, 443),), ()
    )
    assert RULES.rules[4].ports == ANY_PORT
    assert RULES.rules[4].cidrs == (
        ipaddress.ip_network("10.20.0.0/16"),
        ipaddress.ip_network("2001:db8::/32"),
    )


def test_patterns_are_normalised() -> None:
    ruleset = RuleSet.from_dict(
        {"rules": [{"action": "allow", "hosts": ["*.Corp.Test.", "XN--BCHER-KVA.test"]}]}
    )
    assert ruleset.rules[0].hosts == ("*.corp.test", "xn--bcher-kva.test")


def test_json_and_dict_round_trip() -> None:
    assert RuleSet.from_dict(RULES.to_dict()) == RULES
    assert RuleSet.from_json('{"rules": [], "default": "allow"}').default_action is Action.ALLOW


def rule(**fields: Any) -> dict[str, Any]:
    return {"rules": [{"action": "allow", "hosts": ["a.test"], **fields}]}


INVALID = [
    ("not-object", []),
    ("no-rules", {"default": "deny"}),
    ("extra-top-key", {"rules": [], "version": 1}),
    ("rules-not-list", {"rules": {}}),
    ("too-many-rules", {"rules": [{"action": "deny", "hosts": ["*"]}] * (MAX_RULES + 1)}),
    ("bad-default", {"rules": [], "default": "block"}),
    ("rule-not-object", {"rules": ["allow"]}),
    ("rule-no-action", {"rules": [{"hosts": ["a.test"]}]}),
    ("rule-extra-key", rule(comment="x")),
    ("bad-action", rule(action="permit")),
    ("action-unhashable", rule(action=["allow"])),
    ("no-destination", {"rules": [{"action": "allow", "ports": [443]}]}),
    ("empty-destination", rule(hosts=[], cidrs=[])),
    ("hosts-not-list", rule(hosts="a.test")),
    ("host-not-string", rule(hosts=[1])),
    ("host-bare-suffix-wildcard", rule(hosts=["*."])),
    ("host-inner-wildcard", rule(hosts=["a.*.test"])),
    ("host-double-wildcard", rule(hosts=["*.*.test"])),
    ("host-partial-wildcard", rule(hosts=["a*.test"])),
    ("host-ip-literal", rule(hosts=["10.0.0.1"])),
    ("host-non-ascii", rule(hosts=["bücher.test"])),
    ("host-bad-punycode", rule(hosts=["xn--a.test"])),
    ("host-space", rule(hosts=["a test"])),
    ("cidr-host-bits", rule(cidrs=["10.0.0.1/8"])),
    ("cidr-garbage", rule(cidrs=["ten/8"])),
    ("cidr-not-string", rule(cidrs=[167772160])),
    ("ports-empty", rule(ports=[])),
    ("ports-word", rule(ports="all")),
    ("port-zero", rule(ports=[0])),
    ("port-too-big", rule(ports=[65536])),
    ("port-bool", rule(ports=[True])),
    ("port-float", rule(ports=[443.0])),
    ("port-string", rule(ports=["443"])),
    ("port-range-backwards", rule(ports=["90-80"])),
    ("port-range-too-big", rule(ports=["1-70000"])),
    ("port-range-spaces", rule(ports=["80 - 90"])),
    ("protocols-empty", rule(protocols=[])),
    ("protocols-word", rule(protocols="udp")),
    ("protocols-unknown", rule(protocols=["icmp"])),
    ("protocols-repeated", rule(protocols=["udp", "udp"])),
]


@pytest.mark.parametrize("data", [d for _, d in INVALID], ids=[n for n, _ in INVALID])
def test_from_dict_rejects(data: Any) -> None:
    with pytest.raises(InvalidRules):
        RuleSet.from_dict(data)


def test_invalid_rules_fit_both_error_families() -> None:
    # ConfigError for certgate's tree; ValueError for callers that already catch it.
    assert issubclass(InvalidRules, ConfigError) and issubclass(InvalidRules, ValueError)
    with pytest.raises(InvalidRules, match="not JSON"):
        RuleSet.from_json("{")


@pytest.mark.parametrize(
    "build",
    [
        lambda: Rule(Action.ALLOW),
        lambda: Rule(Action.ALLOW, ("A.test",)),
        lambda: Rule(Action.ALLOW, (1,)),  # type: ignore[arg-type]
        lambda: Rule(Action.ALLOW, ("a.test",), ()),
        lambda: Rule("allow", ("a.test",)),  # type: ignore[arg-type]
        lambda: Rule(Action.ALLOW, ["a.test"]),  # type: ignore[arg-type]
        lambda: Rule(Action.ALLOW, cidrs=("10.0.0.0/8",)),  # type: ignore[arg-type]
        lambda: PortRange(0, 1),
        lambda: RuleSet([]),  # type: ignore[arg-type]
        lambda: RuleSet((), "deny"),  # type: ignore[arg-type]
    ],
)
def test_constructors_validate(build: Any) -> None:
    with pytest.raises(InvalidRules):
        build()


# --- properties ------------------------------------------------------------------------

label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True).filter(
    lambda s: s[2:4] != "--"
)
names = st.lists(label, min_size=1, max_size=4).map(".".join).map(lambda s: s + ".test")
addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


@settings(max_examples=300, deadline=None)
@given(host=st.text(max_size=40), port=st.integers(-10, 70000), resolved=st.lists(addresses))
def test_evaluate_never_raises(
    host: str, port: int, resolved: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
) -> None:
    decision = evaluate(RULES, host, port, resolved)
    assert decision.allowed is False or decision.reason is RuleReason.MATCHED


@settings(max_examples=300, deadline=None)
@given(host=names, resolved=st.lists(addresses, max_size=3), port=st.integers(1, 65535))
def test_deny_cidr_applies_to_any_resolved_address(
    host: str, resolved: list[ipaddress.IPv4Address | ipaddress.IPv6Address], port: int
) -> None:
    loopback = [*resolved, ip("127.0.0.9")]
    assert evaluate(RULES, host, port, loopback) == denied(0)


@settings(max_examples=300, deadline=None)
@given(apex=names, sub=label)
def test_wildcards_match_subdomains_but_never_the_apex(apex: str, sub: str) -> None:
    ruleset = RuleSet((Rule(Action.ALLOW, (f"*.{apex}",)),))
    public = [ip("192.0.2.1")]
    assert evaluate(ruleset, f"{sub}.{apex}", 443, public).allowed
    assert not evaluate(ruleset, apex, 443, public).allowed
    assert not evaluate(ruleset, f"{sub}{apex}", 443, public).allowed


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=30))
def test_canonical_forms_are_fixed_points(text: str) -> None:
    for canonical in (canonical_name, canonical_host_pattern):
        result = canonical(text)
        assert result is None or canonical(result) == result


rule_strategy = st.builds(
    Rule,
    action=st.sampled_from(Action),
    hosts=st.lists(st.one_of(names, names.map("*.".__add__)), min_size=1, max_size=3).map(tuple),
    ports=st.one_of(
        st.just(ANY_PORT),
        st.lists(
            st.tuples(st.integers(1, 65535), st.integers(1, 65535)).map(
                lambda t: PortRange(min(t), max(t))
            ),
            min_size=1,
            max_size=3,
        ).map(tuple),
    ),
    cidrs=st.lists(st.ip_addresses(v=4).map(lambda a: ipaddress.ip_network(f"{a}/32"))).map(tuple),
    protocols=st.sampled_from(
        [
            (Transport.TCP,),
            (Transport.UDP,),
            (Transport.TCP, Transport.UDP),
            (Transport.UDP, Transport.TCP),
        ]
    ),
)


@settings(max_examples=200, deadline=None)
@given(rules=st.lists(rule_strategy, max_size=4), default=st.sampled_from(Action))
def test_dict_form_round_trips(rules: list[Rule], default: Action) -> None:
    ruleset = RuleSet(tuple(rules), default)
    assert RuleSet.from_dict(ruleset.to_dict()) == ruleset


UDP = Transport.UDP
DNS = ip("10.0.0.53")


def test_rules_without_protocols_keep_meaning_tcp_only() -> None:
    old = RuleSet.from_dict(
        {"default": "allow", "rules": [{"action": "allow", "cidrs": ["10.0.0.0/8"]}]}
    )
    assert evaluate(old, "10.0.0.53", 53).allowed
    assert evaluate(old, "10.0.0.53", 53, transport=UDP) == RuleDecision(
        False, None, RuleReason.DEFAULT
    )
    assert evaluate(old, "192.0.2.1", 53, transport=UDP) == RuleDecision(
        False, None, RuleReason.DEFAULT
    )
    assert old.to_dict()["rules"] == [
        {"action": "allow", "hosts": [], "ports": "any", "cidrs": ["10.0.0.0/8"]}
    ]


def test_rules_naming_udp_apply_to_udp_only_where_named() -> None:
    ruleset = RuleSet.from_dict(
        {
            "default": "deny",
            "rules": [
                {"action": "deny", "cidrs": ["10.0.0.99/32"], "protocols": ["tcp", "udp"]},
                {
                    "action": "allow",
                    "hosts": ["dns.corp.test"],
                    "ports": [53],
                    "protocols": ["udp"],
                },
                {"action": "allow", "hosts": ["*.corp.test"]},
            ],
        }
    )
    assert evaluate(ruleset, "dns.corp.test", 53, [DNS], UDP) == allowed(1)
    assert evaluate(ruleset, "dns.corp.test", 53, [DNS]) == allowed(2)  # TCP: rule 1 skipped
    assert evaluate(ruleset, "dns.corp.test", 54, [DNS], UDP).allowed is False
    assert evaluate(ruleset, "web.corp.test", 443, [DNS], UDP).allowed is False
    assert evaluate(ruleset, "dns.corp.test", 53, [ip("10.0.0.99")], UDP) == denied(0)
    assert RuleSet.from_dict(ruleset.to_dict()) == ruleset
