"""Keyset pagination, one contract for the API and the web console.

A page is the rows after a cursor in a stable order on an index; the cursor is the last
row's sort key, base64url JSON, opaque to clients. Page N costs what page 1 costs, at any
table size. The API answers the next page's URL in a ``Link: <...>; rel="next"`` header
(RFC 8288) and leaves the body a plain list; no ``Link`` means the last page.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence

from starlette.datastructures import URL

from certgate.errors import BadRequest

MAX_PAGE = 1000
DEFAULT_PAGE = 100


def encode_cursor(values: Sequence[str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, size: int) -> list[str]:
    """The sort key a cursor holds (``size`` strings); BadRequest for anything else."""
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except ValueError as exc:
        raise BadRequest("malformed page cursor") from exc
    if not (
        isinstance(values, list)
        and len(values) == size
        and all(isinstance(v, str) and len(v) <= 256 for v in values)
    ):
        raise BadRequest("malformed page cursor")
    return values


def next_link(url: URL, cursor: str | None) -> dict[str, str]:
    """The ``Link`` header naming the next page (none on the last page)."""
    if not cursor:
        return {}
    return {"link": f'<{url.include_query_params(cursor=cursor)}>; rel="next"'}
