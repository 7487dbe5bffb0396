"""Token buckets for failed authentications, per account and per client address. Sans-IO:
the caller passes the monotonic time. Only failures take a token; a success takes none.

One limiter per surface: the web console's sign-in form (``console.ui``) and the console
API's credentials: enrollment passwords and tokens, device credentials, API keys
(``console.app``). An account is what the caller claims to be (a user name); a bare secret
(a token, a key) names no account and is limited by address only.

In the console process's memory: a restart refills every bucket, which at worst allows
one more burst; several console processes would each hold their own buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ACCOUNT_BURST, ACCOUNT_REFILL_S = 5, 60.0  # 5 failures, then one more a minute
ADDRESS_BURST, ADDRESS_REFILL_S = 20, 6.0  # 20 failures, then one more every 6 s
MAX_KEYS = 100_000  # buckets kept; full ones are dropped first


@dataclass(slots=True)
class Bucket:
    tokens: float
    at: float


@dataclass
class TokenBuckets:
    burst: int
    refill_s: float
    buckets: dict[str, Bucket] = field(default_factory=dict)

    def _level(self, key: str, now: float) -> Bucket:
        bucket = self.buckets.get(key) or Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) / self.refill_s)
        bucket.at = now
        return bucket

    def wait_s(self, key: str, now: float) -> int:
        """0 when a failure may still be tried; else whole seconds until it may."""
        tokens = self._level(key, now).tokens
        return 0 if tokens >= 1 else math.ceil((1 - tokens) * self.refill_s)

    def take(self, key: str, now: float) -> None:
        bucket = self._level(key, now)
        bucket.tokens = max(0.0, bucket.tokens - 1)
        self.buckets[key] = bucket
        if len(self.buckets) > MAX_KEYS:
            self._drop_full(now)

    def _drop_full(self, now: float) -> None:
        for key in [k for k in self.buckets if self._level(k, now).tokens >= self.burst]:
            del self.buckets[key]


@dataclass
class SignInLimiter:
    accounts: TokenBuckets = field(
        default_factory=lambda: TokenBuckets(ACCOUNT_BURST, ACCOUNT_REFILL_S)
    )
    addresses: TokenBuckets = field(
        default_factory=lambda: TokenBuckets(ADDRESS_BURST, ADDRESS_REFILL_S)
    )

    def retry_after(self, username: str | None, address: str, now: float) -> int:
        """Seconds to wait before this account or address may try again (0: go ahead)."""
        account = self.accounts.wait_s(username.lower(), now) if username else 0
        return max(account, self.addresses.wait_s(address, now))

    def failed(self, username: str | None, address: str, now: float) -> None:
        if username:
            self.accounts.take(username.lower(), now)
        self.addresses.take(address, now)
