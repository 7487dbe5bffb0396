"""Prometheus metrics of one tunnel process (own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class TunnelMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Counter(
            "certgate_tunnel_connections", "Accepted TLS connections", ["listener"], registry=r
        )
        self.active = Gauge(
            "certgate_tunnel_active_connections",
            "Open client connections",
            ["listener"],
            registry=r,
        )
        self.bytes = Counter("certgate_tunnel_bytes", "Bytes relayed", ["direction"], registry=r)
        self.admissions = Counter(
            "certgate_tunnel_admissions", "Admitted requests", ["mode"], registry=r
        )
        self.denials = Counter(
            "certgate_tunnel_denials", "Denied requests by reason", ["mode", "reason"], registry=r
        )
        self.closed_by_policy = Counter(
            "certgate_tunnel_closed_by_policy",
            "Live tunnels closed after a feed change",
            registry=r,
        )
        self.enforce_seconds = Histogram(
            "certgate_tunnel_enforce_seconds",
            "From the console signing a change to live tunnels of that cert being closed",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.table_entries = Gauge("certgate_tunnel_table_entries", "Device table size", registry=r)
        self.table_seq = Gauge(
            "certgate_tunnel_table_seq", "Last applied feed sequence", registry=r
        )
        self.table_age = Gauge(
            "certgate_tunnel_table_age_seconds",
            "Seconds since the last successful sync",
            registry=r,
        )
        self.table_fresh = Gauge(
            "certgate_tunnel_table_fresh", "1 while within the staleness budget", registry=r
        )
