"""The supervisor's /metrics: the workers' per-connection families summed, by worker too."""

from __future__ import annotations

import ast
import inspect
from types import ModuleType

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from certgate.tunnel import cascade, kdcproxy, server
from certgate.tunnel.admission import DenyReason, Mode
from certgate.tunnel.metrics import (
    ADMISSION_REASONS,
    CLOSE_REASONS,
    DENIAL_REASONS,
    SHELL_REASONS,
    TunnelMetrics,
)


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


def _reasons_answered_in(module: ModuleType) -> set[str]:
    """The reason literals a module refuses with: the second argument of a denial
    (``_deny``, ``_log_denial``, ``Denial``, ``HopRefused``, ``KDCProxyError``) and what
    is assigned to a ``reason``, both sides of a conditional included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Call) and len(node.args) > 1:
            called = node.func.attr if isinstance(node.func, ast.Attribute) else None
            called = node.func.id if isinstance(node.func, ast.Name) else called
            if called in DENIALS:
                found |= _literals(node.args[1])
        if isinstance(node, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == "reason" for t in node.targets):
                found |= _literals(node.value)
    return found


def _literals(node: ast.expr) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _literals(node.body) | _literals(node.orelse)
    return set()


DENIALS = {"_deny", "_log_denial", "Denial", "HopRefused", "KDCProxyError"}


def test_every_reason_a_node_refuses_with_is_seeded() -> None:
    """The seeded shell reasons are exactly those the modules refuse with (none missing,
    none stale); the handshake's is counted by ``ListenerMetrics`` itself, the connection
    limit's before any answer (``server.accept_client``)."""
    modules = (server, cascade, kdcproxy)
    answered = set().union(*(_reasons_answered_in(m) for m in modules)) - {""}
    unanswered = {"tls_handshake", "connection_limit"}
    assert answered - set(ADMISSION_REASONS) == set(SHELL_REASONS) - unanswered
    assert set(DENIAL_REASONS) == set(ADMISSION_REASONS) | set(SHELL_REASONS)


def test_a_fresh_node_exports_every_denial_and_close_at_zero() -> None:
    found = samples(generate_latest(TunnelMetrics().registry).decode())
    for mode in Mode:
        for reason in DENIAL_REASONS:
            labels = (("mode", mode.value), ("reason", reason))
            assert found["certgate_tunnel_denials_total", labels] == 0
        for reason in CLOSE_REASONS:
            labels = (("mode", mode.value), ("reason", reason))
            assert found["certgate_tunnel_closed_by_policy_total", labels] == 0
    assert {r.value for r in DenyReason} <= set(CLOSE_REASONS)
