"""Prometheus metrics of one tunnel process (own registry, so tests can run several).

The per-connection counters (connections, open connections, admissions, bytes) are plain
ints on ``ListenerMetrics``, read by a collector at scrape time: the data plane touches
them several times per connection, and a labelled prometheus-client child costs a few
Python calls each time.

With ``--workers N`` each worker counts its own connections, and the supervisor's registry
replaces the per-connection families with their sums over the workers' latest reports
(``aggregate_workers``; at most ``workers.REPORT_INTERVAL_S`` old), plus
``certgate_tunnel_worker_connections`` by worker and the workers' restarts. A restarted
worker's counters start again from zero (Prometheus' ``rate`` reads that as a reset).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from certgate.metrics import service_registry
from certgate.tunnel.admission import DenyReason, Mode

# Why a node refuses a request (its ``certgate: REASON`` answer and the denial counter's
# label): the certificate's admission (``DenyReason``), then the shell's own refusals
# (server.py, cascade.py, kdcproxy.py; a test reads them out of those modules). Each has
# its series at 0 for every mode from the start, so an alert on a rate needs no first event.
ADMISSION_REASONS = tuple(reason.value for reason in DenyReason)
SHELL_REASONS = (
    "tls_handshake",
    "connection_limit",  # the node's --max-connections reached: closed unanswered
    "identity",
    "header_timeout",
    "bad_request",
    "unsupported",
    "denied",  # an admission refusal without a reason (Gate.judge's fallback)
    "destination_denied",
    "resolve_timeout",
    "resolve_failed",
    "upstream_timeout",
    "upstream_unreachable",
    "back_end_unreachable",
    "back_end_refused",
    "too_large",
    "realm_not_served",
    "kdc_timeout",
    "kdc_unreachable",
    "kdc_reply",
)
DENIAL_REASONS = (*ADMISSION_REASONS, *SHELL_REASONS)
# A live tunnel is closed by ``Gate.judge``: admission, or the server rules now refusing.
CLOSE_REASONS = (*ADMISSION_REASONS, "denied", "destination_denied")


class ListenerMetrics:
    """One listener's hot counters."""

    __slots__ = (
        "active",
        "admissions",
        "bytes_down",
        "bytes_up",
        "connections",
        "handshake_denials",
    )

    def __init__(self, metrics: TunnelMetrics, mode: str) -> None:
        self.connections = self.active = self.admissions = 0
        self.bytes_up = self.bytes_down = 0
        self.handshake_denials = metrics.denials.labels(mode, "tls_handshake")


class _ListenerCollector(Collector):
    def __init__(self, listeners: dict[tuple[str, str], ListenerMetrics]) -> None:
        self.listeners = listeners

    def collect(self) -> Iterator[Metric]:
        connections = CounterMetricFamily(
            "certgate_tunnel_connections", "Accepted TLS connections", labels=["listener"]
        )
        active = GaugeMetricFamily(
            "certgate_tunnel_active_connections", "Open client connections", labels=["listener"]
        )
        admissions = CounterMetricFamily(
            "certgate_tunnel_admissions", "Admitted requests", labels=["mode"]
        )
        relayed = CounterMetricFamily(
            "certgate_tunnel_bytes", "Bytes relayed", labels=["direction"]
        )
        by_mode: dict[str, int] = {}
        up = down = 0
        for (name, mode), counts in self.listeners.items():
            connections.add_metric([name], counts.connections)
            active.add_metric([name], counts.active)
            by_mode[mode] = by_mode.get(mode, 0) + counts.admissions
            up, down = up + counts.bytes_up, down + counts.bytes_down
        for mode, count in by_mode.items():
            admissions.add_metric([mode], count)
        relayed.add_metric(["up"], up)
        relayed.add_metric(["down"], down)
        yield from (connections, active, admissions, relayed)


# The families a worker's data plane counts, which the supervisor sums over its workers.
WORKER_FAMILIES = frozenset(
    {
        "certgate_tunnel_connections",
        "certgate_tunnel_active_connections",
        "certgate_tunnel_admissions",
        "certgate_tunnel_bytes",
        "certgate_tunnel_denials",
        "certgate_tunnel_closed_by_policy",
        "certgate_tunnel_enforce_seconds",
    }
)


class _WorkersCollector(Collector):
    """The WORKER_FAMILIES summed over the workers' expositions (index -> text)."""

    def __init__(
        self, expositions: Callable[[], Mapping[int, str]], restarts: Callable[[], int]
    ) -> None:
        self.expositions, self.restarts = expositions, restarts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        sums: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        by_worker = GaugeMetricFamily(
            "certgate_tunnel_worker_connections",
            "Accepted TLS connections by worker process (since it started)",
            labels=["worker"],
        )
        alive = 0
        for index, text in sorted(self.expositions().items()):
            alive += 1 if text else 0
            accepted = 0.0
            for family in text_string_to_metric_families(text):
                if family.name not in WORKER_FAMILIES:
                    continue
                families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    if sample.name.endswith("_created"):  # a time, not a count
                        continue
                    key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                    sums[key] = sums.get(key, 0.0) + sample.value
                    if sample.name == "certgate_tunnel_connections_total":
                        accepted += sample.value
            by_worker.add_metric([str(index)], accepted)
        for (name, sample_name, labels), value in sums.items():
            families[name].add_sample(sample_name, dict(labels), value)
        yield from families.values()
        yield by_worker
        yield GaugeMetricFamily(
            "certgate_tunnel_workers", "Worker processes reporting", value=alive
        )
        yield CounterMetricFamily(
            "certgate_tunnel_worker_restarts",
            "Worker processes started again after they exited",
            value=self.restarts(),
        )


class TunnelMetrics:
    def __init__(self) -> None:
        self.registry = service_registry("tunnel")
        r = self.registry
        self._listeners: dict[tuple[str, str], ListenerMetrics] = {}
        self._listener_collector = _ListenerCollector(self._listeners)
        r.register(self._listener_collector)
        self.denials = Counter(
            "certgate_tunnel_denials", "Denied requests by reason", ["mode", "reason"], registry=r
        )
        self.closed_by_policy = Counter(
            "certgate_tunnel_closed_by_policy",
            "Live tunnels closed because policy refuses them now, by reason",
            ["mode", "reason"],
            registry=r,
        )
        self.policy_version = Gauge(
            "certgate_tunnel_policy_version", "Version of the group policy applied", registry=r
        )
        self.restart_required = Gauge(
            "certgate_tunnel_restart_required",
            "1 while the policy names listener ports this node can only take by a restart",
            registry=r,
        )
        for mode in Mode:
            for reason in DENIAL_REASONS:
                self.denials.labels(mode.value, reason)
            for reason in CLOSE_REASONS:
                self.closed_by_policy.labels(mode.value, reason)
        self.enforce_seconds = Histogram(
            "certgate_tunnel_enforce_seconds",
            "From the console signing a change to live tunnels of that cert being closed",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.identity_swaps = Counter(
            "certgate_tunnel_identity_swaps",
            "Tunnel identities put to use live by a rotation (TLS context swapped)",
            registry=r,
        )
        self.certificate_expiry = Gauge(
            "certgate_tunnel_certificate_expires_seconds",
            "Seconds until a certificate the node presents or trusts expires",
            ["certificate"],
            registry=r,
        )
        self.renewal_due = Gauge(
            "certgate_tunnel_certificate_renewal_due",
            "1 while a certificate in use is within its renewal window (rotate it)",
            ["certificate"],
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

    def listener(self, name: str, mode: str) -> ListenerMetrics:
        key = (name, mode)
        if key not in self._listeners:
            self._listeners[key] = ListenerMetrics(self, mode)
        return self._listeners[key]

    def aggregate_workers(
        self, expositions: Callable[[], Mapping[int, str]], restarts: Callable[[], int]
    ) -> None:
        """Serve the workers' sums (``_WorkersCollector``) instead of this process's own
        per-connection families (a supervisor serves no connection)."""
        for own in (
            self._listener_collector,
            self.denials,
            self.closed_by_policy,
            self.enforce_seconds,
        ):
            self.registry.unregister(own)
        self.registry.register(_WorkersCollector(expositions, restarts))


def denial_totals(registry: CollectorRegistry) -> dict[str, int]:
    """Denied requests by reason since the process started, over every mode (the node's
    report to the console carries them; the console keeps them as a time series)."""
    totals: dict[str, int] = {}
    for family in registry.collect():
        if family.name != "certgate_tunnel_denials":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.value:
                reason = sample.labels.get("reason", "unknown")
                totals[reason] = totals.get(reason, 0) + int(sample.value)
    return totals
