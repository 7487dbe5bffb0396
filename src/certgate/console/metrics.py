"""The console's own metrics beside the HTTP ones (``certgate.metrics``), read at scrape
time: certificates signed by kind (counted by ``InstancePKI`` as it signs) and the feed lag
of each group's nodes, from the reports they send every 2 seconds (``tunnel.report``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import select

from certgate.console.state import ConsoleState
from certgate.console.store.models import Group, TunnelNode
from certgate.httperrors import storage_reason

log = logging.getLogger("certgate.console.metrics")
# Every kind the console signs (ca.Record kinds), so each counter exists from the start.
SIGNED_KINDS = (
    "device",
    "app",
    "admin",
    "tunnel-identity",
    "console-identity",
    "console-tls",
    "scep-ra",
)


class ConsoleCollector(Collector):
    def __init__(self, state: ConsoleState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        signed = CounterMetricFamily(
            "certgate_console_certificates_signed",
            "Certificates signed by this console process, by kind",
            labels=["kind"],
        )
        counts = self.state.pki.signed
        for kind in sorted({*SIGNED_KINDS, *counts}):
            signed.add_metric([kind], counts.get(kind, 0))
        yield signed
        yield from self._feed_lag()

    def _feed_lag(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "certgate_console_feed_lag_events",
            "Feed events of a group its furthest-behind node has not applied (last report)",
            labels=["group"],
        )
        try:
            worst = feed_lag(self.state)
        except Exception as exc:  # the process metrics must still go out
            log.warning("feed lag not measured: %s", storage_reason(exc) or repr(exc))
            return
        for group, events in sorted(worst.items()):
            lag.add_metric([group], events)
        yield lag


def feed_lag(state: ConsoleState) -> dict[str, int]:
    """Per group with reporting nodes: its feed head minus the lowest table seq reported."""
    query = select(Group.id, Group.feed_seq, TunnelNode.report).join(
        TunnelNode, TunnelNode.group_id == Group.id
    )
    worst: dict[str, int] = {}
    with state.db.read_only() as session:
        for group, head, report in session.execute(query):
            seq = ((report or {}).get("status") or {}).get("table_seq")
            if isinstance(seq, int):
                worst[group] = max(worst.get(group, 0), head - seq)
    return worst
