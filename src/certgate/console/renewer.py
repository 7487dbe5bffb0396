"""Renewal before expiry inside the console (no cron needed for ``rotate renew``).

Every ``renew_interval_s`` (console.json; 0 turns it off), in one transaction: the group
identities within ``RENEWAL_WINDOW`` of their end are rotated (``rotation.renew_due``:
prepared and switched at once; finished once nothing depends on the old one), each step
audited as ``rotation.renewal`` by ``console:renewal``; and the console's own TLS
certificate, when within the window, is issued again and loaded into the live listener
context (``ConsoleState.renew_tls``: new connections get it, open ones keep theirs).
A failure is logged and retried at the next tick: it must not stop the console.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from certgate.console.periodic import Periodic
from certgate.console.services import audit, rotation

if TYPE_CHECKING:
    from certgate.console.state import ConsoleState

ACTOR = "console:renewal"
log = logging.getLogger("certgate.console.renewer")


class Renewer(Periodic):
    what = "renewal before expiry"

    def __init__(self, state: ConsoleState, interval_s: float) -> None:
        super().__init__(interval_s, log)
        self._state = state

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
        for what in renewed:
            log.info("renewal before expiry: %s", what)
        return renewed

    def tick(self) -> list[str]:
        return self.renew_once()
