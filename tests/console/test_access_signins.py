"""Access sign-in transactions in the console's database (``services.access_signins``), on
SQLite and PostgreSQL: the state machine's order, expiry by the console's clock, purging,
and single use of a code under concurrent redemptions (exactly one wins)."""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from certgate.console.services import access_signins as signins
from certgate.console.services import ca
from certgate.console.store.db import Database, migrate
from certgate.console.store.models import AccessSignIn
from certgate.errors import CertgateError, Conflict, NotFound

REQUEST = {
    "client_id": "com.example.mail",
    "redirect_uri": "com.example.mail:/cb",
    "scope": ["openid"],
    "state": "s",
    "nonce": "n",
    "code_challenge": "x" * 43,
}
GRANT: dict[str, Any] = {"device_uid": "d" * 32, "group_id": "android"}
TTL = timedelta(seconds=60)
RACERS = 8


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    migrate(database.engine)
    try:
        yield database
    finally:
        database.dispose()


def new_hash() -> str:
    return hashlib.sha256(secrets.token_bytes(32)).hexdigest()


def begun(db: Database, ttl: timedelta = TTL) -> str:
    handle = new_hash()
    with db.transaction() as session:
        signins.begin(session, handle, REQUEST, ttl, TTL, ca.now())
    return handle


def with_code(db: Database, code_ttl: timedelta = TTL) -> str:
    handle, code = begun(db), new_hash()
    with db.transaction() as session:
        signins.issue_code(session, handle, code, GRANT, "android", code_ttl, ca.now())
    return code


def test_a_code_is_redeemed_once_with_its_request_and_grant(db: Database) -> None:
    code = with_code(db)
    with db.transaction() as session:
        row = signins.redeem(session, code, ca.now())
        assert (row.state, row.request, row.grant) == ("redeemed", REQUEST, GRANT)
    with db.transaction() as session, pytest.raises(Conflict, match="already used"):
        signins.redeem(session, code, ca.now())


def test_concurrent_redemptions_of_one_code_have_exactly_one_winner(db: Database) -> None:
    """Each racer in its own transaction and connection, released together: the
    conditional UPDATE lets one change the row; every other one is refused."""
    code = with_code(db)
    start = threading.Barrier(RACERS)
    outcomes: list[str] = []

    def race() -> None:
        start.wait(timeout=30)
        try:
            with db.transaction() as session:
                signins.redeem(session, code, ca.now())
            outcomes.append("won")
        except CertgateError as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=race) for _ in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["Conflict"] * (RACERS - 1) + ["won"]


def test_an_expired_code_is_refused_and_stays_unredeemed(db: Database) -> None:
    code = with_code(db)
    later = ca.now() + TTL + timedelta(seconds=1)
    with db.transaction() as session, pytest.raises(NotFound, match="unknown or expired"):
        signins.redeem(session, code, later)
    with db.transaction() as session:
        assert session.scalar(select(AccessSignIn.state)) == "code-issued"


def test_an_unknown_code_is_refused(db: Database) -> None:
    with db.transaction() as session, pytest.raises(NotFound, match="unknown or expired"):
        signins.redeem(session, new_hash(), ca.now())


def test_a_sign_in_yields_one_code_or_one_denial(db: Database) -> None:
    handle = begun(db)
    with db.transaction() as session:
        assert signins.pending(session, handle, ca.now()).request == REQUEST
        signins.issue_code(session, handle, new_hash(), GRANT, "android", TTL, ca.now())
    with db.transaction() as session, pytest.raises(Conflict, match="already code-issued"):
        signins.issue_code(session, handle, new_hash(), GRANT, "android", TTL, ca.now())
    with db.transaction() as session, pytest.raises(Conflict, match="already code-issued"):
        signins.deny(session, handle, ca.now())
    denied = begun(db)
    with db.transaction() as session:
        signins.deny(session, denied, ca.now())
    with db.transaction() as session, pytest.raises(Conflict, match="already denied"):
        signins.issue_code(session, denied, new_hash(), GRANT, "android", TTL, ca.now())


def test_an_expired_sign_in_gets_no_code(db: Database) -> None:
    handle = begun(db, ttl=timedelta(seconds=30))
    later = ca.now() + timedelta(seconds=31)
    with db.transaction() as session, pytest.raises(NotFound, match="unknown or expired"):
        signins.issue_code(session, handle, new_hash(), GRANT, "android", TTL, later)
    with db.transaction() as session, pytest.raises(NotFound, match="unknown or expired"):
        signins.pending(session, handle, later)


def test_a_handle_is_opened_once(db: Database) -> None:
    handle = begun(db)
    with db.transaction() as session, pytest.raises(Conflict, match="exists"):
        signins.begin(session, handle, REQUEST, TTL, TTL, ca.now())


def test_rows_past_their_last_use_are_purged_as_sign_ins_begin(db: Database) -> None:
    with_code(db)
    begun(db)
    much_later = ca.now() + 2 * TTL + timedelta(seconds=1)
    with db.transaction() as session:
        signins.begin(session, new_hash(), REQUEST, TTL, TTL, much_later)
        assert session.scalar(select(func.count()).select_from(AccessSignIn)) == 1


def test_open_sign_ins_are_bounded(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signins, "MAX_OPEN", 2)
    begun(db)
    begun(db)
    with db.transaction() as session, pytest.raises(CertgateError, match="too many"):
        signins.begin(session, new_hash(), REQUEST, TTL, TTL, ca.now())
