"""The time-to-enforce figures (``bench.enforce.summary``): worst node per change, a node
that never enforced counted as the whole step timeout, percentiles over the changes."""

from __future__ import annotations

from typing import Any

from bench.enforce import COMPLIANCE, STEP_TIMEOUT_S, summary

NODES = ["fleet-1", "fleet-2"]


def change(api: float, refused: list[float | None], closed: list[float | None]) -> dict[str, Any]:
    return {"api_ms": api, "refused_ms": refused, "closed_ms": closed, "probe_errors": 0}


def test_each_change_counts_its_slowest_node_and_step() -> None:
    changes = [
        change(300.0, [310.0, 20.0], [305.0, 330.0]),  # the first: node 2 closed last
        change(10.0, [30.0, 25.0], [28.0, 22.0]),
        change(12.0, [26.0, 40.0], [27.0, 24.0]),
    ]
    result = summary(COMPLIANCE.what, changes, NODES)
    assert result["refused_p50_ms"] == 40.0  # worst nodes: 310, 30, 40
    assert result["closed_p50_ms"] == 28.0  # worst nodes: 330, 28, 27
    assert result["enforced_p50_ms"] == 40.0
    assert result["enforced_p99_ms"] == 330.0
    assert result["first_enforced_ms"] == 330.0
    assert result["api_p50_ms"] == 12.0
    assert result["api_max_ms"] == 300.0
    assert result["not_enforced_within_timeout"] == 0
    assert result["nodes"] == NODES
    assert result["per_change"] == changes


def test_a_node_that_never_enforced_counts_as_the_timeout() -> None:
    changes = [change(10.0, [20.0, None], [20.0, 21.0]), change(10.0, [20.0, 20.0], [20.0, 20.0])]
    result = summary(COMPLIANCE.what, changes, NODES)
    assert result["not_enforced_within_timeout"] == 1
    assert result["enforced_p99_ms"] == STEP_TIMEOUT_S * 1000
    assert result["refused_p99_ms"] == STEP_TIMEOUT_S * 1000
    assert result["closed_p99_ms"] == 21.0


def test_no_changes_is_no_figure() -> None:
    result = summary(COMPLIANCE.what, [], NODES)
    assert result["changes"] == 0
    assert result["first_enforced_ms"] is None
    assert result["enforced_p99_ms"] == 0.0
