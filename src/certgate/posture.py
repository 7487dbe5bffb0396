"""Device posture and the compliance decision: the one home of both.

A device agent reports its posture (``PostureReport``) on every check-in; a group's
compliance policy is a list of declarative rules over those facts plus two the console
derives itself (``checkin_age_s``, ``cert_age_s``: the presented certificate and the
console's clock are the evidence, not the agent's claim). ``evaluate`` is pure: the same
facts and rules give the same verdict, each failing rule with its reason. The console
calls it on every check-in, every policy change and on a timer (docs/CONVENTIONS.md,
"Device posture and compliance").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = [
    "DERIVED_FACTS",
    "REPORTED_FACTS",
    "Failure",
    "Op",
    "PostureReport",
    "Rule",
    "evaluate",
    "merge_policies",
    "parse_rules",
]

MAX_RULES = 100
MAX_TEXT = 200
MAX_AGE_S = 10 * 365 * 86400  # the bound of an age rule's value (checkin_age_s, cert_age_s)
RULE_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
FactValue = str | bool | int | None

# What an agent reports, with each fact's type; None means the platform cannot provide it
# (the report then says why under ``unavailable``).
REPORTED_FACTS: dict[str, type] = {
    "os_name": str,
    "os_version": str,
    "kernel": str,
    "disk_encrypted": bool,
    "screen_lock": bool,
    "rooted": bool,
    "agent_version": str,
}
# What the console derives: seconds since the last check-in and since the presented
# certificate's notBefore. None: the device never checked in.
DERIVED_FACTS: dict[str, type] = {"checkin_age_s": int, "cert_age_s": int}
FACTS = {**REPORTED_FACTS, **DERIVED_FACTS}


@dataclass(frozen=True, slots=True)
class PostureReport:
    """One check-in's facts, validated: every reported fact present, of its type or None,
    and every None explained."""

    facts: Mapping[str, FactValue]
    unavailable: Mapping[str, str]

    @classmethod
    def from_dict(cls, data: Any) -> PostureReport:
        if not isinstance(data, dict) or set(data) != {"facts", "unavailable"}:
            raise ValueError("a posture report has exactly 'facts' and 'unavailable'")
        facts, unavailable = data["facts"], data["unavailable"]
        if not isinstance(facts, dict) or set(facts) != set(REPORTED_FACTS):
            raise ValueError(f"'facts' must have exactly {sorted(REPORTED_FACTS)}")
        if not isinstance(unavailable, dict):
            raise ValueError("'unavailable' must be an object")
        for name, value in facts.items():
            _check_fact(name, value, unavailable)
        if set(unavailable) != {n for n, v in facts.items() if v is None}:
            raise ValueError("'unavailable' must name exactly the facts reported as null")
        return cls(dict(facts), dict(unavailable))

    def to_dict(self) -> dict[str, Any]:
        return {"facts": dict(self.facts), "unavailable": dict(self.unavailable)}


def _check_fact(name: str, value: object, unavailable: Mapping[str, object]) -> None:
    if value is None:
        reason = unavailable.get(name)
        if not isinstance(reason, str) or not 0 < len(reason) <= MAX_TEXT:
            raise ValueError(f"fact {name!r} is null without a reason in 'unavailable'")
        return
    kind = REPORTED_FACTS[name]
    # bool is an int in Python: compare the exact type.
    if type(value) is not kind or (isinstance(value, str) and len(value) > MAX_TEXT):
        raise ValueError(f"fact {name!r} must be a {kind.__name__} (or null)")


class Op(Enum):
    EQUALS = "equals"
    ONE_OF = "one_of"
    VERSION_AT_LEAST = "version_at_least"
    VERSION_AT_MOST = "version_at_most"
    AT_MOST = "at_most"
    AT_LEAST = "at_least"


_OPS_FOR: dict[type, frozenset[Op]] = {
    str: frozenset({Op.EQUALS, Op.ONE_OF, Op.VERSION_AT_LEAST, Op.VERSION_AT_MOST}),
    bool: frozenset({Op.EQUALS}),
    int: frozenset({Op.AT_MOST, Op.AT_LEAST}),
}


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    fact: str
    op: Op
    value: str | bool | int | tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {"id": self.id, "fact": self.fact, "op": self.op.value, "value": value}


@dataclass(frozen=True, slots=True)
class Failure:
    rule: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "reason": self.reason}


def parse_rules(data: Any) -> tuple[Rule, ...]:
    """A policy's rules from JSON (``[{"id", "fact", "op", "value"}, ...]``); raises
    ValueError naming the first problem."""
    if not isinstance(data, list) or len(data) > MAX_RULES:
        raise ValueError(f"rules must be a list of at most {MAX_RULES}")
    rules = tuple(_rule(item, i) for i, item in enumerate(data))
    ids = [r.id for r in rules]
    if len(set(ids)) != len(ids):
        raise ValueError("rule ids must be unique within a policy")
    return rules


def _rule(item: Any, index: int) -> Rule:
    where = f"rule {index}"
    if not isinstance(item, dict) or set(item) != {"id", "fact", "op", "value"}:
        raise ValueError(f"{where} needs exactly 'id', 'fact', 'op' and 'value'")
    if not isinstance(item["id"], str) or not RULE_ID_RE.fullmatch(item["id"]):
        raise ValueError(f"{where}: id must match {RULE_ID_RE.pattern}")
    fact = item["fact"]
    if fact not in FACTS:
        raise ValueError(f"{where}: unknown fact {fact!r}; one of {sorted(FACTS)}")
    try:
        op = Op(item["op"])
    except ValueError as exc:
        raise ValueError(f"{where}: unknown op {item['op']!r}") from exc
    if op not in _OPS_FOR[FACTS[fact]]:
        raise ValueError(f"{where}: op {op.value!r} does not apply to {fact!r}")
    return Rule(item["id"], fact, op, _value(item["value"], FACTS[fact], op, where))


def _value(value: Any, kind: type, op: Op, where: str) -> str | bool | int | tuple[str, ...]:
    if op is Op.ONE_OF:
        if not isinstance(value, list) or not 0 < len(value) <= MAX_RULES:
            raise ValueError(f"{where}: 'one_of' needs a non-empty list of strings")
        if not all(type(v) is str and len(v) <= MAX_TEXT for v in value):
            raise ValueError(f"{where}: 'one_of' needs a non-empty list of strings")
        return tuple(value)
    checked: str | bool | int = value
    if type(checked) is not kind or (isinstance(checked, str) and len(checked) > MAX_TEXT):
        raise ValueError(f"{where}: value must be a {kind.__name__}")
    if isinstance(checked, str) and op is not Op.EQUALS and not _version(checked):
        raise ValueError(f"{where}: {checked!r} is not a version (digits and dots)")
    if isinstance(checked, int) and not 0 <= checked <= MAX_AGE_S:
        raise ValueError(f"{where}: value must be 0 to 10 years in seconds")
    return checked


def merge_policies(chain: Iterable[tuple[Rule, ...]]) -> tuple[Rule, ...]:
    """The effective rules of a group from its policies top-down (the top group first):
    each group inherits its ancestors' rules, and a rule with the id of an inherited one
    replaces it (a subgroup can tighten or relax a rule, not drop it)."""
    merged: dict[str, Rule] = {}
    for rules in chain:
        for rule in rules:
            merged[rule.id] = rule
    return tuple(merged.values())


def evaluate(rules: Iterable[Rule], facts: Mapping[str, FactValue]) -> tuple[Failure, ...]:
    """The failing rules, each with its reason; empty means compliant. A fact that is
    missing or null fails every rule over it (a device must prove what is asked)."""
    failures = []
    for rule in rules:
        reason = _failure(rule, facts.get(rule.fact))
        if reason is not None:
            failures.append(Failure(rule.id, reason))
    return tuple(failures)


def _failure(rule: Rule, actual: FactValue) -> str | None:
    if actual is None:
        return f"{rule.fact} not known (not reported or never checked in)"
    op, wanted = rule.op, rule.value
    if op is Op.EQUALS:
        return None if actual == wanted else f"{rule.fact} is {actual!r}, not {wanted!r}"
    if op is Op.ONE_OF:
        assert isinstance(wanted, tuple)
        return None if actual in wanted else f"{rule.fact} {actual!r} is not one of {wanted!r}"
    if op in (Op.AT_MOST, Op.AT_LEAST):
        assert isinstance(actual, int) and isinstance(wanted, int)
        ok = actual <= wanted if op is Op.AT_MOST else actual >= wanted
        word = "over" if op is Op.AT_MOST else "under"
        return None if ok else f"{rule.fact} is {actual}, {word} {wanted}"
    return _version_failure(rule, str(actual), str(wanted))


def _version_failure(rule: Rule, actual: str, wanted: str) -> str | None:
    have = _version(actual)
    if not have:
        return f"{rule.fact} {actual!r} is not a version"
    if rule.op is Op.VERSION_AT_LEAST:
        return None if have >= _version(wanted) else f"{rule.fact} {actual} is below {wanted}"
    return None if have <= _version(wanted) else f"{rule.fact} {actual} is above {wanted}"


_VERSION_RE = re.compile(r"\d+(\.\d+)*")


def _version(text: str) -> tuple[int, ...]:
    """The leading dotted digits ("6.1.0-18-amd64" -> (6, 1, 0)); () if none. Trailing
    zeros are dropped so that "12" and "12.0" compare equal."""
    match = _VERSION_RE.match(text)
    if match is None:
        return ()
    parts = [int(p) for p in match.group(0).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)
