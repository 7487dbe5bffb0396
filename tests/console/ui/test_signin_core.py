"""The pure parts of sign-in: TOTP steps (RFC 6238 vectors, window, no replay), the
session-bound CSRF token, and the failed-sign-in token buckets."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pyotp
import pytest

from certgate.console.services import signin
from certgate.errors import AuthError
from certgate.pki.keystore import MasterKey
from certgate.ratelimit import ACCOUNT_BURST, ACCOUNT_REFILL_S, SignInLimiter

# RFC 6238 Appendix B: SHA-1 seed "12345678901234567890"; T = 59 s gives 94287082 (8
# digits), whose last six digits are the 6-digit code.
RFC_SECRET = base64.b32encode(b"12345678901234567890").decode()
AT_59 = datetime.fromtimestamp(59, UTC)


def test_the_rfc_6238_vector_is_accepted_once() -> None:
    step = signin.totp_step(RFC_SECRET, "287082", AT_59, after_step=0)
    assert step == 1
    assert signin.totp_step(RFC_SECRET, "287082", AT_59, after_step=step) is None


def test_codes_one_step_off_pass_two_steps_off_do_not() -> None:
    totp, now = pyotp.TOTP(RFC_SECRET), datetime.fromtimestamp(3000, UTC)
    assert signin.totp_step(RFC_SECRET, totp.at(3000 - 30), now, 0) == 99
    assert signin.totp_step(RFC_SECRET, totp.at(3000 + 30), now, 0) == 101
    assert signin.totp_step(RFC_SECRET, totp.at(3000 - 60), now, 0) is None
    assert signin.totp_step(RFC_SECRET, totp.at(3000 + 60), now, 0) is None


def test_malformed_codes_are_refused() -> None:
    for code in ("", "28708", "2870821", "28708a", " 287082"):
        assert signin.totp_step(RFC_SECRET, code, AT_59, 0) is None


def test_csrf_token_is_bound_to_the_session_secret() -> None:
    assert signin.csrf_token("a") == signin.csrf_token("a")
    assert signin.csrf_token("a") != signin.csrf_token("b")


def test_totp_seal_opens_only_for_its_admin_and_key() -> None:
    master = MasterKey(b"k" * 32)
    blob = signin.seal_totp(master, "admin1", RFC_SECRET)
    assert RFC_SECRET.encode() not in blob
    assert signin.unseal_totp(master, "admin1", blob) == RFC_SECRET
    for key, admin in ((master, "admin2"), (MasterKey(b"x" * 32), "admin1")):
        with pytest.raises(AuthError):
            signin.unseal_totp(key, admin, blob)


def test_account_bucket_empties_after_the_burst_and_refills() -> None:
    limiter = SignInLimiter()
    for _ in range(ACCOUNT_BURST):
        assert limiter.retry_after("alice", "10.0.0.1", 0.0) == 0
        limiter.failed("alice", "10.0.0.1", 0.0)
    assert limiter.retry_after("ALICE", "10.0.0.2", 0.0) == ACCOUNT_REFILL_S
    assert limiter.retry_after("bob", "10.0.0.2", 0.0) == 0
    assert limiter.retry_after("alice", "10.0.0.2", ACCOUNT_REFILL_S) == 0


def test_address_bucket_limits_many_accounts_from_one_address() -> None:
    limiter = SignInLimiter()
    for n in range(20):
        limiter.failed(f"user{n}", "10.0.0.9", 0.0)
    assert limiter.retry_after("someone-new", "10.0.0.9", 0.0) > 0
    assert limiter.retry_after("someone-new", "10.0.0.8", 0.0) == 0
