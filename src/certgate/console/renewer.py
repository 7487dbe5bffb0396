"""Renewal before expiry inside the console (no cron needed for ``rotate renew``).

Every ``renew_interval_s`` (console.json; 0 turns it off), in one transaction: the group
identities within ``RENEWAL_WINDOW`` of their end are rotated (``rotation.renew_due``:
prepared and switched at once; finished once nothing depends on the old one), each step
audited as ``rotation.renewal`` by ``console:renewal``; and the console's own TLS
certificate, when within the window, is issued again and loaded into the live listener
context (``ConsoleState.renew_tls``: new connections get it, open ones keep theirs).
A failure is logged and retried at the next tick: it must not stop the console.

A rotation step made by another process (``certgate console rotate`` on the console host,
or a second console node on the same database) changes the CA rows: every ``CA_CHECK_S``
the renewer reads them (one small query) and, when they changed, runs a pass at once, so
that this console presents a TLS certificate of the new Secure Channel Root (or the new
Root's chain) seconds after the switch, not up to ``renew_interval_s`` later (the finish
of a Secure Channel Root rotation waits for it).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import TYPE_CHECKING

from certgate.console.services import audit, ca, rotation

if TYPE_CHECKING:
    from certgate.console.state import ConsoleState

ACTOR = "console:renewal"
CA_CHECK_S = ca.REFRESH_S
RETRY_S = 60.0  # after a failed pass (a lost database): not a log line every CA_CHECK_S
log = logging.getLogger("certgate.console.renewer")


class Renewer:
    def __init__(self, state: ConsoleState, interval_s: float) -> None:
        self._state, self._interval_s = state, interval_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed_with: tuple[tuple[str, str], ...] | None = None  # CA rows at last pass

    def renew_once(self, now: datetime | None = None) -> list[str]:
        """One pass at ``now`` (tests move it); returns what it renewed, for the log."""
        state, renewed = self._state, []
        with state.db.transaction() as session:
            for step in rotation.renew_due(session, state.pki, now):
                audit.append(
                    session,
                    ACTOR,
                    "rotation.renewal",
                    group_id=step.group_id,
                    kind=step.kind,
                    rotation=step.id,
                    phase=step.phase,
                )
                renewed.append(f"{step.kind} of group {step.group_id} ({step.phase})")
            if state.renew_tls(session, now):
                audit.append(session, ACTOR, "console.tls.renewed")
                renewed.append("console TLS certificate")
        self._renewed_with = state.pki.generation  # as ``renew_tls`` refreshed it
        for what in renewed:
            log.info("renewal before expiry: %s", what)
        return renewed

    def start(self) -> None:
        self._renewed_with = self._state.pki.generation  # what the TLS context was built with
        self._thread = threading.Thread(target=self._run, name="console-renewer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()

    def cas_changed(self) -> bool:
        """The CA rows differ from those of the last pass (a rotation step since)."""
        with self._state.db.read_only() as session:
            self._state.pki.refresh(session, 0)
        return self._state.pki.generation != self._renewed_with

    def _run(self) -> None:
        due = time.monotonic() + self._interval_s
        while not self._stopping.wait(min(CA_CHECK_S, self._interval_s)):
            try:
                if time.monotonic() >= due or self.cas_changed():
                    due = time.monotonic() + self._interval_s
                    self.renew_once()
            except Exception:  # a lost database must not stop the console
                backoff = min(RETRY_S, self._interval_s)
                due = time.monotonic() + backoff
                log.exception("renewal before expiry failed; retrying in %s s", backoff)
                self._stopping.wait(backoff)
