"""Device traffic rules: per app and destination domain, tunnel / bypass / block.

Pure: parsed strictly from the profile's JSON, evaluated first-match-wins, with a default
action when nothing matches. Patterns: ``*`` (anything), ``*.corp.test`` (subdomains of
corp.test, not the apex), or an exact name. App patterns may end in ``.*`` (a prefix).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

MAX_RULES = 1000
# Patterns in the subset of regex syntax JSON Schema shares (no lookaround): the console's
# settings schema publishes them as they are (``console.services.settings``).
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN_PATTERN = rf"(\*\.)?{_LABEL}(\.{_LABEL})*"
APP_PATTERN = r"[A-Za-z0-9][A-Za-z0-9.-]{0,254}(\.\*)?"
_DOMAIN_RE = re.compile(DOMAIN_PATTERN)
_APP_RE = re.compile(APP_PATTERN)


class Action(Enum):
    TUNNEL = "tunnel"
    BYPASS = "bypass"
    BLOCK = "block"


@dataclass(frozen=True, slots=True)
class DeviceRule:
    apps: tuple[str, ...]
    domains: tuple[str, ...]
    action: Action

    def matches(self, app: str, host: str) -> bool:
        return any(_app_matches(p, app) for p in self.apps) and any(
            domain_matches(p, host) for p in self.domains
        )


@dataclass(frozen=True, slots=True)
class RuleMatch:
    action: Action
    rule_index: int | None  # None: the default applied


@dataclass(frozen=True, slots=True)
class DeviceRules:
    rules: tuple[DeviceRule, ...]
    default: Action

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceRules:
        if not isinstance(data, dict) or set(data) - {"default", "rules"}:
            raise ValueError("device rules need exactly 'default' and 'rules'")
        rules = data.get("rules", [])
        if not isinstance(rules, list) or len(rules) > MAX_RULES:
            raise ValueError(f"'rules' must be a list of at most {MAX_RULES}")
        return cls(tuple(_rule(r, i) for i, r in enumerate(rules)), Action(data["default"]))

    def evaluate(self, app: str, host: str) -> RuleMatch:
        host = host.lower().rstrip(".")
        for index, rule in enumerate(self.rules):
            if rule.matches(app, host):
                return RuleMatch(rule.action, index)
        return RuleMatch(self.default, None)


def _rule(raw: Any, index: int) -> DeviceRule:
    if not isinstance(raw, dict) or set(raw) != {"apps", "domains", "action"}:
        raise ValueError(f"rule {index}: needs exactly 'apps', 'domains', 'action'")
    apps, domains = raw["apps"], raw["domains"]
    for name, values, pattern in (("apps", apps, _APP_RE), ("domains", domains, _DOMAIN_RE)):
        if not isinstance(values, list) or not values:
            raise ValueError(f"rule {index}: '{name}' must be a non-empty list")
        for value in values:
            if value != "*" and not (isinstance(value, str) and pattern.fullmatch(value)):
                raise ValueError(f"rule {index}: invalid {name} pattern {value!r}")
    return DeviceRule(tuple(apps), tuple(d.lower() for d in domains), Action(raw["action"]))


def _app_matches(pattern: str, app: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return app.startswith(pattern[:-1])
    return app == pattern


def domain_matches(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and host != pattern[2:]
    return host == pattern
