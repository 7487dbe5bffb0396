"""The supervisor's /metrics: the workers' per-connection families summed, by worker too."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from certgate.tunnel.metrics import TunnelMetrics


def worker_exposition(connections: int, denied: int) -> str:
    metrics = TunnelMetrics()
    metrics.listener("proxy", "proxy").connections = connections
    metrics.denials.labels("proxy", "unknown_certificate").inc(denied)
    metrics.enforce_seconds.observe(0.02)
    metrics.table_entries.set(99)  # the supervisor's own figure wins
    return generate_latest(metrics.registry).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_supervisor_sums_its_workers() -> None:
    workers = {0: worker_exposition(3, 1), 1: worker_exposition(4, 2)}
    supervisor = TunnelMetrics()
    supervisor.table_entries.set(7)
    supervisor.aggregate_workers(lambda: workers, lambda: 1)
    text = generate_latest(supervisor.registry).decode()
    found = samples(text)
    assert found["certgate_tunnel_connections_total", (("listener", "proxy"),)] == 7
    denial = (("mode", "proxy"), ("reason", "unknown_certificate"))
    assert found["certgate_tunnel_denials_total", denial] == 3
    assert found["certgate_tunnel_enforce_seconds_count", ()] == 2
    assert found["certgate_tunnel_worker_connections", (("worker", "0"),)] == 3
    assert found["certgate_tunnel_worker_connections", (("worker", "1"),)] == 4
    assert found["certgate_tunnel_workers", ()] == 2
    assert found["certgate_tunnel_worker_restarts_total", ()] == 1
    assert found["certgate_tunnel_table_entries", ()] == 7
    assert text.count("# TYPE certgate_tunnel_connections_total ") == 1  # one family, not three


def test_a_worker_not_reporting_yet_counts_as_down() -> None:
    supervisor = TunnelMetrics()
    supervisor.aggregate_workers(lambda: {0: worker_exposition(1, 0), 1: ""}, lambda: 0)
    found = samples(generate_latest(supervisor.registry).decode())
    assert found["certgate_tunnel_workers", ()] == 1
    assert found["certgate_tunnel_worker_connections", (("worker", "1"),)] == 0
