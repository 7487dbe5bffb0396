"""Tests for certgate.tunnel.snapshot: format 2 snapshot pages, decoded into a table.

Pages are built here from feed entries exactly as docs/CONVENTIONS.md ("Snapshot pages")
describes them, independently of the console's encoder (tests/console cover that one
against this decoder, through a real console).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certgate import jws
from certgate.feed import ATTRIBUTE_FIELDS, FeedError, InvalidEntry
from certgate.tunnel.snapshot import PAGE_LIMIT, decode_page, max_token_bytes
from certgate.tunnel.table import DeviceTable
from tests.pki.conftest import shared_hierarchy
from tests.tunnel import dataplane

GROUP = "g"


def entry(n: int, **changes: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "op": "upsert",
        "thumbprint": hashlib.sha256(b"cert %d" % n).hexdigest(),
        "device_uid": hashlib.md5(b"device %d" % (n // 2)).hexdigest(),  # two certs a device
        "group_id": GROUP,
        "app_bundle_id": None if n % 2 == 0 else f"com.example.app{n % 3}",
        "enrollment_status": "enrolled",
        "compliance_status": ("compliant", "noncompliant", "unknown")[n % 3],
        "blocked": n % 5 == 0,
        "not_after": 1_900_000_000 + n,
    }
    value.update(changes)
    return value


def ordered(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda e: (e["device_uid"], e["thumbprint"]))


def cursor(e: dict[str, Any]) -> str:
    return f"{e['device_uid']}{e['thumbprint']}"


def page(
    entries: list[dict[str, Any]], after: str = "", following: str | None = None, seq: int = 7
) -> dict[str, Any]:
    """The verified payload of a format 2 page holding ``entries`` (in order)."""
    combinations: dict[tuple[Any, ...], int] = {}
    index = [
        combinations.setdefault(tuple(e[f] for f in ATTRIBUTE_FIELDS), len(combinations))
        for e in entries
    ]
    return {
        "group_id": GROUP,
        "iat": 1_800_000_000,
        "exp": 1_800_003_600,
        "seq": seq,
        "after": after,
        "next": following,
        "entries": {
            "count": len(entries),
            "thumbprint": "".join(e["thumbprint"] for e in entries),
            "device_uid": "".join(e["device_uid"] for e in entries),
            "not_after": [e["not_after"] for e in entries],
            "attributes": {
                "fields": list(ATTRIBUTE_FIELDS),
                "values": [list(key) for key in combinations],
                "index": index,
            },
        },
    }


ENTRIES = ordered([entry(n) for n in range(12)])


def table_of(*payloads: tuple[dict[str, Any], str], limit: int = PAGE_LIMIT) -> DeviceTable:
    table: DeviceTable | None = None
    for payload, after in payloads:
        decoded = decode_page(payload, after, limit)
        table = table or DeviceTable(decoded.seq)
        table.extend_columns(decoded.columns)
    assert table is not None
    table.fit()  # the last page read: its entries placed
    return table


def test_a_page_holds_exactly_its_entries() -> None:
    table = table_of((page(ENTRIES), ""))
    assert table.seq == 7 and len(table) == len(ENTRIES)
    expected = DeviceTable.from_snapshot(7, ENTRIES)  # the same entries as format 1 objects
    assert sorted(map(str, table.to_snapshot())) == sorted(map(str, expected.to_snapshot()))
    for e in ENTRIES:
        found = table.lookup(e["thumbprint"])
        assert found is not None and found.encode() == e


def test_pages_chain_by_cursor() -> None:
    first, second = ENTRIES[:5], ENTRIES[5:]
    chained = cursor(first[-1])
    table = table_of((page(first, "", chained), ""), (page(second, chained), chained))
    assert len(table) == len(ENTRIES)
    decoded = decode_page(page(first, "", chained), "", PAGE_LIMIT)
    assert decoded.next == chained and decode_page(page(second, chained), chained, 9).next is None


def test_an_empty_page_ends_an_empty_snapshot() -> None:
    assert len(table_of((page([]), ""))) == 0


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(payload: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = payload
        for key in parents:
            target = target[key]
        target[last] = value

    return change


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def change(payload: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = payload
        for key in parents:
            target = target[key]
        del target[last]

    return change


def _swap_first_two(payload: dict[str, Any]) -> None:
    entries = payload["entries"]
    for column, width in (("thumbprint", 64), ("device_uid", 32)):
        text = entries[column]
        entries[column] = text[width : 2 * width] + text[:width] + text[2 * width :]


def _repeat_first(payload: dict[str, Any]) -> None:
    entries = payload["entries"]
    for column, width in (("thumbprint", 64), ("device_uid", 32)):
        entries[column] = entries[column][:width] + entries[column][: -width or None]


TP = ENTRIES[0]["thumbprint"]
REJECTED: list[tuple[Callable[[dict[str, Any]], None], str]] = [
    (_set("seq", -1), "seq must be a non-negative integer"),
    (_set("seq", True), "seq must be a non-negative integer"),
    (_set("after", "0" * 96), "starts after '000"),
    (_set("next", "f" * 96), "names next cursor 'fff"),
    (_set("next", TP), "names next cursor"),
    (_set("extra", 1), "unexpected keys ['extra']"),
    (_drop("next"), "missing keys ['next']"),
    (_set("entries", []), "entries: expected an object"),
    (_set("entries.count", 11), "entries.thumbprint: expected 11 x 64 lower-case hex"),
    (_set("entries.count", "12"), "holds '12' entries"),
    (_set("entries.thumbprint", "A" * 64 * 12), "entries.thumbprint: expected 12 x 64 lower-case"),
    (_set("entries.thumbprint", " " * 64 * 12), "entries.thumbprint: expected 12 x 64 lower-case"),
    (_set("entries.device_uid", None), "entries.device_uid: expected 12 x 32 lower-case"),
    (_swap_first_two, "entries[1] does not follow entries[0] (order, repeat)"),
    (_repeat_first, "entries[1] does not follow entries[0] (order, repeat)"),
    (_set("entries.not_after", [1] * 11), "entries.not_after: expected a list of 12 integers"),
    (_set("entries.not_after", [True] * 12), "entries.not_after[0]: expected an integer"),
    (_set("entries.not_after", [-1] + [1] * 11), "entries.not_after[0]: expected an integer"),
    (_set("entries.not_after", [1] * 11 + [2**63]), "entries.not_after[11]: expected an integer"),
    (_set("entries.attributes.fields", ["group_id"]), "entries.attributes.fields: expected"),
    (_set("entries.attributes.values", [[]] * 13), "values: expected a list of at most 12"),
    (_set("entries.attributes.index", [99] * 12), "entries.attributes.index[0]: expected"),
    (_set("entries.attributes.index", [0.0] * 12), "entries.attributes.index[0]: expected"),
    (_drop("entries.attributes.index"), "missing keys ['index']"),
]


@pytest.mark.parametrize(("change", "message"), REJECTED)
def test_a_malformed_page_is_rejected_with_its_reason(
    change: Callable[[dict[str, Any]], None], message: str
) -> None:
    payload = page(ENTRIES)
    change(payload)
    with pytest.raises(FeedError) as raised:
        decode_page(payload, "", PAGE_LIMIT)
    assert message in str(raised.value)


def test_a_page_larger_than_asked_for_is_rejected() -> None:
    with pytest.raises(FeedError, match="holds 12 entries; asked for at most 11"):
        decode_page(page(ENTRIES), "", 11)


def test_a_page_must_start_after_its_cursor() -> None:
    after = cursor(ENTRIES[3])
    with pytest.raises(FeedError, match="entries\\[0\\] is not after the page's cursor"):
        decode_page(page(ENTRIES[3:], after), after, PAGE_LIMIT)


def test_an_empty_page_names_no_next_cursor() -> None:
    with pytest.raises(FeedError, match="its last entry is None"):
        decode_page(page([], "", cursor(ENTRIES[0])), "", PAGE_LIMIT)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["G!", None, "enrolled", "compliant", False], "values[0].group_id: expected"),
        ([GROUP, "no spaces", "enrolled", "compliant", False], "values[0].app_bundle_id"),
        ([GROUP, None, "pending", "compliant", False], "values[0].enrollment_status"),
        ([GROUP, None, "enrolled", "compliant", 0], "values[0].blocked: expected a boolean"),
        ([GROUP, None, "enrolled"], "values[0]: expected [group_id, app_bundle_id"),
        ("g,enrolled", "values[0]: expected [group_id"),
    ],
)
def test_attribute_values_are_checked_like_feed_fields(values: object, message: str) -> None:
    payload = page(ENTRIES[:1])
    payload["entries"]["attributes"]["values"] = [values]
    decoded = decode_page(payload, "", PAGE_LIMIT)
    with pytest.raises(InvalidEntry) as raised:
        DeviceTable(7).extend_columns(decoded.columns)
    assert message in str(raised.value)


def test_a_thumbprint_in_two_pages_is_rejected() -> None:
    table = table_of((page(ENTRIES[:2]), ""))
    after = cursor(ENTRIES[1])
    moved = [{**ENTRIES[0], "device_uid": "f" * 32}]  # a certificate filed under another device
    decoded = decode_page(page(moved, after), after, PAGE_LIMIT)
    table.extend_columns(decoded.columns)
    with pytest.raises(InvalidEntry, match="repeats a thumbprint of an earlier page"):
        table.fit()


def test_the_token_bound_holds_the_largest_possible_page() -> None:
    console = shared_hierarchy().leaves["console"]
    count = 200
    bundle = "a" * 250
    worst = ordered(
        [
            entry(n, group_id="g" * 63, app_bundle_id=f"{bundle}{n:05d}", not_after=2**63 - 1)
            for n in range(count)
        ]
    )
    payload = page(worst, "f" * 96, cursor(worst[-1]), seq=2**62)
    body = {k: v for k, v in payload.items() if k not in ("iat", "exp")}
    token = jws.sign(body, console.key, console.chain, jws.TYP_SNAPSHOT_V2, 3600)
    assert len(token) <= max_token_bytes(count)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
PATHS = [
    "seq",
    "after",
    "next",
    "entries",
    "entries.count",
    "entries.thumbprint",
    "entries.device_uid",
    "entries.not_after",
    "entries.attributes",
    "entries.attributes.fields",
    "entries.attributes.values",
    "entries.attributes.index",
]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=JSON)
def test_any_value_anywhere_fails_cleanly(path: str, value: object) -> None:
    payload = copy.deepcopy(page(ENTRIES[:3]))
    _set(path, value)(payload)
    table = DeviceTable(7)
    try:
        table.extend_columns(decode_page(payload, "", PAGE_LIMIT).columns)
        table.fit()
    except FeedError:
        return
    # The check is that nothing but FeedError escapes; a page that decodes still holds
    # its three entries (a changed seq, say, is accepted and not reflected here).
    assert len(table) == 3


def test_a_page_says_its_trust_operations_from_version_4_on_and_never_before() -> None:
    policy = dataplane.policy(version=3).encode()
    v3 = {**page(ENTRIES[:2]), "version": 3, "policy": policy}
    assert decode_page(v3, "", PAGE_LIMIT, 4).trust == ()
    with pytest.raises(InvalidEntry, match=r"unexpected keys \['trust'\]"):
        decode_page({**v3, "trust": []}, "", PAGE_LIMIT, 4)  # version 3 keys are exact
    v4 = {**v3, "version": 4}
    with pytest.raises(InvalidEntry, match=r"missing keys \['trust'\]"):
        decode_page(v4, "", PAGE_LIMIT, 4)
    assert decode_page({**v4, "trust": []}, "", PAGE_LIMIT, 4).trust == ()
    with pytest.raises(FeedError, match="newer than this node's 3"):
        decode_page({**v4, "trust": []}, "", PAGE_LIMIT, 3)
    with pytest.raises(InvalidEntry, match="expected a trust operation"):
        decode_page({**v4, "trust": [{"op": "upsert"}]}, "", PAGE_LIMIT, 4)
