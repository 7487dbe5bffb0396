"""Access sign-in transactions in the console's database, so that any Access node can
finish a sign-in another one started (issue #16).

The OAuth protocol stays in Access (``certgate.access.oidc``); this module only keeps the
shared state and enforces what must hold across nodes:

* keys are SHA-256 hashes of the handle and of the code, computed by Access: the console
  never sees, stores or logs either secret;
* a transaction moves awaiting-cert -> code-issued | denied, code-issued -> redeemed, each
  step one conditional ``UPDATE ... WHERE state = <from> AND <not expired>``: exactly one
  concurrent caller changes the row, every other one is refused (a code is single use on
  every node and every backend, without locks held across requests);
* expiry is judged by the console's clock (one clock for every node); expired rows are
  purged as new sign-ins begin.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from certgate.console.store.models import AccessSignIn
from certgate.errors import Conflict, NotFound, Unavailable

__all__ = [
    "MAX_OPEN",
    "SignInState",
    "begin",
    "deny",
    "issue_code",
    "pending",
    "purge",
    "redeem",
    "to_code",
]

MAX_OPEN = 100_000  # /authorize is unauthenticated: bound what it can make us store


class SignInState(Enum):
    AWAITING_CERT = "awaiting-cert"
    CODE_ISSUED = "code-issued"
    DENIED = "denied"
    REDEEMED = "redeemed"


S = SignInState


def purge(session: Session, now: datetime) -> int:
    """Delete every transaction past its last possible use; returns how many."""
    result = session.execute(delete(AccessSignIn).where(AccessSignIn.purge_after <= now))
    return int(getattr(result, "rowcount", 0) or 0)


def begin(
    session: Session,
    handle_hash: str,
    request: dict[str, Any],
    request_ttl: timedelta,
    code_ttl: timedelta,
    now: datetime,
) -> None:
    """Open a transaction awaiting the device certificate, for ``request_ttl``."""
    purge(session, now)
    count = session.scalar(select(func.count()).select_from(AccessSignIn)) or 0
    if count >= MAX_OPEN:
        raise Unavailable(f"too many pending sign-ins ({MAX_OPEN}); try again later")
    if session.get(AccessSignIn, handle_hash) is not None:
        raise Conflict("a sign-in with this handle exists")
    expires = now + request_ttl
    session.add(
        AccessSignIn(
            handle_hash=handle_hash,
            state=S.AWAITING_CERT.value,
            request=request,
            created_at=now,
            expires_at=expires,
            purge_after=expires + code_ttl,
        )
    )
    session.flush()


def pending(session: Session, handle_hash: str, now: datetime) -> AccessSignIn:
    """The transaction waiting for its certificate step; raises when there is none."""
    row = session.get(AccessSignIn, handle_hash)
    if row is None or row.expires_at <= now:
        raise NotFound("unknown or expired sign-in; start again")
    if row.state != S.AWAITING_CERT.value:
        raise Conflict(f"this sign-in is already {row.state}")
    return row


def _move(session: Session, handle_hash: str, now: datetime, **values: Any) -> None:
    """awaiting-cert -> ``values['state']``, if still awaiting and not expired."""
    changed = session.execute(
        update(AccessSignIn)
        .where(
            AccessSignIn.handle_hash == handle_hash,
            AccessSignIn.state == S.AWAITING_CERT.value,
            AccessSignIn.expires_at > now,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if getattr(changed, "rowcount", 0) != 1:
        session.expire_all()
        pending(session, handle_hash, now)  # raises with the reason
        raise Conflict("this sign-in changed concurrently")  # pragma: no cover


def issue_code(
    session: Session,
    handle_hash: str,
    code_hash: str,
    grant: dict[str, Any],
    group_id: str,
    code_ttl: timedelta,
    now: datetime,
) -> None:
    """The device was admitted: bind the code (by its hash) and the grant."""
    code_expires = now + code_ttl
    _move(
        session,
        handle_hash,
        now,
        state=S.CODE_ISSUED.value,
        code_hash=code_hash,
        grant=grant,
        group_id=group_id,
        code_expires_at=code_expires,
        purge_after=code_expires,
    )


def deny(session: Session, handle_hash: str, now: datetime) -> None:
    """The device was refused: the transaction can no longer yield a code."""
    _move(session, handle_hash, now, state=S.DENIED.value)


def to_code(session: Session, code_hash: str, now: datetime) -> AccessSignIn:
    """The transaction a live code belongs to (to authorize the caller before redeeming)."""
    row = session.scalar(select(AccessSignIn).where(AccessSignIn.code_hash == code_hash))
    if row is None or row.code_expires_at is None or row.code_expires_at <= now:
        raise NotFound("unknown or expired authorization code")
    if row.state != S.CODE_ISSUED.value:
        raise Conflict("authorization code already used")
    return row


def redeem(session: Session, code_hash: str, now: datetime) -> AccessSignIn:
    """Spend the code: one conditional UPDATE; whoever changes the row wins, any other
    caller (concurrent or later, on any node) is refused (RFC 6749 §4.1.2)."""
    changed = session.execute(
        update(AccessSignIn)
        .where(
            AccessSignIn.code_hash == code_hash,
            AccessSignIn.state == S.CODE_ISSUED.value,
            AccessSignIn.code_expires_at > now,
        )
        .values(state=S.REDEEMED.value)
        .execution_options(synchronize_session=False)
    )
    session.expire_all()
    if getattr(changed, "rowcount", 0) != 1:
        to_code(session, code_hash, now)  # raises with the reason
        raise Conflict("authorization code already used")  # pragma: no cover
    row = session.scalar(select(AccessSignIn).where(AccessSignIn.code_hash == code_hash))
    assert row is not None
    return row
