"""What the console needs to serve, checked for ``/healthz``: the database takes a write, and
the signer signs. Each check answers "ok" or why not; the endpoint says which one failed.

The write probe rewrites Alembic's one-row version table with its own value: a real
committed write (through the WAL, fsync'd, on SQLite; a row lock and a commit on
PostgreSQL) that touches no table a request contends for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import text

from certgate.console.services import ca
from certgate.console.state import ConsoleState
from certgate.errors import CertgateError
from certgate.httperrors import storage_reason
from certgate.pki.authority import probe_signer

log = logging.getLogger("certgate.console.health")
WRITE_PROBE = text("UPDATE alembic_version SET version_num = version_num")
Check = Callable[[ConsoleState], None]


def _database(state: ConsoleState) -> None:
    with state.db.transaction() as session:
        session.execute(WRITE_PROBE)


def _signer(state: ConsoleState) -> None:
    probe_signer(state.pki.issuer(ca.DEVICE_ROOT).key)


CHECKS: dict[str, Check] = {"database": _database, "signer": _signer}


def run_checks(state: ConsoleState) -> dict[str, str]:
    """Every check's outcome: "ok", or the reason it failed (no traceback, no secret)."""
    return {name: _outcome(check, state) for name, check in CHECKS.items()}


def _outcome(check: Check, state: ConsoleState) -> str:
    try:
        check(state)
    except Exception as exc:  # a health check reports every failure; it must not raise
        log.warning("health check %s failed: %r", check.__name__.lstrip("_"), exc)
        if isinstance(exc, CertgateError):  # our own messages; others may name internals
            return f"{type(exc).__name__}: {str(exc)[:200]}"
        return storage_reason(exc) or type(exc).__name__
    return "ok"
