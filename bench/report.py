"""Result files: one JSON per scenario, ``summary.json`` (headline figures under stable keys)
and ``summary.md`` (the tables a human reads, then the hand-written findings)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import env
from bench.world import Sizes

FINDINGS = Path(__file__).resolve().parent / "FINDINGS.md"


@dataclass(frozen=True)
class Headline:
    key: str
    unit: str
    target: str
    meets: Callable[[float], bool]
    path: tuple[str, ...]  # where the value sits in the results
    anchor_path: tuple[str, ...] = ()


HEADLINES = (
    Headline(
        "relay_mb_per_cpu_s_ratio_vs_haproxy",
        "x HAProxy",
        ">= 1.2",
        lambda v: v >= 1.2,
        ("relay_throughput", "headline_ratio"),
        ("relay_throughput", "anchor", "mb_per_relay_cpu_s"),
    ),
    Headline(
        "conns_per_cpu_s_ratio_vs_haproxy",
        "x HAProxy",
        ">= 1.2",
        lambda v: v >= 1.2,
        ("connection_rate", "headline_ratio"),
        ("connection_rate", "anchor", "conns_per_relay_cpu_s", "full"),
    ),
    Headline(
        "conns_resumed_per_cpu_s_ratio_vs_haproxy",
        "x HAProxy",
        ">= 1.0",
        lambda v: v >= 1.0,
        ("connection_rate", "headline_resumed_ratio"),
        ("connection_rate", "anchor", "conns_per_relay_cpu_s", "resumed"),
    ),
    Headline(
        "table_1m_rss_mb",
        "MB",
        "<= 150",
        lambda v: v <= 150,
        ("table_1m", "headline", "table_1m_rss_mb"),
    ),
    Headline(
        "table_1m_bootstrap_s",
        "s",
        "<= 10",
        lambda v: v <= 10,
        ("table_1m", "headline", "table_1m_bootstrap_s"),
    ),
    Headline(
        "lookup_p99_us", "us", "<= 5", lambda v: v <= 5, ("table_1m", "headline", "lookup_p99_us")
    ),
    Headline("enforce_p99_ms", "ms", "<= 250", lambda v: v <= 250, ("enforce", "enforced_p99_ms")),
    Headline(
        "policy_enforce_p99_ms",
        "ms",
        "<= 250",
        lambda v: v <= 250,
        ("enforce_policy", "enforced_p99_ms"),
    ),
    Headline(
        "issuance_pki_per_s",
        "certs/s",
        ">= 1000",
        lambda v: v >= 1000,
        ("issuance", "pki", "per_s"),
    ),
    Headline(
        "issuance_api_per_s", "certs/s", ">= 500", lambda v: v >= 500, ("issuance", "api", "per_s")
    ),
    Headline(
        "ui_devices_p99_ms",
        "ms",
        "<= 300",
        lambda v: v <= 300,
        ("ui_devices", "ui_devices_p99_ms"),
    ),
)


# Headline figures measured on the console and nodes that hold the whole fleet.
FLEET_KEYS = frozenset(
    {
        "table_1m_rss_mb",
        "table_1m_bootstrap_s",
        "lookup_p99_us",
        "enforce_p99_ms",
        "policy_enforce_p99_ms",
        "ui_devices_p99_ms",
    }
)


def dig(results: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = results
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def write_result(out: Path, name: str, result: dict[str, Any], sizes: Sizes, smoke: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "name": name,
        "smoke": smoke,
        "environment": env.environment(),
        "sizes": asdict(sizes),
        "result": result,
    }
    (out / f"{name}.json").write_text(json.dumps(document, indent=2, default=str) + "\n")


def summary(results: dict[str, Any], sizes: Sizes, smoke: bool) -> dict[str, Any]:
    environment = env.environment()
    out: dict[str, Any] = {}
    for h in HEADLINES:
        value = dig(results, h.path)
        number = float(value) if isinstance(value, int | float) else None
        out[h.key] = {
            "value": number,
            "unit": h.unit,
            "target": h.target,
            "met": None if number is None else h.meets(number),
            "anchor": dig(results, h.anchor_path) if h.anchor_path else None,
            "devices": sizes.devices if h.key in FLEET_KEYS else None,
            "smoke": smoke,
            "date": environment["date"],
            "commit": environment["versions"]["certgate_commit"],
        }
    return out


def write_summary(out: Path, results: dict[str, Any], sizes: Sizes, smoke: bool) -> dict[str, Any]:
    headline = summary(results, sizes, smoke)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(headline, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(headline, results, sizes, smoke))
    write_plot(out, results)
    return headline


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows
    ]
    return [*lines, ""]


def markdown(headline: dict[str, Any], results: dict[str, Any], sizes: Sizes, smoke: bool) -> str:
    environment = env.environment()
    v, cpu, calibration = environment["versions"], environment["cpu"], environment["calibration"]
    lines = [
        "# certgate benchmark results" + (" (SMOKE: tiny sizes, not figures)" if smoke else ""),
        "",
        f"Measured {environment['date']} at commit `{v['certgate_commit']}` on {cpu['model']}"
        f" ({cpu['cores']} cores), Linux {v['kernel']}; Python {v['python']}, {v['openssl']},"
        f" {v['haproxy']}, {v['stunnel']}. TLS: {env.TLS_VERSION} {env.CIPHER}, {env.GROUP};"
        f" keys: {env.KEY_TYPE}. Load generator and origin pinned to one core, the relay under"
        " test to the other. Regenerate with `make bench`.",
        "",
        "The machine is a 2-vCPU virtual machine shared with other work: absolute figures moved"
        " by up to half between runs (ratios measured in the same run move far less). Machine"
        " speed when this was written: a Python loop iteration"
        f" {calibration['python_loop_ns_per_iteration']} ns, a timer call"
        f" {calibration['timer_call_ns']} ns; load average"
        f" {', '.join(f'{x:.2f}' for x in environment['load_average'])}.",
        "",
        "## Headline figures",
        "",
    ]
    rows = [
        [key, _fmt(h["value"], 2), h["unit"], _fmt(h["anchor"]), h["target"], _fmt(h["met"])]
        for key, h in headline.items()
    ]
    lines += _table(["figure", "certgate", "unit", "anchor (same run)", "target", "met"], rows)
    lines += ["![per relay CPU-second, x HAProxy](ratios.svg)", ""]
    for section in (_relay, _rates, _loops, _workers, _concurrency, _fleet, _enforce, _issuance):
        lines += section(results)
    lines += _errors(results)
    # A pointer, not a copy: the findings are edited after a run, and a copy here would
    # go stale beside the figures it sits under.
    link = f"[{FINDINGS.name}](../{FINDINGS.name})"
    lines += ["", f"What was profiled, changed and tried per target: {link}.", ""]
    return "\n".join(lines)


def _relay(results: dict[str, Any]) -> list[str]:
    r = results.get("relay_throughput") or {}
    rows = []
    for name, row in (r.get("relays") or {}).items():
        ratio = (r.get("ratio_vs_haproxy") or {}).get(name) or {}
        rows.append(
            [
                name,
                dig(row, ("upload", "mb_per_s")),
                dig(row, ("download", "mb_per_s")),
                dig(row, ("upload", "mb_per_relay_cpu_s")),
                dig(row, ("download", "mb_per_relay_cpu_s")),
                dig(row, ("both", "mb_per_relay_cpu_s")),
                ratio.get("both"),
                dig(row, ("tls", "cipher")) or ("-" if row.get("failed") else "plain"),
                "FAILED" if row.get("failed") else "",
            ]
        )
    header = ["relay", "up MB/s", "down MB/s", "up MB/CPU-s", "down MB/CPU-s", "MB/CPU-s"]
    header += ["x HAProxy", "cipher", ""]
    size = _fmt((r.get("bytes_per_transfer") or 0) / 2**20, 0)
    title = (
        f"## 1. Relay throughput (one stream, {size} MiB x {r.get('repetitions')} per direction)"
    )
    return [title, "", *_table(header, rows)]


def _rates(results: dict[str, Any]) -> list[str]:
    r = results.get("connection_rate") or {}
    rows = []
    for name, row in (r.get("relays") or {}).items():
        for kind in ("full", "resumed", "tcp"):
            k = row.get(kind)
            if not k:
                continue
            ratio = ((r.get("ratio_vs_haproxy") or {}).get(name) or {}).get(kind)
            rows.append(
                [
                    name,
                    kind,
                    k["conns_per_s"],
                    k["p50_ms"],
                    k["p99_ms"],
                    k["relay_cpu_ms_per_conn"],
                    k["conns_per_relay_cpu_s"],
                    ratio,
                    k["errors"],
                ]
            )
    header = ["relay", "handshake", "conns/s", "p50 ms", "p99 ms", "relay CPU ms/conn"]
    header += ["conns/CPU-s", "x HAProxy", "errors"]
    title = "## 2. New connections (handshake + CONNECT for certgate + first byte)"
    note = (
        f"{r.get('client_threads')} client threads for {r.get('seconds_per_window')} s per row."
        " The anchors do no CONNECT (one round trip fewer); conns/s of the fast relays is"
        " bounded by the load generator's single core, so compare per relay CPU-second."
    )
    return [title, "", note, "", *_table(header, rows)]


def _loops(results: dict[str, Any]) -> list[str]:
    loops = (results.get("event_loop") or {}).get("loops") or {}
    rows = [
        [
            name,
            _stability(row),
            row.get("mb_per_relay_cpu_s"),
            row.get("full_conns_per_relay_cpu_s"),
            row.get("resumed_conns_per_relay_cpu_s"),
            row.get("connection_errors"),
            (row.get("probe_storm") or {}).get("probes"),
            (row.get("probe_storm") or {}).get("per_s"),
        ]
        for name, row in loops.items()
    ]
    header = ["loop", "stability", "MB/CPU-s", "full conns/CPU-s", "resumed conns/CPU-s"]
    header += ["errors", "probes survived", "probes/s"]
    note = (
        "Probes: TCP connections closed at once (half FIN, half reset), as fast as the load"
        " generator makes them, then one real tunnel through the same process."
    )
    return ["## Event loop: stdlib asyncio vs uvloop", "", note, "", *_table(header, rows)]


def _workers(results: dict[str, Any]) -> list[str]:
    section = results.get("workers") or {}
    rows = [
        [
            workers,
            "failed" if row.get("failed") else "ok",
            row.get("mb_per_relay_cpu_s"),
            row.get("full_conns_per_relay_cpu_s"),
            row.get("resumed_conns_per_relay_cpu_s"),
            row.get("full_conns_per_s"),
        ]
        for workers, row in (section.get("workers") or {}).items()
    ]
    header = ["workers", "run", "MB/CPU-s", "full conns/CPU-s", "resumed conns/CPU-s"]
    header += ["full conns/s"]
    title = "## Every core: tunnel run --workers 1 vs 2"
    return [title, "", section.get("what", ""), "", *_table(header, rows)]


def _stability(row: dict[str, Any]) -> str:
    if row.get("crashed"):
        return "crashed"
    if row.get("failed"):
        return "fails: " + str(row["failed"]).splitlines()[0][:200]
    if not (row.get("probe_storm") or {}).get("relays_after", True):
        return "stops relaying after the probes"
    return "stable" if not row.get("connection_errors") else "connection errors"


def _concurrency(results: dict[str, Any]) -> list[str]:
    r = results.get("concurrency") or {}
    rows = []
    for name, row in (r.get("relays") or {}).items():
        rows.append(
            [
                name,
                row.get("held"),
                row.get("rss_before_mb"),
                row.get("rss_with_idle_mb"),
                row.get("kib_per_idle_tunnel"),
                dig(row, ("active", "download", "mb_per_s")),
                dig(row, ("active", "download", "mb_per_relay_cpu_s")),
                dig(row, ("active", "upload", "mb_per_s")),
            ]
        )
    header = ["relay", "idle tunnels", "RSS before MB", "RSS idle MB", "KiB/tunnel"]
    header += ["active down MB/s", "active down MB/CPU-s", "active up MB/s"]
    limits = {row.get("limited_by") for row in (r.get("relays") or {}).values()}
    notes = [f"Limited: {x}." for x in sorted(x for x in limits if x)]
    return ["## 3. Concurrent idle tunnels", "", *notes, "", *_table(header, rows)]


def _fleet(results: dict[str, Any]) -> list[str]:
    r = results.get("table_1m") or {}
    rows = [
        [
            n["node"],
            n["bootstrap_s"],
            n.get("table_rss_mb"),
            n.get("rss_before_table_mb"),
            n["rss_mb"],
            n["peak_rss_mb"],
            n["cpu_s"],
        ]
        for n in r.get("nodes") or []
    ]
    t = r.get("table_in_process") or {}
    feed = [
        [
            n.get("node"),
            n.get("done_s"),
            n.get("changes_per_s"),
            n.get("changes_per_s_while_applying"),
        ]
        for n in dig(r, ("feed", "nodes")) or []
    ]
    return [
        f"## 4. Device table: {_fmt(r.get('devices'))} devices",
        "",
        f"Bulk insert into the console's SQLite: {dig(r, ('insert', 'insert_s'))} s.",
        "",
        *_table(
            [
                "node",
                "bootstrap s",
                "table RSS MB",
                "node RSS before MB",
                "node RSS MB",
                "peak RSS MB",
                "node CPU s",
            ],
            rows,
        ),
        f"In-process (the node's persisted table): {t.get('entries')} entries,"
        f" table alone {t.get('table_rss_delta_mb')} MB; lookup p50 {t.get('lookup_p50_us')} us,"
        f" p99 {t.get('lookup_p99_us')} us, p99.9 {t.get('lookup_p999_us')} us"
        f" (timer alone {t.get('timer_overhead_us')} us).",
        "",
        f"Feed: {_fmt(dig(r, ('feed', 'changes')))} changes committed at once:",
        "",
        *_table(["node", "all applied after s", "changes/s", "changes/s while applying"], feed),
    ]


ENFORCE_KINDS = (
    ("enforce", "compliance (PUT compliance)"),
    ("enforce_policy", "policy (PATCH server_rules)"),
)


def _enforce(results: dict[str, Any]) -> list[str]:
    rows = []
    for key, label in ENFORCE_KINDS:
        r = results.get(key) or {}
        rows.append(
            [
                label,
                r.get("changes"),
                r.get("refused_p50_ms"),
                r.get("refused_p99_ms"),
                r.get("closed_p50_ms"),
                r.get("closed_p99_ms"),
                r.get("enforced_p50_ms"),
                r.get("enforced_p99_ms"),
                r.get("first_enforced_ms"),
                r.get("api_p50_ms"),
                r.get("api_max_ms"),
                r.get("not_enforced_within_timeout"),
            ]
        )
    header = ["change", "changes", "refused p50", "refused p99", "closed p50", "closed p99"]
    header += ["both p50", "both p99", "first change", "API p50", "API max", "not enforced"]
    nodes = (results.get("enforce") or results.get("enforce_policy") or {}).get("nodes") or []
    note = (
        "Milliseconds from the admin's API call until the next connection is refused (403) and"
        f" the live tunnel is closed, on both nodes ({', '.join(nodes)}); p99 of 100 changes is"
        " the slowest. Not enforced: not within the step timeout."
    )
    return ["## 5. Time to enforce", "", note, "", *_table(header, rows)]


def _issuance(results: dict[str, Any]) -> list[str]:
    r = results.get("issuance") or {}
    pki, api = r.get("pki") or {}, r.get("api") or {}
    rows = [
        ["PKI layer (Authority.issue_from_csr)", pki.get("per_s"), "-", "-"],
        [
            f"API, profile delivery ({api.get('clients')} clients)",
            api.get("per_s"),
            api.get("p99_ms"),
            api.get("console_cpu_ms_per_cert"),
        ],
    ]
    header = ["path", "certs/s", "p99 ms", "console CPU ms/cert"]
    return ["## 6. Issuance", "", *_table(header, rows)]


def _errors(results: dict[str, Any]) -> list[str]:
    failed = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    if not failed:
        return []
    lines = ["## Scenarios that failed", ""]
    for name, error in failed.items():
        lines += [f"### {name}", "", "```", str(error)[-2000:], "```", ""]
    return lines


def write_plot(out: Path, results: dict[str, Any]) -> None:
    """``ratios.svg``: every relay's efficiency per CPU-second as a multiple of HAProxy's."""
    bars = _ratio_bars(results)
    if not bars:
        return
    row, left, width = 22, 250, 420
    top = max(v for _, v in bars if v is not None) or 1.0
    scale = width / max(top, 1.0)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}"'
        f' height="{row * (len(bars) + 2)}" font-family="sans-serif" font-size="12">',
        '<text x="4" y="14">per relay CPU-second, x HAProxy (line: 1.0), same run</text>',
        f'<line x1="{left + scale:.0f}" y1="18" x2="{left + scale:.0f}"'
        f' y2="{row * (len(bars) + 1) + 4}" stroke="#444" stroke-dasharray="4"/>',
    ]
    for i, (label, value) in enumerate(bars, start=1):
        y = row * i + 6
        parts.append(f'<text x="4" y="{y + 13}">{label}</text>')
        if value is not None:
            colour = "#2a7" if label.startswith("certgate") else "#888"
            parts.append(
                f'<rect x="{left}" y="{y}" width="{value * scale:.1f}" height="16"'
                f' fill="{colour}"/><text x="{left + value * scale + 4:.1f}" y="{y + 13}">'
                f"{value:.2f}</text>"
            )
    parts.append("</svg>")
    (out / "ratios.svg").write_text("\n".join(parts) + "\n")


def _ratio_bars(results: dict[str, Any]) -> list[tuple[str, float | None]]:
    bars: list[tuple[str, float | None]] = []
    throughput = dig(results, ("relay_throughput", "ratio_vs_haproxy")) or {}
    for name, ratios in throughput.items():
        if name != "haproxy":
            bars.append((f"{name}: MB relayed", ratios.get("both")))
    rates = dig(results, ("connection_rate", "ratio_vs_haproxy")) or {}
    for name, ratios in rates.items():
        for kind in ("full", "resumed"):
            if name != "haproxy" and kind in ratios:
                bars.append((f"{name}: {kind} handshakes", ratios.get(kind)))
    return bars
