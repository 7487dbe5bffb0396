"""Tunnel-facing API: install by one-time token, signed snapshot, long-poll feed, and the
nodes' reports of their live tunnels (``tunnel.report``; kept for dry-runs, not audited:
every node sends one every 2 s).

Feed calls authenticate with the group's tunnel identity certificate over mTLS. The
long-poll holds a request open until the group's feed moves past the cursor or the wait
ends; a commit on this node wakes it at once, one on another console node (PostgreSQL
NOTIFY) or by the local CLI (SQLite ``data_version``, ``console/notify.py``) within tens of
milliseconds; a 1 s recheck stays as a safety net. A batch answered after a wait is logged
with what woke the long-poll (``woken_by=commit|notify|data_version|reconnect|recheck``):
the way to tell a wake-up from the safety net.

Snapshot pages come in two formats (docs/CONVENTIONS.md): 1, entries as feed objects, the
default for nodes that predate 2; and 2, columns, signed once per feed seq and shared by
every node of the group (``services.snapshots``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from certgate.console.api import schemas as s
from certgate.console.api.deps import NODE_HEADER, state_of, tunnel_tx
from certgate.console.services import audit, tunnels
from certgate.console.services.feed import SNAPSHOT_PAGE, current_seq
from certgate.console.services.snapshots import PageKey
from certgate.errors import BadRequest
from certgate.feed import FEED_VERSION, MIN_FEED_VERSION

log = logging.getLogger("certgate.console.feed")
router = APIRouter(prefix="/api/v1/tunnel", responses=s.CALL_ERRORS)
JWS_TYPE = "application/jose"
CROSS_NODE_RECHECK_S = 1.0
CURSOR_HEX = {1: 64, 2: 96}
SIGNED = s.binary_answer("A JWS signed by the console (docs/CONVENTIONS.md).", JWS_TYPE)


@router.post("/install")
def install(request: Request, body: s.InstallIn) -> dict[str, Any]:
    """Redeem an installer bundle's one-time token for the group's identity pair."""
    state = state_of(request)
    request.state.actor = f"installer@{request.client.host if request.client else '?'}"
    with state.db.transaction() as session:
        address = body.address or (request.client.host if request.client else "")
        bundle = tunnels.redeem_install_token(
            session, state.pki, body.token, state.config.public_url, body.node_name, address
        )
        audit.append(
            session,
            request.state.actor,
            "tunnel.install",
            group_id=bundle["group_id"],
            node=body.node_name,
            address=address,
        )
        return bundle


@router.get("/feed/snapshot", response_class=Response, responses=SIGNED)
def snapshot(
    request: Request,
    after: str = Query("", pattern="^([0-9a-f]{64}|[0-9a-f]{96})?$"),
    limit: int = Query(SNAPSHOT_PAGE, ge=1, le=SNAPSHOT_PAGE),
    page_format: int = Query(1, alias="format", ge=1, le=2),
    version: int = Query(MIN_FEED_VERSION, ge=MIN_FEED_VERSION),
) -> Response:
    """A signed page of the group's live entries after the cursor ``after``: a thumbprint
    in format 1, a device uid and a thumbprint in format 2. ``version``: the node's feed
    contract version; the page is of that version or the newest this console speaks."""
    state = state_of(request)
    if after and len(after) != CURSOR_HEX[page_format]:
        raise BadRequest(
            f"a format {page_format} cursor has {CURSOR_HEX[page_format]} hex digits"
            " (format 1: a thumbprint; format 2: a device uid, then a thumbprint)"
        )
    if page_format == 1:
        with tunnel_tx(request) as (session, group_id):
            token = tunnels.signed_snapshot(session, state.pki, group_id, after, limit)
        return Response(token, media_type=JWS_TYPE)
    with tunnel_tx(request) as (session, group_id):
        seq = current_seq(session, group_id)
    # Outside the transaction: the page may be one another request is signing.
    key = PageKey(group_id, after, limit, min(version, FEED_VERSION))
    page = state.snapshot_pages.page(key, seq)
    return Response(page.token, media_type=JWS_TYPE)


def _poll_once(
    request: Request, after: int, version: int
) -> tuple[str, int, tunnels.SignedBatch | None]:
    """(group, its notifier mark taken before the feed was read, the batch or None)."""
    state = state_of(request)
    with tunnel_tx(request) as (session, group_id):
        mark = state.notifier.mark(group_id)
        return group_id, mark, tunnels.signed_batch(session, state.pki, group_id, after, version)


@router.get(
    "/feed",
    response_class=Response,
    responses={**SIGNED, 204: {"description": "No change came within `wait` seconds."}},
)
async def feed(
    request: Request,
    after: int = Query(ge=0),
    wait: float = Query(25.0, ge=0, le=300),
    version: int = Query(MIN_FEED_VERSION, ge=MIN_FEED_VERSION),
) -> Response:
    """Changes after ``after`` as one signed batch (200), or 204 when none came in time.
    ``version``: the node's feed contract version (1 for nodes that do not say)."""
    state = state_of(request)
    deadline = time.monotonic() + min(wait, state.config.long_poll_max_s)
    version = min(version, FEED_VERSION)
    woken_by: str | None = None  # what ended the last wait; None: no wait yet
    while True:
        group_id, mark, batch = await run_in_threadpool(_poll_once, request, after, version)
        if batch is not None:
            if woken_by is not None:
                log.info(
                    "feed batch group=%s node=%s to_seq=%d woken_by=%s",
                    group_id,
                    request.headers.get(NODE_HEADER, "-"),
                    batch.to_seq,
                    woken_by,
                )
            return Response(
                batch.token, media_type=JWS_TYPE, headers={"certgate-feed-seq": str(batch.to_seq)}
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0 or await request.is_disconnected():
            return Response(status_code=204)
        wait_s = min(remaining, CROSS_NODE_RECHECK_S)
        woken_by = await state.notifier.wait(group_id, wait_s, since=mark) or "recheck"


@router.post("/report", status_code=204)
def report(request: Request, body: s.TunnelReportIn) -> Response:
    """A node's live tunnels and sync state, kept as its latest report (204)."""
    name = request.headers.get(NODE_HEADER)
    with tunnel_tx(request) as (session, group_id):
        tunnels.record_report(
            session, group_id, name, body.model_dump(mode="json", exclude_unset=True)
        )
    return Response(status_code=204)
