"""The console's /metrics and /healthz, scraped from a real console process on each backend:
names and seeded series, counts that move with real requests, the feed lag of a group's
nodes, and the health checks (on PostgreSQL the write probe is a real row lock + commit)."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from certgate import __version__
from certgate.console.metrics import SIGNED_KINDS
from certgate.console.services import ca
from certgate.console.store.models import Group, TunnelNode
from tests.support import RunningConsole, init_console, make_csr, start_console

UNMATCHED_GET = {"route": "unmatched", "method": "GET"}


def _scrape(console: RunningConsole) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with console.client() as client:
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_build_process_and_seeded_series(console: RunningConsole) -> None:
    samples = _scrape(console)
    assert _value(samples, "certgate_build_info", service="console", version=__version__) == 1
    assert _value(samples, "process_open_fds") > 0
    for kind in ("database", "disk", "unexpected"):
        assert ("certgate_server_failures_total", frozenset({("kind", kind)})) in samples
    for method in ("web", "api"):
        assert ("certgate_signin_failures_total", frozenset({("method", method)})) in samples
    for kind in ("device", "app", "admin", "tunnel-identity"):
        assert (
            "certgate_console_certificates_signed_total",
            frozenset({("kind", kind)}),
        ) in samples
    # A route nobody called yet has its series, by template, not by raw path.
    seeded = _value(
        samples,
        "certgate_http_requests_total",
        route="/api/v1/devices/{uid}",
        method="GET",
        status="200",
    )
    assert seeded == 0  # nobody in this module asks for a device
    names = {name for name, _ in samples}
    assert all(re.fullmatch(r"[a-z_]+", n) for n in names)
    counters = {n for n in names if n.startswith("certgate_") and n.endswith("_total")}
    assert {"certgate_http_requests_total", "certgate_server_failures_total"} <= counters
    assert "certgate_http_request_duration_seconds_bucket" in names


def test_counts_follow_real_requests(console: RunningConsole) -> None:
    root = console.admins["root"]
    before = _scrape(console)
    with console.client(root) as admin:
        assert admin.get("/api/v1/groups/global").status_code == 200
        admin.post(
            "/api/v1/groups/global/enrollment-users",
            json={"username": f"u{secrets.token_hex(4)}", "password": "pw-123456789"},
        )
    with console.client(api_key="cg_wrong") as stranger:
        assert stranger.get("/api/v1/groups/global").status_code == 401
    after = _scrape(console)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    route = {"route": "/api/v1/groups/{group_id}", "method": "GET"}
    assert delta("certgate_http_requests_total", status="200", **route) == 1
    assert delta("certgate_http_requests_total", status="401", **route) == 1
    assert delta("certgate_http_request_duration_seconds_count", **route) == 2
    assert delta("certgate_signin_failures_total", method="api") == 1


def test_signed_certificates_are_counted(console: RunningConsole) -> None:
    root = console.admins["root"]
    username = f"d{secrets.token_hex(4)}"
    with console.client(root) as admin:
        admin.post(
            "/api/v1/groups/global/enrollment-users",
            json={"username": username, "password": "pw-123456789"},
        ).raise_for_status()
    with console.client() as client:
        enrolled = client.post(
            "/api/v1/enroll",
            json={"username": username, "password": "pw-123456789", "platform": "linux"},
        )
    enrolled.raise_for_status()
    before = _value(_scrape(console), "certgate_console_certificates_signed_total", kind="device")
    with console.client(api_key=enrolled.json()["credential"]) as device:
        profile = device.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})
    assert profile.status_code == 201, profile.text
    after = _value(_scrape(console), "certgate_console_certificates_signed_total", kind="device")
    assert after == before + 1


def test_feed_lag_of_the_furthest_behind_node(console: RunningConsole) -> None:
    group = f"lag{secrets.token_hex(3)}"
    with console.client(console.admins["root"]) as admin:
        admin.post("/api/v1/groups", json={"id": group, "parent_id": "global"}).raise_for_status()
    with console.local() as (session, _):
        row = session.get(Group, group)
        assert row is not None
        row.feed_seq = 10
        for name, seq in (("n1", 9), ("n2", 6)):
            session.add(
                TunnelNode(
                    group_id=group,
                    name=name,
                    address="127.0.0.1",
                    registered_at=ca.now(),
                    last_seen_at=ca.now(),
                    report={"status": {"table_seq": seq}},
                    reported_at=ca.now(),
                )
            )
    assert _value(_scrape(console), "certgate_console_feed_lag_events", group=group) == 4


def test_healthz_names_each_check_and_livez_is_alive(console: RunningConsole) -> None:
    with console.client() as client:
        health, live = client.get("/healthz"), client.get("/livez")
    assert health.status_code == 200
    body = health.json()
    assert (body["status"], body["checks"]) == ("ok", {"database": "ok", "signer": "ok"})
    assert body["warnings"] == [] and {c["name"] for c in body["certificates"]} >= {"console-tls"}
    assert live.json() == {"status": "alive"}


def test_metrics_is_for_loopback_only() -> None:
    from certgate.metrics import loopback

    assert loopback("127.0.0.1") and loopback("::1") and loopback("127.0.0.2")
    assert not loopback("10.0.0.1") and not loopback("2001:db8::1") and not loopback("")


def test_unmatched_paths_share_one_series(console: RunningConsole) -> None:
    with console.client() as client:
        for i in range(3):
            assert client.get(f"/scan/{secrets.token_hex(4)}/{i}").status_code == 404
    samples = _scrape(console)
    labels = {"route": "unmatched", "method": "GET", "status": "404"}
    assert _value(samples, "certgate_http_requests_total", **labels) >= 3
    assert not any("/scan/" in dict(labels_).get("route", "") for _, labels_ in samples)


def test_a_fresh_console_exports_every_declared_series_at_zero(tmp_path: Path) -> None:
    """Before any request: each route's requests at 0 for every status its OpenAPI
    operation declares, and the failure, sign-in and issuance counters at 0."""
    data_dir, port = init_console(tmp_path)
    fresh = start_console(tmp_path, data_dir, port)
    try:
        samples = _scrape(fresh)  # the first request this process answers
        with fresh.client() as client:
            document = client.get("/openapi.json").json()
    finally:
        fresh.stop()
    requests = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "certgate_http_requests_total"
    }
    assert requests and set(requests.values()) == {0.0}
    declared = [
        frozenset({("route", path), ("method", method.upper()), ("status", status)})
        for path, item in document["paths"].items()
        for method, operation in item.items()
        for status in operation["responses"]
    ]
    assert len(declared) > 400  # ~55 operations with their 200/201 and error statuses
    assert not [series for series in declared if series not in requests]
    for status in ("404", "405"):
        assert _value(samples, "certgate_http_requests_total", **UNMATCHED_GET, status=status) == 0
    zero_counters = ("certgate_server_failures_total", "certgate_signin_failures_total")
    for counter in zero_counters:
        values = [value for (name, _), value in samples.items() if name == counter]
        assert values and set(values) == {0.0}, counter
    signed = {
        dict(labels)["kind"]: value
        for (name, labels), value in samples.items()
        if name == "certgate_console_certificates_signed_total"
    }
    # ``console serve`` signs its own TLS certificate as it starts: the one event so far.
    assert signed == {kind: 1.0 if kind == "console-tls" else 0.0 for kind in SIGNED_KINDS}
