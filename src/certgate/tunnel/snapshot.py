"""Snapshot pages, format 2: a verified page's envelope and columns, checked and decoded.

docs/CONVENTIONS.md ("Snapshot pages") is the contract. ``jws.verify`` has already checked
the signature against the pinned console identity, the ``typ``, the group and the validity
window; this module checks the rest before anything reaches a table: exact keys, the seq,
the cursor chain (the page starts where it was asked to, its entries are strictly
ascending by device uid and thumbprint and after that cursor, ``next`` is its last
entry's), the entry count against the limit the node asked for, and the length and type
of every column. ``decode_page``
returns ``table.Columns``; ``DeviceTable.extend_columns`` then checks the attribute values.

Format 1 sent each entry as a feed object (about 400 bytes; a page token of 20 MB), and a
node spent half its time a page decoding and validating them field by field. Format 2
sends thumbprints and device uids as one hex string each, ``not_after`` as a list of
integers, and the remaining fields as an index into their few distinct combinations: about
110 bytes an entry, checked a column at a time.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass

from certgate import feed
from certgate.feed import ATTRIBUTE_FIELDS, FeedError, InvalidEntry, PolicyUpdate, TrustUpdate
from certgate.tunnel.table import Columns

__all__ = ["PAGE_LIMIT", "Page", "decode_page", "max_token_bytes"]

PAGE_LIMIT = 50_000  # entries a node asks for a page (the console's largest page)
# Worst case of an entry: 64 + 32 hex digits, a 19-digit not_after, an index, and (if
# every entry had its own combination) 63-character group and 255-character bundle ids:
# under 500 bytes of JSON, under 700 once base64url-encoded in the token.
TOKEN_BYTES_PER_ENTRY = 700
TOKEN_BYTES_FIXED = 64 * 1024  # header with the x5c chain, envelope, signature

_PAGE_KEYS = frozenset({"group_id", "iat", "exp", "seq", "after", "next", "entries"})
# Version 2 pages say their version and carry the group policy at their seq; version 4
# pages also the trust operations in use at their seq.
_PAGE_KEYS_V2 = _PAGE_KEYS | {"version", "policy"}
_PAGE_KEYS_V4 = _PAGE_KEYS_V2 | {"trust"}
_ENTRIES_KEYS = frozenset({"count", "thumbprint", "device_uid", "not_after", "attributes"})
_ATTRIBUTES_KEYS = frozenset({"fields", "values", "index"})
_THUMBPRINT_BYTES, _UID_BYTES = 32, 16
_MAX_NOT_AFTER = 2**63 - 1  # int64 in the table's record


@dataclass(frozen=True, slots=True)
class Page:
    seq: int
    next: str | None  # the cursor of the following page; None: the snapshot is complete
    columns: Columns
    policy: PolicyUpdate | None  # None: a version 1 page (the console predates policy)
    trust: tuple[TrustUpdate, ...] = ()  # in use at ``seq`` (version 4; else none)


def max_token_bytes(limit: int) -> int:
    """The most a signed page of ``limit`` entries can take: the bound read before parsing."""
    return TOKEN_BYTES_FIXED + TOKEN_BYTES_PER_ENTRY * limit


def decode_page(
    payload: Mapping[str, object], after: str, limit: int, own: int = feed.FEED_VERSION
) -> Page:
    """Check the verified ``payload`` of the page asked for with ``after`` and ``limit`` by
    a node of contract version ``own``."""
    version = feed.message_version(payload, own)
    _require_keys(payload, _page_keys(version), "snapshot page")
    trust: tuple[TrustUpdate, ...] = ()
    if version >= feed.SNAPSHOT_TRUST_VERSION:
        trust = feed.snapshot_trust(payload["trust"], "trust", version)
    policy = None if version == 1 else feed.decode_op(payload["policy"], "policy", version)
    if policy is not None and not isinstance(policy, PolicyUpdate):
        raise InvalidEntry("snapshot page policy: expected a policy operation")
    seq = payload["seq"]
    if type(seq) is not int or seq < 0:
        raise FeedError(f"snapshot page seq must be a non-negative integer, got {seq!r}")
    if payload["after"] != after:
        named = str(payload["after"])[:100]
        raise FeedError(f"snapshot page starts after {named!r}, not {after!r}")
    entries = _object(payload["entries"], _ENTRIES_KEYS, "entries")
    count = entries["count"]
    if type(count) is not int or not 0 <= count <= limit:
        raise FeedError(f"snapshot page holds {count!r} entries; asked for at most {limit}")
    thumbprints = _split(entries["thumbprint"], count, _THUMBPRINT_BYTES, "entries.thumbprint")
    uids = _split(entries["device_uid"], count, _UID_BYTES, "entries.device_uid")
    following = _check_order(uids, thumbprints, after, payload["next"])
    not_after = _integers(entries["not_after"], count, _MAX_NOT_AFTER, "entries.not_after")
    attributes, index = _attributes(entries["attributes"], count)
    columns = Columns(thumbprints, uids, not_after, attributes, index)
    return Page(seq, following, columns, policy, trust)


def _page_keys(version: int) -> frozenset[str]:
    if version >= feed.SNAPSHOT_TRUST_VERSION:
        return _PAGE_KEYS_V4
    return _PAGE_KEYS if version == feed.MIN_FEED_VERSION else _PAGE_KEYS_V2


def _check_order(
    uids: list[bytes], thumbprints: list[bytes], after: str, following: object
) -> str | None:
    """Entries strictly ascending by (device uid, thumbprint), all after the cursor, and
    ``next`` the last one's cursor or null: no page repeats or skips a range. Cursors are
    the uid's bytes then the thumbprint's, which order as the pairs do (and, unlike
    tuples, leave nothing for the garbage collector to track)."""
    cursors = list(map(operator.add, uids, thumbprints))
    if cursors and after and cursors[0] <= bytes.fromhex(after):
        raise FeedError(f"entries[0] is not after the page's cursor {after}")
    if not all(map(operator.lt, cursors, cursors[1:])):
        at = next(i for i in range(1, len(cursors)) if cursors[i] <= cursors[i - 1])
        raise InvalidEntry(f"entries[{at}] does not follow entries[{at - 1}] (order, repeat)")
    if following is None:
        return None
    last = cursors[-1].hex() if cursors else None
    if following != last:
        named = str(following)[:100]
        raise FeedError(f"snapshot page names next cursor {named!r}, its last entry is {last}")
    return last


def _split(value: object, count: int, width: int, where: str) -> list[bytes]:
    """``count`` values of ``width`` bytes, given as one string of lower-case hex digits."""
    problem = InvalidEntry(f"{where}: expected {count} x {2 * width} lower-case hex digits")
    if not isinstance(value, str) or len(value) != 2 * width * count:
        raise problem
    try:
        raw = bytes.fromhex(value)
    except ValueError as exc:
        raise problem from exc
    # fromhex also takes upper case and spaces; the way back tells. (A regex over the
    # 3 MB of a page took 18 ms, this 3 ms.)
    if raw.hex() != value:
        raise problem
    return [raw[at : at + width] for at in range(0, len(raw), width)]


def _integers(value: object, count: int, maximum: int, where: str) -> list[int]:
    if type(value) is not list or len(value) != count:
        raise InvalidEntry(f"{where}: expected a list of {count} integers")
    # type(), not isinstance(): JSON true must not pass as the integer 1.
    if value and (set(map(type, value)) != {int} or min(value) < 0 or max(value) > maximum):
        at = next(i for i, v in enumerate(value) if type(v) is not int or not 0 <= v <= maximum)
        raise InvalidEntry(f"{where}[{at}]: expected an integer in 0..{maximum}, got {value[at]!r}")
    return value


def _attributes(value: object, count: int) -> tuple[list[object], list[int]]:
    attributes = _object(value, _ATTRIBUTES_KEYS, "entries.attributes")
    if attributes["fields"] != list(ATTRIBUTE_FIELDS):
        raise InvalidEntry(f"entries.attributes.fields: expected {list(ATTRIBUTE_FIELDS)}")
    values = attributes["values"]
    if type(values) is not list or len(values) > count:
        raise InvalidEntry(f"entries.attributes.values: expected a list of at most {count}")
    maximum = len(values) - 1
    index = _integers(attributes["index"], count, maximum, "entries.attributes.index")
    return values, index


def _object(value: object, keys: frozenset[str], where: str) -> Mapping[str, object]:
    if type(value) is not dict:
        raise InvalidEntry(f"{where}: expected an object")
    _require_keys(value, keys, where)
    return value


def _require_keys(value: Mapping[str, object], expected: frozenset[str], where: str) -> None:
    if value.keys() != expected:
        missing, extra = sorted(expected - value.keys()), sorted(value.keys() - expected)[:10]
        raise InvalidEntry(f"{where}: missing keys {missing}, unexpected keys {extra}")
