"""The summary's headline figures (``bench.report.summary``) and size overrides
(``bench.world.resized``): pure functions of results already measured."""

from __future__ import annotations

import pytest
from bench.report import HEADLINES, markdown, summary
from bench.world import FULL, SMOKE, resized

RESULTS = {
    "enforce": {"enforced_p99_ms": 240.0, "nodes": ["fleet-1", "fleet-2"], "changes": 100},
    "enforce_policy": {"enforced_p99_ms": 251.0, "changes": 100},
}


def test_both_enforce_figures_are_headlines_with_the_same_target() -> None:
    headline = summary(RESULTS, FULL, smoke=False)
    compliance, policy = headline["enforce_p99_ms"], headline["policy_enforce_p99_ms"]
    assert (compliance["value"], compliance["target"], compliance["met"]) == (240.0, "<= 250", True)
    assert (policy["value"], policy["target"], policy["met"]) == (251.0, "<= 250", False)
    assert compliance["devices"] == policy["devices"] == FULL.devices


def test_a_figure_not_measured_is_none_not_met_or_missed() -> None:
    headline = summary({}, FULL, smoke=False)
    assert {h.key for h in HEADLINES} == set(headline)
    assert headline["policy_enforce_p99_ms"]["value"] is None
    assert headline["policy_enforce_p99_ms"]["met"] is None
    assert headline["issuance_api_per_s"]["devices"] is None


def test_the_markdown_puts_both_kinds_of_change_in_one_table() -> None:
    text = markdown(summary(RESULTS, FULL, smoke=False), RESULTS, FULL, smoke=False)
    assert "| policy_enforce_p99_ms | 251.00 |" in text
    section = text[text.index("## 5. Time to enforce") :]
    assert "| compliance (PUT compliance) | 100 |" in section
    assert "| policy (PATCH server_rules) | 100 |" in section


def test_sizes_can_be_overridden_one_by_one_with_their_own_types() -> None:
    sizes = resized(SMOKE, ["devices=100000", "rate_seconds=2.5"])
    assert (sizes.devices, sizes.rate_seconds) == (100_000, 2.5)
    assert isinstance(sizes.devices, int)
    assert sizes.feed_changes == SMOKE.feed_changes
    assert resized(SMOKE, []) == SMOKE


@pytest.mark.parametrize("item", ["devices", "nodes=2", "devices=many"])
def test_a_size_that_does_not_exist_or_does_not_parse_is_refused(item: str) -> None:
    with pytest.raises(ValueError):
        resized(SMOKE, [item])


def test_the_headline_targets_are_issue_12s() -> None:
    targets = {h.key: h.target for h in HEADLINES}
    assert targets["table_1m_rss_mb"] == "<= 150"
    assert targets["table_1m_bootstrap_s"] == "<= 10"
    assert targets["issuance_api_per_s"] == ">= 500"
    assert targets["relay_mb_per_cpu_s_ratio_vs_haproxy"] == ">= 1.2"
    assert targets["conns_per_cpu_s_ratio_vs_haproxy"] == ">= 1.2"
    assert targets["conns_resumed_per_cpu_s_ratio_vs_haproxy"] == ">= 1.0"
    values = {"table_1m": {"headline": {"table_1m_rss_mb": 151.0, "table_1m_bootstrap_s": 10.0}}}
    headline = summary(values | {"issuance": {"api": {"per_s": 499.9}}}, FULL, smoke=False)
    assert headline["table_1m_rss_mb"]["met"] is False
    assert headline["table_1m_bootstrap_s"]["met"] is True
    assert headline["issuance_api_per_s"]["met"] is False
