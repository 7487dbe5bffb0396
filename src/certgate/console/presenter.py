"""The console's TLS listener follows CA rotation steps that other processes make.

A step served by this console's API is presented at once (``api.rotation._present_chain``).
One made by the CLI (``certgate console rotate ...`` opens the database itself) or by
another console node changes the CA rows only. Every ``PRESENT_S`` this thread reads them
(``InstancePKI.refresh``: one small query in a read-only unit of work, no write lock) and,
when they changed since the listener last presented, presents what they call for
(``ConsoleState.renew_tls``: the chain of a Root rotation step, a TLS certificate of a new
Secure Channel Root). Without it a Root rotation finished by the CLI left the listener
serving a chain of the retired Root until the next renewal tick (up to
``renew_interval_s``, an hour by default), while every node trusted the new Root alone
and failed closed meanwhile. A failure is logged and retried at the next tick.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from certgate.console.periodic import Periodic
from certgate.console.services import audit, ca

if TYPE_CHECKING:
    from certgate.console.state import ConsoleState

PRESENT_S = ca.REFRESH_S  # a step of another process is presented within this (plus a query)
ACTOR = "console:presenter"
log = logging.getLogger("certgate.console.presenter")


class Presenter(Periodic):
    what = "following the CA rows"

    def __init__(self, state: ConsoleState, interval_s: float = PRESENT_S) -> None:
        super().__init__(interval_s, log)
        self._state = state

    def present_once(self) -> bool:
        """One look at the CA rows; True if the listener now presents something else."""
        state = self._state
        if state.live_tls is None:  # no listener of ours (an app served without TLS)
            return False
        with state.db.read_only() as session:
            state.pki.refresh(session, 0)
        if state.pki.rows == state.presented_rows:
            return False
        with state.db.transaction() as session:
            renewed = state.renew_tls(session)
            if renewed:
                audit.append(session, ACTOR, "console.tls.renewed")
        if renewed:
            log.info("presenting the chain of a CA rotation step another process made")
        return renewed

    def tick(self) -> bool:
        return self.present_once()
