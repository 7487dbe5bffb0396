"""Device list sync: follow the console's signed feed into the tunnel's ``DeviceTable``.

On start the persisted table (``persist.py``) is loaded and served at once. A signed
snapshot is fetched only when nothing is persisted, a batch does not continue the table
(``SequenceGap``) or is signed by a console identity the node may take but does not pin
yet (``Resynchronise``, "Catching up" below); otherwise the follower long-polls
``GET /api/v1/tunnel/feed?after=<seq>&wait=<s>`` from its cursor, over mTLS with the
group's tunnel identity, trusting only the instance Root.

Every message must verify with the group's console identity pinned at setup
(``jws.verify``: signer, ``typ``, group, ``iat``/``exp``). A message signed by anyone
else, expired, malformed, or whose sequence goes backwards is rejected and logged with
its reason, and the table stays exactly as it was: batches apply atomically
(``DeviceTable.apply_batch``) and snapshots are built aside, then swapped in (STYLE.md
habit 8).

Policy: the group policy (server traffic rules, staleness budget, long-poll, ports) is
feed content like the entries (``certgate.feed.PolicyUpdate``): batches and snapshot pages
carry it at their seq, the table keeps it, and the trust config's policy applies until the
feed brings one. The follower asks for contract version ``FEED_VERSION``, or the older
``feed_version`` it is pinned to (it then reads exactly as a node of that version: a
version 1 node gets no policy operations and rejects any newer message).

Rotation: a batch's ``trust`` operations (feed version 3, ``certgate.feed.TrustUpdate``)
carry the group's next tunnel or console identity. The follower checks it
(``tunnel.rotation``) at prepare. At switch a tunnel identity goes to the data plane
(``on_identity``: build the new TLS context aside, swap it in), is stored, and is presented
to the console from the next request; a console identity is pinned and stored, and the
old one is still accepted until finish (messages verify with either, ``_verify``).
Any failure keeps the identity in use and is logged and shown in ``status()``; the
console's rotation status then shows the node still presenting the old one. The trust
operations are applied before the batch is persisted, so a restart never skips one.

Catching up: snapshot pages (feed version 4) carry the trust operations in use at their
seq; the follower applies them through the same ``_apply_trust`` before the table is
served, those in use together (``rotation.next_state``), then the prepared ones. A node
that missed a console-identity rotation (down for its overlap, or resynchronising)
receives messages signed by an identity it does not pin: when that identity chains to the
node's instance Root through its Secure Channel Root, names this group's console and is
no older than the pinned one (``rotation.successor_console_identity``), the node
resynchronises from a snapshot, verifies it with that identity, and serves it only once
a trust operation of the snapshot naming that identity is checked as at setup and
pinned. A node that missed a whole Root rotation pins the old Root alone: the console
still offers the cross certificate the old Root signed for the new one (its TLS chain
ends at it), so the node verifies the console and takes the new Root from the replayed
steps or a snapshot's Root step, because the Root it pins vouches for it. Otherwise, as
when the console refuses its tunnel identity (retired by a rotation it missed) or its TLS
chain reaches no Root the node pins (two missed Root rotations), the node says what to
run (``status()["action_required"]``, an ERROR log line, ``/healthz``) and keeps failing
closed.

Every applied change is reported as a ``FeedChange`` naming what the data plane must judge
again: the thumbprints a batch touched, or every live tunnel after a snapshot swap or a
policy change. The follower never decides who may pass; ``admission.admit`` does.

Freshness: the list is fresh while the last successful exchange with the console (a
verified snapshot, or a long-poll answer 200 with an applied batch or 204) is younger
than the policy's ``max_staleness_s`` (default 300 s, ``config.py``). The time of that
exchange is persisted too, so a restart does not reset the budget. The data plane asks
``is_fresh()`` and fails closed when it is False, for new and live tunnels alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509

from certgate import jws
from certgate.errors import CertgateError, ConfigError, SignatureError
from certgate.feed import (
    CONSOLE_IDENTITY,
    FEED_VERSION,
    MIN_FEED_VERSION,
    ROOT,
    TUNNEL_IDENTITY,
    FeedError,
    PolicyUpdate,
    RotationPhase,
    TrustUpdate,
    message_version,
    split_trust,
)
from certgate.pki.thumbprint import thumbprint
from certgate.tlsconf import client_context
from certgate.tunnel import rotation, snapshot
from certgate.tunnel.config import TunnelState
from certgate.tunnel.persist import DEFAULT_COMPACT_AFTER_BYTES, PersistError, TableStore
from certgate.tunnel.table import Changes, DeviceTable, SequenceGap, SequenceReplay, SlotHome

__all__ = [
    "NODE_HEADER",
    "FeedChange",
    "FeedFollower",
    "FeedUnavailable",
    "Resynchronise",
    "is_fresh_age",
]

log = logging.getLogger(__name__)

NODE_HEADER = "Certgate-Node"
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 5.0
LOG_EVERY_N_FAILURES = 12
REQUEST_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
LONG_POLL_GRACE_S = 15.0
CLOCK_SKEW_S = 60.0
EXCHANGE_PERSIST_INTERVAL_S = 5.0
MAX_ERROR_TEXT = 200
MAX_ERROR_BODY = 2048  # read of an error answer: the JSON error body's detail, whole


class FeedUnavailable(CertgateError):
    """The console answered a feed request with something other than 200/204."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status, 0 when the console answered none


class Resynchronise(FeedError):
    """A batch the node cannot take but a snapshot may let it (signed by a console
    identity that may succeed the pinned one): fetch one at once."""


@dataclass(frozen=True, slots=True)
class FeedChange:
    """What the data plane must judge again after an applied change.

    ``thumbprints``: the live tunnels of these certificates; None: every live tunnel (a
    snapshot was swapped in, or the policy changed). ``signed_at`` is the console's
    signature time of what was applied (for time-to-enforce), ``cause`` names it for logs.
    """

    thumbprints: tuple[str, ...] | None
    signed_at: float | None
    cause: str


ChangeCallback = Callable[[FeedChange], None]
# Puts a verified next identity to use in the data plane; raises to refuse it.
IdentityCallback = Callable[[TunnelState], None]


@dataclass(frozen=True, slots=True)
class _VerifiedPage:
    signed_at: float  # the page's iat
    next: str | None
    trust: tuple[TrustUpdate, ...]  # in use at the page's seq (feed version 4)
    # The console identity that signed the page when the node does not pin it yet
    # (``rotation.successor_console_identity``); the page names it in a trust operation.
    successor: x509.Certificate | None


class FeedFollower:
    """Keeps ``table`` in step with the console's feed for one tunnel group.

    ``on_change`` (set at construction or later with ``subscribe``) receives a
    ``FeedChange`` after each applied batch and snapshot swap, on the event loop.
    """

    def __init__(
        self,
        state: TunnelState,
        on_change: ChangeCallback | None = None,
        *,
        state_dir: Path,
        clock: Callable[[], float] = time.time,
        compact_after_bytes: int = DEFAULT_COMPACT_AFTER_BYTES,
        snapshot_page: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        feed_version: int = FEED_VERSION,
        read_only: bool = False,
        table_home: SlotHome | None = None,
    ) -> None:
        if not MIN_FEED_VERSION <= feed_version <= FEED_VERSION:
            raise ValueError(f"feed version {feed_version} is not one this node speaks")
        self.state = state
        self.feed_version = feed_version
        self._snapshot_page = snapshot_page  # None: the console's page size
        self._transport = transport  # None: mTLS to the console; else a stand-in console
        self._on_change = on_change
        self._clock = clock
        # read_only: a look at a running node's table that never writes (tunnel status).
        self._store = TableStore(
            state_dir, compact_after_bytes=compact_after_bytes, read_only=read_only
        )
        # Where every table of this follower keeps its slots (None: anonymous memory; a
        # node with workers: files they map, ``shared_table.MappedFiles``).
        self._home = table_home
        self._table = DeviceTable(home=table_home)
        self._needs_snapshot = True
        self._store_behind = False
        self._last_exchange: float | None = None
        self._persisted_exchange: float | None = None
        self._last_error: str | None = None
        self._last_signed_at: float | None = None
        self._failures = 0
        self._client: httpx.AsyncClient | None = None
        self._retired_clients: list[httpx.AsyncClient] = []
        self._on_identity: IdentityCallback | None = None
        self._next: dict[str, str] = {}  # rotation kind -> thumbprint of a prepared one
        self._other_signers: tuple[x509.Certificate, ...] = ()
        self._identity_error: str | None = None
        self._action_required: str | None = None  # what the operator must do, when stuck
        self._load_persisted()
        self._was_fresh = self.is_fresh()

    # What the data plane and health endpoints read

    @property
    def table(self) -> DeviceTable:
        return self._table

    def subscribe(
        self, on_change: ChangeCallback, on_identity: IdentityCallback | None = None
    ) -> None:
        self._on_change = on_change
        self._on_identity = on_identity

    @property
    def policy(self) -> PolicyUpdate:
        """The group policy in force: the feed's latest, else the trust config's."""
        return self._table.policy or self.state.trust.policy

    @property
    def max_staleness_s(self) -> float:
        return self.policy.max_staleness_s

    @property
    def last_signed_at(self) -> float | None:
        """``iat`` of the last applied snapshot or batch (for time-to-enforce metrics)."""
        return self._last_signed_at

    def age_s(self, now: float | None = None) -> float | None:
        if self._last_exchange is None:
            return None
        return (self._clock() if now is None else now) - self._last_exchange

    def is_fresh(self, now: float | None = None) -> bool:
        return is_fresh_age(self.age_s(now), self.max_staleness_s)

    def status(self) -> dict[str, Any]:
        now = self._clock()
        self._note_freshness(now)
        age = self.age_s(now)
        return {
            "group_id": self.state.group_id,
            "node_name": self.state.node_name,
            "console_url": self.state.console_url,
            "seq": self._table.seq,
            "entries": len(self._table),
            "age_s": None if age is None else round(age, 3),
            "fresh": self.is_fresh(now),
            "max_staleness_s": self.max_staleness_s,
            "long_poll_s": self.policy.long_poll_s,
            "policy_version": self.policy.version,
            "feed_version": self.feed_version,
            "last_error": self._last_error,
            "consecutive_failures": self._failures,
            "tunnel_identity": self.state.tunnel_thumbprint,
            "next_tunnel_identity": self._next.get(TUNNEL_IDENTITY),
            "console_identity": thumbprint(self.state.console_identity),
            "next_console_identity": self._next.get(CONSOLE_IDENTITY),
            "identity_error": self._identity_error,
            "action_required": self._action_required,
            "certificates": [c.to_dict() for c in rotation.certificates_in_use(self.state, now)],
            "device_roots": rotation.device_root_thumbprints(self.state),
            "secure_channel_roots": rotation.secure_channel_root_thumbprints(self.state),
            "roots": rotation.root_thumbprints(self.state),
        }

    # Startup

    def _load_persisted(self) -> None:
        try:
            loaded = self._store.load(self._home)
        except (PersistError, OSError) as exc:
            log.warning("persisted device table unusable (%s); will fetch a snapshot", exc)
            return
        if loaded is None:
            return
        self._table.close()  # the empty one: nobody has seen it yet
        self._table, self._needs_snapshot = loaded.table, False
        # The budget runs from the last exchange before the restart, not from now.
        self._last_exchange = self._persisted_exchange = self._store.load_exchange_time()
        log.info(
            "loaded device table: %d entries at seq %d (snapshot seq %d + %d batches%s)",
            len(loaded.table),
            loaded.table.seq,
            loaded.snapshot_seq,
            loaded.batches_replayed,
            ", torn journal tail ignored" if loaded.torn_tail else "",
        )

    async def bootstrap(self) -> None:
        """Fetch a snapshot if nothing usable was persisted (raises if that fails)."""
        if self._needs_snapshot:
            await self.fetch_snapshot()

    # The loop

    async def run(self) -> None:
        """Sync until cancelled; never raises anything else (errors back off and retry)."""
        try:
            while True:
                try:
                    await self._step()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # any failure: keep the table, back off, retry
                    await asyncio.sleep(self._record_failure(exc))
        finally:
            await self.aclose()

    async def _step(self) -> None:
        if self._needs_snapshot:
            await self.fetch_snapshot()
            return
        try:
            await self.poll_once()
        except (SequenceGap, Resynchronise):
            self._needs_snapshot = True  # resynchronise at once, without backing off

    def _record_failure(self, exc: Exception) -> float:
        self._failures += 1
        self._last_error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, FeedUnavailable) and exc.status == 401:  # says what to do
            self._require_action(f"the console refuses this node's tunnel identity: {exc}")
        elif _console_not_verified(exc):
            self._require_action(self._unverified_console(exc))
        # Rejections were logged with their reason already; an outage is logged at its start
        # and then about once a minute (at the backoff cap), not on every retry.
        if not isinstance(exc, SignatureError | FeedError):
            level = logging.WARNING if self._failures % LOG_EVERY_N_FAILURES == 1 else logging.DEBUG
            log.log(level, "feed sync failed (attempt %d): %s", self._failures, self._last_error)
        self._note_freshness(self._clock())
        delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(self._failures - 1, 16))
        return random.uniform(delay / 2, delay)  # jitter spreads nodes of a group apart

    def _record_success(self, at: float) -> None:
        self._failures, self._last_error, self._last_exchange = 0, None, at
        self._action_required = None
        self._note_freshness(at)

    def _require_action(self, what: str) -> None:
        """The node cannot go on by itself: say what to do (once in the log, and in
        ``status()``, which ``/healthz`` shows) until an exchange succeeds again."""
        if what != self._action_required:
            log.error("%s", what)
        self._action_required = what

    def _unverified_console(self, exc: Exception) -> str:
        """What to do when the console's TLS certificate does not verify (its chain
        reaches no Root the node pins, or it does not name the console URL's host). One
        missed Root rotation is climbed by itself (the console serves the cross
        certificate the old Root signed); more than one, or another instance, is not."""
        roots = ", ".join(rotation.root_thumbprints(self.state))
        return (
            f"the console's TLS certificate does not verify against the instance Roots this"
            f" node pins ({roots}): {exc}; if the instance Root was rotated more than once"
            f" while this node was down, run 'certgate tunnel setup' for group"
            f" {self.state.group_id} again with the current Root's pin"
        )

    def _note_freshness(self, now: float) -> None:
        fresh = self.is_fresh(now)
        if fresh == self._was_fresh:
            return
        self._was_fresh = fresh
        if fresh:
            log.info("device list fresh again (seq %d)", self._table.seq)
        else:
            age = self.age_s(now)
            log.warning(
                "device list is STALE: last successful console exchange %s ago, budget %gs;"
                " new connections fail closed (last error: %s)",
                "never" if age is None else f"{age:.0f}s",
                self.max_staleness_s,
                self._last_error,
            )

    # HTTP

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            ctx = client_context(
                list(self.state.roots),
                chain=[self.state.tunnel_cert, *self.state.tunnel_chain],
                key=self.state.tunnel_key,
            )
            self._client = httpx.AsyncClient(
                base_url=self.state.console_url,
                verify=ctx,
                headers={NODE_HEADER: self.state.node_name},
                timeout=REQUEST_TIMEOUT_S,
                transport=self._transport,
            )
        return self._client

    async def post_report(self, body: dict[str, Any]) -> None:
        """POST the node's report (``tunnel.report``) over this follower's mTLS client;
        raises FeedUnavailable unless the console took it (204)."""
        path = "/api/v1/tunnel/report"
        response = await self._http().post(path, json=body)
        if response.status_code != 204:
            text = response.text[:MAX_ERROR_TEXT]
            raise FeedUnavailable(f"console answered {response.status_code} on {path}: {text}")

    async def aclose(self) -> None:
        clients, self._retired_clients = self._retired_clients, []
        if self._client is not None:
            clients.append(self._client)
            self._client = None
        for client in clients:
            await client.aclose()

    async def __aenter__(self) -> FeedFollower:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def _get(
        self, path: str, read_timeout: float, max_bytes: int, **params: Any
    ) -> bytes | None:
        """GET a signed message: its body on 200, None on 204, else FeedUnavailable."""
        timeout = httpx.Timeout(CONNECT_TIMEOUT_S, read=read_timeout)
        request = self._http().stream("GET", path, params=params, timeout=timeout)
        async with request as response:
            if response.status_code == 204:
                return None
            if response.status_code == 200:
                return await _read_bounded(response.aiter_bytes(), max_bytes)
            text = _error_text(await _read_prefix(response.aiter_bytes()))
        raise FeedUnavailable(
            f"console answered {response.status_code} on {path}: {text}", response.status_code
        )

    # Snapshots

    async def fetch_snapshot(self) -> None:
        """Fetch every page of a signed snapshot (format 2), verify each, take the trust
        operations in use at its seq, swap the table in.

        Pages are chained (each starts after the cursor of the last entry of the one before)
        and the table takes the first page's seq. A later page may have been read at a later seq,
        never an earlier one: the feed is then replayed from the first page's seq, which
        converges because batch operations are idempotent per thumbprint. The trust
        operations are the first page's too (later steps come with the replay).
        """
        path = self.state.trust.feed.snapshot_path
        limit = self._snapshot_page or snapshot.PAGE_LIMIT
        table: DeviceTable | None = None
        first: _VerifiedPage | None = None
        after = ""
        try:
            while True:
                params: dict[str, Any] = {"format": 2, "limit": limit, **self._version_param()}
                if after:
                    params["after"] = after
                body = await self._get(
                    path, REQUEST_TIMEOUT_S * 2, snapshot.max_token_bytes(limit), **params
                )
                if body is None:
                    raise FeedUnavailable(f"console answered 204 on {path}", 204)
                page, table = await self._checked(body, table, after, limit, first)
                first = first or page
                if page.next is None:
                    break
                after = page.next
            assert first is not None  # the loop ends on a page
            await self._take_trust(first)
        except BaseException:
            if table is not None:  # a partial table nobody served: its slots go now
                table.close()
            raise
        await self._swap(first.signed_at, table)

    async def accept_snapshot(self, token: bytes | str) -> None:
        """Verify a one-page signed snapshot (format 2), take its trust operations and
        swap it in; on failure keep the table."""
        page, table = await self._checked(token, None, "", snapshot.PAGE_LIMIT, None)
        try:
            if page.next is not None:
                raise FeedError("snapshot has further pages; use fetch_snapshot")
            await self._take_trust(page)
        except BaseException:
            table.close()
            raise
        await self._swap(page.signed_at, table)

    async def _checked(
        self,
        token: bytes | str,
        table: DeviceTable | None,
        after: str,
        limit: int,
        first: _VerifiedPage | None,
    ) -> tuple[_VerifiedPage, DeviceTable]:
        """``_verified_page`` off the event loop; a rejection is logged with its reason."""
        try:
            return await asyncio.to_thread(self._verified_page, token, table, after, limit, first)
        except (SignatureError, FeedError) as exc:
            log.warning("rejected feed snapshot: %s; keeping seq %d", exc, self._table.seq)
            raise

    async def _swap(self, signed_at: float, table: DeviceTable) -> None:
        old, self._table, self._needs_snapshot = self._table, table, False
        self._last_signed_at = signed_at
        log.info("applied snapshot: %d entries at seq %d", len(table), table.seq)
        # Served (and fresh) at once, and live tunnels it no longer admits closed, before
        # the table is written (0.5 s at 1,000,000 entries). The exchange time is persisted
        # only after the table, so that a restart never takes an older table on disk for a
        # fresher one.
        self._record_success(self._clock())
        self._notify(FeedChange(None, signed_at, "snapshot"))
        old.close()  # after the data plane (and any worker) was told of the new one
        self._store_behind = not await self._write(self._store.write_snapshot, table)
        await self._exchanged()
        await asyncio.to_thread(_release_free_memory)

    def _verified_page(
        self,
        token: bytes | str,
        table: DeviceTable | None,
        after: str,
        limit: int,
        first: _VerifiedPage | None,
    ) -> tuple[_VerifiedPage, DeviceTable]:
        payload, successor = self._page_payload(token, first)
        page = snapshot.decode_page(payload, after, limit, self.feed_version)
        if page.seq < self._table.seq:  # the current table is never rolled back
            raise SequenceReplay(
                f"snapshot seq {page.seq} is behind the table's seq {self._table.seq}",
                table_seq=self._table.seq,
                from_seq=page.seq,
                to_seq=page.seq,
            )
        if table is not None and page.seq < table.seq:
            raise FeedError(f"snapshot page of seq {page.seq} follows one of seq {table.seq}")
        if first is None and successor is not None:
            if not any(rotation.pins(op, successor) for op in page.trust):
                named = thumbprint(successor)
                raise FeedError(
                    f"snapshot signed by console identity {named}, which it never names"
                )
        if table is None:
            table = DeviceTable(page.seq, page.policy, home=self._home)
            try:
                self._fill(table, page)
            except BaseException:
                table.close()  # the caller never saw it
                raise
        else:
            self._fill(table, page)
        return _VerifiedPage(float(payload["iat"]), page.next, page.trust, successor), table

    def _page_payload(
        self, token: bytes | str, first: _VerifiedPage | None
    ) -> tuple[dict[str, Any], x509.Certificate | None]:
        """A page verified with an identity the node accepts, or else with the console
        identity that may succeed the pinned one (the first page's, for the later pages):
        the payload and that successor (None: verified with one the node accepts)."""
        try:
            return self._verify(token, jws.TYP_SNAPSHOT_V2), None
        except SignatureError:
            successor = first.successor if first is not None else self._successor(token)
            if successor is None:
                raise
        return self._verify_with(successor, token, jws.TYP_SNAPSHOT_V2), successor

    @staticmethod
    def _fill(table: DeviceTable, page: snapshot.Page) -> None:
        table.extend_columns(page.columns)
        if page.next is None:
            table.fit()  # the last page: every entry placed, in slots sized for them

    def _verify(self, token: bytes | str, typ: str) -> dict[str, Any]:
        """Verify with the pinned console identity, or during a console-identity rotation
        with the other one (announced in a message the pinned one signed)."""
        try:
            return self._verify_with(self.state.console_identity, token, typ)
        except SignatureError:
            for signer in self._other_signers:
                with contextlib.suppress(SignatureError):
                    return self._verify_with(signer, token, typ)
            raise

    def _verify_with(
        self, signer: x509.Certificate, token: bytes | str, typ: str
    ) -> dict[str, Any]:
        return jws.verify(token, signer, typ, self.state.group_id, now=self._clock())

    # Batches

    async def poll_once(self, wait: float | None = None) -> Changes | None:
        """One long-poll: apply the batch the console returns (200), or None on 204."""
        wait = self.policy.long_poll_s if wait is None else wait
        path = self.state.trust.feed.feed_path
        body = await self._get(
            path,
            wait + LONG_POLL_GRACE_S,
            jws.MAX_TOKEN_BYTES,
            after=self._table.seq,
            wait=wait,
            **self._version_param(),
        )
        if body is None:
            await self._exchanged()
            return None
        return await self.accept_batch(body)

    def _version_param(self) -> dict[str, int]:
        """``?version``, which version 1 nodes predate and never send."""
        return {} if self.feed_version == MIN_FEED_VERSION else {"version": self.feed_version}

    async def accept_batch(self, token: bytes | str) -> Changes:
        """Verify a signed batch and apply it whole, or reject it and keep the table."""
        seq = self._table.seq
        try:
            payload = self._verify_batch(token)
            from_seq, to_seq, entries = _batch_fields(payload)
            version = message_version(payload, self.feed_version)
            trust, entries = split_trust(entries, version)
            changes = self._table.apply_batch(from_seq, to_seq, entries, version)
        except SequenceGap as exc:
            log.info("feed gap (%s); resynchronising from a snapshot", exc)
            raise
        except Resynchronise:
            raise  # said why already
        except (SignatureError, FeedError) as exc:
            log.warning("rejected feed batch: %s; keeping seq %d", exc, seq)
            raise
        self._last_signed_at = signed_at = float(payload["iat"])
        for op in trust:  # before the batch is persisted: a restart sees it again
            await self._apply_trust([op])
        await self._store_batch(from_seq, to_seq, entries, version)
        await self._exchanged()
        if changes.policy is not None:
            log.info("applied group policy version %d (seq %d)", changes.policy.version, to_seq)
            self._notify(FeedChange(None, signed_at, "policy"))
        elif changes.touched:
            self._notify(FeedChange(changes.touched, signed_at, "batch"))
        return changes

    def _verify_batch(self, token: bytes | str) -> dict[str, Any]:
        """A batch verified as every message is; one signed by the console identity that
        may succeed the pinned one sends the node to a snapshot, whose trust operations
        name it (a node that missed a console-identity rotation learns it there)."""
        try:
            return self._verify(token, jws.TYP_BATCH)
        except SignatureError:
            successor = self._successor(token)
            if successor is None:
                raise
        log.info(
            "feed batch signed by console identity %s, which this node does not pin yet:"
            " resynchronising from a snapshot that names it",
            thumbprint(successor),
        )
        self._needs_snapshot = True
        raise Resynchronise("signed by a console identity this node does not pin yet")

    def _successor(self, token: bytes | str) -> x509.Certificate | None:
        """The console identity that signed ``token`` when it may succeed the pinned one
        (``rotation.successor_console_identity``); when it cannot, the node says what to
        do: it can verify nothing its console signs."""
        accepted = (self.state.console_identity, *self._other_signers)
        try:
            return rotation.successor_console_identity(self.state, token, accepted)
        except ConfigError as exc:
            self._require_action(
                f"the console signs with an identity this node cannot verify ({exc}):"
                f" run 'certgate tunnel setup' for group {self.state.group_id} again"
            )
            return None

    # Rotation

    async def _take_trust(self, page: _VerifiedPage) -> None:
        """A snapshot's trust operations, before its table is served: those in use at its
        seq together (their trust configs name each other's identities), then the
        prepared ones. A snapshot signed by a console identity the node did not pin is
        taken only once that identity is pinned (never fail open)."""
        in_use = [op for op in page.trust if not op.is_next]
        if in_use:
            await self._apply_trust(in_use)
        if page.successor is not None:
            if self.state.console_identity != page.successor:
                raise FeedError(
                    f"snapshot signed by console identity {thumbprint(page.successor)}, which"
                    f" this node could not pin: {self._identity_error}"
                )
            self._other_signers = ()  # the identity it pinned before is retired or retiring
        for op in page.trust:
            if op.is_next:
                await self._apply_trust([op])

    async def _apply_trust(self, ops: Sequence[TrustUpdate]) -> None:
        """Check what trust operations carry, all together, and use it: a batch's steps
        one at a time, a snapshot's in use together (``_take_trust``). A prepare step is
        held (``TrustUpdate.is_next``); others are used at once. Failures keep what is
        in use (logged, and in ``status()``)."""
        for op in ops:
            if rotation.is_current(self.state, op):
                self._next.pop(op.kind, None)
                if op.kind == CONSOLE_IDENTITY and op.phase is RotationPhase.FINISH:
                    self._other_signers = ()  # the new console identity alone from now on
        pending = [op for op in ops if not rotation.is_current(self.state, op)]
        if not pending:
            return
        held = pending[0].is_next
        assert not held or len(pending) == 1, "a prepare step is applied alone"
        try:
            identity = await asyncio.to_thread(rotation.next_state, self.state, pending)
            new = identity.state
            if not held and rotation.changes_data_plane(self.state, new) and self._on_identity:
                self._on_identity(new)  # the data plane first: it may refuse
        except (CertgateError, OSError) as exc:
            self._identity_error = f"{_steps(pending)}: {exc}"
            log.error("%s; keeping the identity in use", self._identity_error)
            return
        if held:
            self._hold(identity, pending[0])
        elif rotation.changes_anything(self.state, new):
            self._use(new, pending)
            log.info("%s: now using %s", _steps(pending), _identities(identity, pending))
            try:
                await asyncio.to_thread(rotation.store_identity, identity)
            except OSError as exc:
                self._identity_error = f"{_steps(pending)}: not stored: {exc}"
                log.error("%s; a restart would use the old one", self._identity_error)

    def _hold(self, identity: rotation.NextIdentity, op: TrustUpdate) -> None:
        """A prepare step: the next identity is checked and held, nothing in use changes;
        a console identity announced by the current one is accepted as a signer now."""
        new = identity.thumbprint(op.kind)
        self._next[op.kind], self._identity_error = new, None
        if op.kind == CONSOLE_IDENTITY:
            self._other_signers = (identity.state.console_identity,)
        log.info("rotation %d: holding the next %s %s", op.rotation, op.kind, new)

    def _use(self, state: TunnelState, ops: Sequence[TrustUpdate]) -> None:
        """Use ``state`` from now on. A new tunnel identity is presented to the console
        from the next request (requests in flight on the old client finish; it is closed
        with the follower); an old console identity is still accepted until finish."""
        previous, self.state = self.state, state
        self._identity_error = None
        for op in ops:
            self._next.pop(op.kind, None)
            if op.kind == CONSOLE_IDENTITY:
                finished = op.phase is RotationPhase.FINISH
                self._other_signers = () if finished else (previous.console_identity,)
            elif op.kind in (TUNNEL_IDENTITY, ROOT) and self._client is not None:
                self._retired_clients.append(self._client)
                self._client = None

    # Bookkeeping

    async def _store_batch(
        self, from_seq: int, to_seq: int, entries: list[object], version: int
    ) -> None:
        if self._store_behind:  # a write failed: the journal would skip a batch
            self._store_behind = not await self._write(self._store.write_snapshot, self._table)
        elif not await self._write(self._store.append_batch, from_seq, to_seq, entries, version):
            self._store_behind = True
        elif self._store.needs_compaction():  # if this fails the journal is still whole
            await self._write(self._store.write_snapshot, self._table)

    async def _write(self, write: Callable[..., None], *args: Any) -> bool:
        """Write to disk off the event loop. A failure is logged, not fatal: the table in
        memory is right, and a restart would catch up from an earlier seq."""
        try:
            await asyncio.to_thread(write, *args)
        except OSError as exc:
            log.error("could not persist the device table: %s", exc)
            return False
        return True

    async def _exchanged(self) -> None:
        now = self._clock()
        self._record_success(now)
        last = self._persisted_exchange
        if last is None or not 0 <= now - last < EXCHANGE_PERSIST_INTERVAL_S:
            self._persisted_exchange = now
            await self._write(self._store.save_exchange_time, now)

    def _notify(self, change: FeedChange) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(change)
        except Exception:  # a broken callback must not stop the sync
            log.exception("on_change callback failed after a %s", change.cause)


def _console_not_verified(exc: BaseException) -> bool:
    """``exc`` (an httpx error) comes from a console TLS chain that failed verification."""
    seen: BaseException | None = exc
    for _ in range(8):  # httpx wraps httpcore's error, which wraps ssl's
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def is_fresh_age(age: float | None, max_staleness_s: float) -> bool:
    """Is a list whose last console exchange is ``age`` seconds old fresh? (None: never.)
    The one home of that rule, for the follower and the workers (``tunnel.workers``)."""
    # A last exchange far in the future means a broken clock: do not trust it.
    return age is not None and -CLOCK_SKEW_S <= age < max_staleness_s


def _release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc's ``malloc_trim``; elsewhere a no-op).

    A snapshot passes through large buffers (tokens of 20 MB a page, their JSON) that glibc
    keeps in its arenas once freed: after a 1,000,000-device snapshot a node stayed at 402 MB
    resident, 315 MB after trimming (bench/results/summary.md).
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _steps(ops: Sequence[TrustUpdate]) -> str:
    """The rotation steps of ``ops``, for logs: "rotation 7 (console-identity switch)"."""
    return ", ".join(f"rotation {op.rotation} ({op.kind} {op.phase.value})" for op in ops)


def _identities(identity: rotation.NextIdentity, ops: Sequence[TrustUpdate]) -> str:
    return ", ".join(f"{op.kind} {identity.thumbprint(op.kind)}" for op in ops)


def _batch_fields(payload: dict[str, Any]) -> tuple[int, int, list[object]]:
    from_seq, to_seq = payload.get("from_seq"), payload.get("to_seq")
    entries = payload.get("entries")
    if type(from_seq) is not int or type(to_seq) is not int or not isinstance(entries, list):
        raise FeedError("batch lacks integer from_seq/to_seq or its entries")
    return from_seq, to_seq, entries


async def _read_prefix(chunks: AsyncIterator[bytes]) -> bytes:
    """The start of an error answer, for the log; the rest is not read."""
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        if len(buffer) >= MAX_ERROR_BODY:
            break
    return bytes(buffer[:MAX_ERROR_BODY])


def _error_text(body: bytes) -> str:
    """What the console said: the ``detail`` of the project's JSON error body (it says
    what to do, e.g. which command to run), else the start of the answer."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        detail = None
    text = detail if isinstance(detail, str) else body.decode(errors="replace")
    return text[: MAX_ERROR_BODY // 4]


async def _read_bounded(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        if len(buffer) > limit:
            raise FeedUnavailable(f"console answer exceeds {limit} bytes")
    return bytes(buffer)
