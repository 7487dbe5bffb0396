"""certgate.posture: the posture report's validation, the rules' parser, inheritance and
the pure compliance verdict, by tables; hypothesis for both parsers."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certgate.posture import (
    REPORTED_FACTS,
    Failure,
    PostureReport,
    evaluate,
    merge_policies,
    parse_rules,
)

DEBIAN_12: dict[str, Any] = {
    "os_name": "debian",
    "os_version": "12",
    "kernel": "6.1.0-18-amd64",
    "disk_encrypted": True,
    "screen_lock": None,
    "rooted": None,
    "agent_version": "0.1.0",
    "checkin_age_s": 20,
    "cert_age_s": 3600,
}


def rule(rule_id: str, fact: str, op: str, value: Any) -> dict[str, Any]:
    return {"id": rule_id, "fact": fact, "op": op, "value": value}


# (rule, facts changed from DEBIAN_12, expected failure reason or None for a pass)
VERDICTS = [
    (rule("min-os", "os_version", "version_at_least", "12"), {}, None),
    (rule("min-os", "os_version", "version_at_least", "12.0"), {}, None),
    (
        rule("min-os", "os_version", "version_at_least", "13"),
        {},
        "os_version 12 is below 13",
    ),
    (
        rule("min-os", "os_version", "version_at_least", "12.1"),
        {},
        "os_version 12 is below 12.1",
    ),
    (rule("max-os", "os_version", "version_at_most", "12.0.0"), {}, None),
    (rule("kernel", "kernel", "version_at_least", "6.1"), {}, None),
    (
        rule("kernel", "kernel", "version_at_least", "6.10"),
        {},
        "kernel 6.1.0-18-amd64 is below 6.10",
    ),
    (
        rule("min-os", "os_version", "version_at_least", "12"),
        {"os_version": "rolling"},
        "os_version 'rolling' is not a version",
    ),
    (rule("os", "os_name", "one_of", ["debian", "ubuntu"]), {}, None),
    (
        rule("os", "os_name", "one_of", ["fedora"]),
        {},
        "os_name 'debian' is not one of ('fedora',)",
    ),
    (rule("disk", "disk_encrypted", "equals", True), {}, None),
    (
        rule("disk", "disk_encrypted", "equals", True),
        {"disk_encrypted": False},
        "disk_encrypted is False, not True",
    ),
    (
        rule("lock", "screen_lock", "equals", True),
        {},
        "screen_lock not known (not reported or never checked in)",
    ),
    (rule("seen", "checkin_age_s", "at_most", 20), {}, None),
    (rule("seen", "checkin_age_s", "at_most", 19), {}, "checkin_age_s is 20, over 19"),
    (
        rule("seen", "checkin_age_s", "at_most", 60),
        {"checkin_age_s": None},
        "checkin_age_s not known (not reported or never checked in)",
    ),
    (rule("fresh", "cert_age_s", "at_most", 86400), {}, None),
    (rule("old", "cert_age_s", "at_least", 7200), {}, "cert_age_s is 3600, under 7200"),
    (rule("agent", "agent_version", "version_at_least", "0.1"), {}, None),
]


@pytest.mark.parametrize(("data", "changes", "reason"), VERDICTS)
def test_each_rule_passes_or_fails_with_its_reason(
    data: dict[str, Any], changes: dict[str, Any], reason: str | None
) -> None:
    failures = evaluate(parse_rules([data]), {**DEBIAN_12, **changes})
    assert failures == (() if reason is None else (Failure(data["id"], reason),))


def test_every_failing_rule_is_listed_in_policy_order() -> None:
    rules = parse_rules(
        [
            rule("min-os", "os_version", "version_at_least", "13"),
            rule("disk", "disk_encrypted", "equals", True),
            rule("seen", "checkin_age_s", "at_most", 5),
        ]
    )
    assert [f.rule for f in evaluate(rules, DEBIAN_12)] == ["min-os", "seen"]
    assert evaluate((), {}) == ()  # no rules: nothing can fail


def test_a_subgroup_inherits_and_replaces_rules_by_id() -> None:
    top = parse_rules(
        [
            rule("min-os", "os_version", "version_at_least", "11"),
            rule("disk", "disk_encrypted", "equals", True),
        ]
    )
    sub = parse_rules([rule("min-os", "os_version", "version_at_least", "13")])
    merged = merge_policies([top, sub])
    assert [r.to_dict() for r in merged] == [
        rule("min-os", "os_version", "version_at_least", "13"),
        rule("disk", "disk_encrypted", "equals", True),
    ]
    assert merge_policies([(), top]) == top


BAD_RULES = [
    ({"rules": []}, "must be a list"),
    ([{"id": "a", "fact": "os_version", "op": "equals"}], "needs exactly"),
    ([rule("A", "os_version", "equals", "1")], "id must match"),
    ([rule("a", "battery", "equals", "1")], "unknown fact 'battery'"),
    ([rule("a", "os_version", "newer", "1")], "unknown op 'newer'"),
    ([rule("a", "disk_encrypted", "at_most", 1)], "does not apply"),
    ([rule("a", "checkin_age_s", "equals", 1)], "does not apply"),
    ([rule("a", "disk_encrypted", "equals", 1)], "must be a bool"),
    ([rule("a", "checkin_age_s", "at_most", True)], "must be a int"),
    ([rule("a", "checkin_age_s", "at_most", -1)], "0 to 10 years"),
    ([rule("a", "os_version", "version_at_least", "twelve")], "not a version"),
    ([rule("a", "os_name", "one_of", [])], "non-empty list"),
    ([rule("a", "os_name", "one_of", ["x", 1])], "non-empty list"),
    ([rule("a", "os_name", "equals", "x" * 201)], "must be a str"),
    ([rule("a", "os_name", "equals", "x"), rule("a", "os_name", "equals", "y")], "unique"),
]


@pytest.mark.parametrize(("data", "message"), BAD_RULES)
def test_bad_rules_are_refused_with_the_problem(data: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rules(data)


def report(**changes: Any) -> dict[str, Any]:
    facts = {name: DEBIAN_12[name] for name in REPORTED_FACTS}
    unavailable = {"screen_lock": "no platform screen lock", "rooted": "not on Linux"}
    facts.update(changes)
    return {"facts": facts, "unavailable": unavailable}


def test_a_valid_report_round_trips() -> None:
    parsed = PostureReport.from_dict(report())
    assert parsed.to_dict() == report()


BAD_REPORTS = [
    ([], "exactly 'facts' and 'unavailable'"),
    ({**report(), "extra": 1}, "exactly 'facts' and 'unavailable'"),
    ({"facts": {"os_name": "x"}, "unavailable": {}}, "'facts' must have exactly"),
    (report(os_version=12), "'os_version' must be a str"),
    (report(disk_encrypted=1), "'disk_encrypted' must be a bool"),
    (report(kernel="k" * 201), "'kernel' must be a str"),
    (report(disk_encrypted=None), "null without a reason"),
    (
        {**report(), "unavailable": {"screen_lock": "x", "rooted": "y", "kernel": "z"}},
        "exactly the facts reported as null",
    ),
    ({**report(), "unavailable": {"screen_lock": "", "rooted": "y"}}, "null without a reason"),
    ({**report(), "unavailable": "none"}, "must be an object"),
]


@pytest.mark.parametrize(("data", "message"), BAD_REPORTS)
def test_bad_reports_are_refused_with_the_problem(data: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PostureReport.from_dict(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
FACT_NAMES = st.sampled_from(sorted(REPORTED_FACTS))
RULE_LIKE = st.fixed_dictionaries(
    {
        "id": st.text(max_size=8) | st.just("r"),
        "fact": FACT_NAMES | st.sampled_from(["checkin_age_s", "cert_age_s"]) | st.text(max_size=5),
        "op": st.sampled_from(
            ["equals", "one_of", "version_at_least", "version_at_most", "at_most", "at_least", "x"]
        ),
        "value": JSON,
    }
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=JSON | st.lists(RULE_LIKE, max_size=4))
def test_the_rules_parser_fails_only_with_value_error(data: Any) -> None:
    try:
        rules = parse_rules(data)
    except ValueError:
        return
    evaluate(rules, DEBIAN_12)  # whatever parses can be evaluated


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=JSON, facts=st.dictionaries(FACT_NAMES, JSON, max_size=7))
def test_the_report_parser_fails_only_with_value_error(data: Any, facts: dict[str, Any]) -> None:
    for candidate in (data, {"facts": {**report()["facts"], **facts}, "unavailable": {}}):
        try:
            PostureReport.from_dict(candidate)
        except ValueError:
            continue
