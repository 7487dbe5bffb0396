"""The shared failure limiter (sans-IO): a bare secret names no account and is held by its
address alone; an account is held across addresses, case-insensitively."""

from __future__ import annotations

from certgate.ratelimit import ACCOUNT_BURST, ADDRESS_BURST, ADDRESS_REFILL_S, SignInLimiter


def test_no_account_is_held_by_address_only() -> None:
    limiter = SignInLimiter()
    for _ in range(ADDRESS_BURST):
        assert limiter.retry_after(None, "10.0.0.1", 0.0) == 0
        limiter.failed(None, "10.0.0.1", 0.0)
    assert limiter.retry_after(None, "10.0.0.1", 0.0) == ADDRESS_REFILL_S
    assert limiter.retry_after(None, "10.0.0.2", 0.0) == 0
    assert not limiter.accounts.buckets


def test_an_account_is_held_from_every_address() -> None:
    limiter = SignInLimiter()
    for i in range(ACCOUNT_BURST):
        limiter.failed("Bob", f"10.0.0.{i}", 0.0)
    assert limiter.retry_after("bob", "10.9.9.9", 0.0) > 0
    assert limiter.retry_after("carol", "10.9.9.9", 0.0) == 0
