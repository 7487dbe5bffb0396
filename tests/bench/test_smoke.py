"""Scenario: the benchmark harness end to end at tiny sizes (``bench/run.py --smoke``).

It starts the real console, tunnel nodes, HAProxy and stunnel, runs every scenario with
tiny sizes, and writes the result files. This proves the harness works; the figures of a
smoke run mean nothing, so no timing or ratio is asserted, only that each headline key is
there and holds a number.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HEADLINE_KEYS = (
    "relay_mb_per_cpu_s_ratio_vs_haproxy",
    "conns_per_cpu_s_ratio_vs_haproxy",
    "conns_resumed_per_cpu_s_ratio_vs_haproxy",
    "table_1m_rss_mb",
    "table_1m_bootstrap_s",
    "lookup_p99_us",
    "enforce_p99_ms",
    "policy_enforce_p99_ms",
    "issuance_pki_per_s",
    "issuance_api_per_s",
    "ui_devices_p99_ms",
)
SCENARIO_FILES = (
    "relay_throughput",
    "connection_rate",
    "event_loop",
    "workers",
    "concurrency",
    "table_1m",
    "enforce",
    "enforce_policy",
    "issuance",
    "ui_devices",
)
RELAYS = ("certgate", "certgate-ssl", "certgate-uvloop", "haproxy", "stunnel", "plain")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-smoke")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:] + _errors(out)
    return out


def _errors(out: Path) -> str:
    """The tracebacks a failed run recorded in its result files (its stderr has none)."""
    found = []
    for path in sorted(out.glob("*.json")):
        result = json.loads(path.read_text()).get("result", {})
        if isinstance(result, dict) and "error" in result:
            found.append(f"\n{path.stem}: {str(result['error'])[-2000:]}")
    return "".join(found)


def _load(results: Path, name: str) -> Any:
    return json.loads((results / f"{name}.json").read_text())


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def test_summary_holds_every_headline_key_as_a_number(results: Path) -> None:
    summary = _load(results, "summary")
    assert set(summary) == set(HEADLINE_KEYS)
    for key in HEADLINE_KEYS:
        figure = summary[key]
        assert _is_number(figure["value"]), (key, figure)
        assert figure["date"] and figure["commit"], (key, figure)
        assert figure["smoke"] is True


def test_every_scenario_wrote_its_result_with_its_environment(results: Path) -> None:
    for name in SCENARIO_FILES:
        document = _load(results, name)
        assert "error" not in document["result"], (name, document["result"].get("error"))
        versions = document["environment"]["versions"]
        assert {"python", "openssl", "haproxy", "stunnel", "certgate_commit"} <= set(versions)
        assert document["environment"]["tls"]["cipher"] == "TLS_AES_128_GCM_SHA256"


def test_each_relay_was_measured_beside_haproxy_with_the_same_cipher(results: Path) -> None:
    throughput = _load(results, "relay_throughput")["result"]
    for relay in RELAYS:
        row = throughput["relays"][relay]
        assert _is_number(row["both"]["mb_per_relay_cpu_s"]), (relay, row)
        expected = None if relay == "plain" else "TLS_AES_128_GCM_SHA256"
        assert row["tls"]["cipher"] == expected, (relay, row["tls"])
    rates = _load(results, "connection_rate")["result"]["relays"]
    for relay in ("certgate", "certgate-ssl", "haproxy", "stunnel"):
        assert rates[relay]["full"]["connections"] > 0
        assert rates[relay]["resumed"]["resumed"] > 0, "no TLS 1.3 session was resumed"


def test_the_tunnel_was_measured_with_one_and_two_workers(results: Path) -> None:
    rows = _load(results, "workers")["result"]["workers"]
    for workers in ("1", "2"):
        assert rows[workers]["failed"] is None, rows[workers]
        assert _is_number(rows[workers]["mb_per_relay_cpu_s"]), rows[workers]
        assert _is_number(rows[workers]["full_conns_per_relay_cpu_s"]), rows[workers]


def test_both_tunnel_nodes_loaded_the_fleet_and_enforced_every_change(results: Path) -> None:
    table = _load(results, "table_1m")["result"]
    assert [n["entries"] for n in table["nodes"]] == [table["devices"] + 1] * 2
    for name in ("enforce", "enforce_policy"):  # a compliance change, a server-rule change
        enforce = _load(results, name)["result"]
        assert enforce["changes"] > 0, name
        assert enforce["not_enforced_within_timeout"] == 0, (name, enforce["per_change"])
        assert len(enforce["per_change"]) == enforce["changes"], name


def test_summary_markdown_has_the_headline_table(results: Path) -> None:
    text = (results / "summary.md").read_text()
    for key in HEADLINE_KEYS:
        assert f"| {key} |" in text
