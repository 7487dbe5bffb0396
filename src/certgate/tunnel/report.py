"""The node's report to the console: its live tunnels and sync state, every 2 seconds.

A dry-run on the console (``console.services.dryrun``) judges the tunnels a node reported
with the node's own decision function, so that "who would lose access" is about now. The
report is an observation, not a decision: nothing on the node depends on it, and a node
whose console is unreachable keeps serving exactly as before.

``POST /api/v1/tunnel/report`` over the feed's mTLS client (the group's tunnel identity),
named by the ``Certgate-Node`` header; the console answers 204. The body::

    {"node": NAME, "at": POSIX seconds, "live_total": N,
     "live": [{"thumbprint", "device_uid", "mode", "app", "host", "port", "addresses",
               "since", "transport" (only "udp", for UDP tunnels)}, ...],
     "status": {"policy_version", "table_seq", "fresh", "age_s", "restart_required",
                "device_roots", "secure_channel_roots", "roots"},
     "denials": {REASON: N, ...}}

``denials`` counts the requests the node denied, by reason, since it started (a total:
a lost report loses nothing; the console keeps the differences as a time series).

Bounded: at most ``MAX_REPORT_TUNNELS`` tunnels and about ``MAX_REPORT_BYTES`` of JSON
(the console's default body limit is 1 MiB); ``live_total`` says how many there were, so
a cut report is never taken for a complete one. Failures are logged when they start and
then once a minute; the loop never raises.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

__all__ = [
    "MAX_REPORT_BYTES",
    "MAX_REPORT_TUNNELS",
    "REPORT_INTERVAL_S",
    "STALE_REPORT_S",
    "Reporter",
    "bounded",
]

log = logging.getLogger("certgate.tunnel.report")

REPORT_INTERVAL_S = 2.0
STALE_REPORT_S = 3 * REPORT_INTERVAL_S  # the console distrusts a report older than this
MAX_REPORT_TUNNELS = 20_000
MAX_REPORT_BYTES = 1_000_000  # under the console's default body limit (1 MiB)
LOG_EVERY_S = 60.0


class Observed(Protocol):
    """What the reporter reads of the running service (``TunnelService``)."""

    def live_tunnels(self) -> list[dict[str, Any]]: ...

    def health(self) -> tuple[int, dict[str, Any]]: ...


class Console(Protocol):
    """Where reports go (``FeedFollower.post_report``)."""

    async def post_report(self, body: dict[str, Any]) -> None: ...


def bounded(
    live: list[dict[str, Any]],
    max_tunnels: int = MAX_REPORT_TUNNELS,
    max_bytes: int = MAX_REPORT_BYTES,
) -> list[dict[str, Any]]:
    """The first tunnels of ``live`` that fit both bounds (their JSON at most ``max_bytes``)."""
    kept = live[:max_tunnels]
    size = len(json.dumps(kept, separators=(",", ":")))
    while kept and size > max_bytes:
        kept = kept[: len(kept) * max_bytes // size * 9 // 10]
        size = len(json.dumps(kept, separators=(",", ":")))
    return kept


class Reporter:
    """Posts the node's report every ``interval`` seconds until cancelled."""

    def __init__(
        self,
        node: str,
        service: Observed,
        console: Console,
        *,
        interval: float = REPORT_INTERVAL_S,
        clock: Callable[[], float] = time.time,
        denials: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self.node, self.service, self.console = node, service, console
        self.denials = denials
        self.interval, self.clock = interval, clock
        self.failures = 0
        self._last_warning: float | None = None

    def body(self) -> dict[str, Any]:
        live = self.service.live_tunnels()
        _, health = self.service.health()
        sync = health.get("sync") or {}
        denials = {} if self.denials is None else {"denials": dict(self.denials())}
        return denials | {
            "node": self.node,
            "at": self.clock(),
            "live_total": len(live),
            "live": bounded(live),
            "status": {
                "policy_version": health["policy_version"],
                "table_seq": health["table_seq"],
                "fresh": health["status"] == "ok",
                "age_s": sync.get("age_s"),
                "restart_required": health["restart_required"],
                "device_roots": sync.get("device_roots"),
                "secure_channel_roots": sync.get("secure_channel_roots"),
                "roots": sync.get("roots"),
            },
        }

    async def report_once(self) -> bool:
        """One report; True if the console took it. Never raises (but for cancellation)."""
        try:
            await self.console.post_report(self.body())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure: the next report will try again
            self._failed(exc)
            return False
        if self.failures:
            log.info("reporting to the console again after %d failures", self.failures)
        self.failures, self._last_warning = 0, None
        return True

    async def run(self) -> None:
        while True:
            await self.report_once()
            await asyncio.sleep(self.interval)

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        now = time.monotonic()
        due = self._last_warning is None or now - self._last_warning >= LOG_EVERY_S
        if due:
            self._last_warning = now
        level = logging.WARNING if due else logging.DEBUG
        log.log(level, "report to the console failed (%d in a row): %s", self.failures, exc)
