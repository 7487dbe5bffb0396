"""Signed snapshot pages (format 2), signed once per feed seq and shared between nodes.

Every node of a group bootstraps from the same pages: at 1,000,000 devices that is 20
pages of 50,000 entries, each a few tenths of a second of console CPU to read and sign.
``SnapshotPages`` keeps the signed pages of a group for the feed seq they were read at, so
that a second node (HA) or a retry gets them without the work being redone; and while a
page travels to its node and is verified there, the next one is prepared on a worker
thread, so that a bootstrap costs about the slower side's time a page, not both added.

A kept page is served only while no change has moved the group's feed past its seq (every
change bumps it, services/feed.py), for at most ``MAX_AGE_S`` (its token stays valid for
``tunnels.FEED_TTL_S``), and the pages kept are bounded in bytes.

From feed version 4 on, every page also carries the trust operations in use at its seq
(``rotation.trust_in_use``), read in the same transaction as the seq: a node that
resynchronises from a snapshot during or after a rotation converges from the page alone
(every rotation step bumps the feed seq, so a kept page never holds an older trust state).

Pages are read in read-only units of work (``Database.read_only``), which on SQLite take
no write lock, and nothing here waits for another thread inside a transaction: the caller
reads the seq in its own transaction, ends it, then asks for the page.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from certgate import jws
from certgate.console.services import ca, feed, rotation, tunnels
from certgate.console.store.db import Database
from certgate.feed import SNAPSHOT_TRUST_VERSION

__all__ = ["MAX_AGE_S", "MAX_BYTES", "PageKey", "SignedPage", "SnapshotPages"]

log = logging.getLogger(__name__)

MAX_AGE_S = 300.0  # a kept token still has 55 of its 60 minutes of validity
MAX_BYTES = 256 * 2**20  # format 2 pages of 1,000,000 devices take about 150 MB


@dataclass(frozen=True, slots=True)
class PageKey:
    group_id: str
    after: str
    limit: int
    version: int = 1  # the feed contract version the node asked for


@dataclass(frozen=True, slots=True)
class SignedPage:
    token: bytes
    seq: int
    next: str | None
    signed_at: float  # on the cache's clock (monotonic)


class SnapshotPages:
    """Signed format-2 snapshot pages, kept per (group, cursor, limit) and feed seq."""

    def __init__(
        self,
        db: Database,
        pki: ca.InstancePKI,
        *,
        max_bytes: int = MAX_BYTES,
        max_age_s: float = MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db, self._pki = db, pki
        self._max_bytes, self._max_age_s, self._clock = max_bytes, max_age_s, clock
        self._lock = threading.Lock()
        self._kept: OrderedDict[PageKey, SignedPage] = OrderedDict()
        self._kept_bytes = 0
        self._pending: dict[PageKey, Future[SignedPage]] = {}
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="snapshot-pages")
        self._expiry: threading.Timer | None = None

    def page(self, key: PageKey, seq: int) -> SignedPage:
        """The page ``key`` read at the group's ``seq`` or later; prepares the next one.

        Call it outside any transaction: it may wait for a page another thread signs."""
        page = self._shared(key, seq)
        if page.next is not None:
            self._prepare(PageKey(key.group_id, page.next, key.limit, key.version), page.seq)
        return page

    @property
    def kept_bytes(self) -> int:
        return self._kept_bytes

    def close(self) -> None:
        """Stop the worker and drop every kept page (a page being signed still finishes)."""
        self._worker.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for key in list(self._kept):
                self._drop(key)
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None

    def _shared(self, key: PageKey, seq: int) -> SignedPage:
        """One signing per page and seq, whoever asks first: the others wait for it."""
        while True:
            with self._lock:
                self._forget_older(key.group_id, seq)
                kept = self._usable(key, seq)
                if kept is not None:
                    return kept
                pending = self._pending.get(key)
                mine = pending is None
                if pending is None:
                    pending = self._pending[key] = Future()
            if mine:
                self._run(key, pending)
            page = pending.result()
            if page.seq >= seq:
                return page
            # Prepared before the feed reached ``seq``: sign it again (now at >= seq).

    def _prepare(self, key: PageKey, seq: int) -> None:
        with self._lock:
            if key in self._pending or self._usable(key, seq) is not None:
                return
            pending = self._pending[key] = Future()
        pending.add_done_callback(_log_failure)
        try:
            self._worker.submit(self._run, key, pending)
        except RuntimeError:  # closed: the page is signed when asked for
            with self._lock:
                self._pending.pop(key, None)
            pending.cancel()

    def _run(self, key: PageKey, pending: Future[SignedPage]) -> None:
        try:
            page = self._sign(key)
        except Exception as exc:
            with self._lock:
                self._pending.pop(key, None)
            pending.set_exception(exc)
            return
        with self._lock:  # kept before no longer pending: others see one or the other
            self._keep(key, page)
            self._pending.pop(key, None)
        pending.set_result(page)

    def _sign(self, key: PageKey) -> SignedPage:
        with self._db.read_only() as session:  # no writer waits for a page being read
            payload = feed.snapshot_columns(
                session, key.group_id, key.after, key.limit, key.version
            )
            if key.version >= SNAPSHOT_TRUST_VERSION:  # read in the seq's transaction
                ops = rotation.trust_in_use(session, self._pki, key.group_id, key.version)
                payload["trust"] = [op.encode() for op in ops]
            token = tunnels.sign_for_group(
                session, self._pki, key.group_id, payload, jws.TYP_SNAPSHOT_V2, tunnels.FEED_TTL_S
            )
        return SignedPage(token.encode(), payload["seq"], payload["next"], self._clock())

    # Under self._lock

    def _usable(self, key: PageKey, seq: int) -> SignedPage | None:
        page = self._kept.get(key)
        if page is None:
            return None
        if page.seq < seq or self._clock() - page.signed_at > self._max_age_s:
            self._drop(key)
            return None
        self._kept.move_to_end(key)
        return page

    def _forget_older(self, group_id: str, seq: int) -> None:
        """Drop the group's pages read before ``seq``: the feed moved, nobody gets them."""
        for key in [k for k, p in self._kept.items() if k.group_id == group_id and p.seq < seq]:
            self._drop(key)

    def _keep(self, key: PageKey, page: SignedPage) -> None:
        if len(page.token) > self._max_bytes:
            return
        self._drop(key)
        self._kept[key] = page
        self._kept_bytes += len(page.token)
        while self._kept_bytes > self._max_bytes:
            self._drop(next(iter(self._kept)))  # least recently used first
        if self._expiry is None:
            self._arm_expiry()

    def _drop(self, key: PageKey) -> None:
        page = self._kept.pop(key, None)
        if page is not None:
            self._kept_bytes -= len(page.token)

    def _arm_expiry(self) -> None:
        # Pages nobody asks for again go after at most twice their age, not at the next ask.
        self._expiry = threading.Timer(self._max_age_s, self._expire)
        self._expiry.daemon = True
        self._expiry.start()

    def _expire(self) -> None:
        with self._lock:
            self._expiry = None
            now = self._clock()
            for key in [k for k, p in self._kept.items() if now - p.signed_at > self._max_age_s]:
                self._drop(key)
            if self._kept:
                self._arm_expiry()


def _log_failure(done: Future[SignedPage]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.info("could not prepare a snapshot page ahead: %s", done.exception())
