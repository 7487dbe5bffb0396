"""Tests for certgate.tunnel.table: schema, sequencing, atomicity, change reporting."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certgate import feed
from certgate.errors import CertgateError
from certgate.feed import ComplianceStatus, EnrollmentStatus, Entry, FeedError, InvalidEntry
from certgate.tunnel import table as table_module
from certgate.tunnel.table import (
    Changes,
    DeviceTable,
    SequenceError,
    SequenceGap,
    SequenceReplay,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def tp(n: int) -> str:
    return hashlib.sha256(b"cert %d" % n).hexdigest()


def uid(n: int) -> str:
    return hashlib.md5(b"device %d" % n).hexdigest()


def upsert(n: int, **changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "op": "upsert",
        "thumbprint": tp(n),
        "device_uid": uid(n),
        "group_id": "g",
        "app_bundle_id": "com.example.mail",
        "enrollment_status": "enrolled",
        "compliance_status": "compliant",
        "blocked": False,
        "not_after": 1_900_000_000,
    }
    entry.update(changes)
    return entry


def delete(n: int) -> dict[str, Any]:
    return {"op": "delete", "thumbprint": tp(n), "device_uid": uid(n), "group_id": "g"}


def state(table: DeviceTable) -> tuple[int, list[dict[str, object]]]:
    return table.seq, list(table.to_snapshot())


def without(key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda entry: {k: v for k, v in entry.items() if k != key}


def with_(**changes: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda entry: {**entry, **changes}


# --- lookups and snapshots -------------------------------------------------------------


def test_lookup_materialises_the_entry() -> None:
    table = DeviceTable.from_snapshot(7, [upsert(1), upsert(2, app_bundle_id=None)])
    assert table.seq == 7
    assert len(table) == 2
    assert table.lookup(tp(1)) == Entry(
        thumbprint=tp(1),
        device_uid=uid(1),
        group_id="g",
        app_bundle_id="com.example.mail",
        enrollment_status=EnrollmentStatus.ENROLLED,
        compliance_status=ComplianceStatus.COMPLIANT,
        blocked=False,
        not_after=1_900_000_000,
    )
    second = table.lookup(tp(2))
    assert second is not None and second.app_bundle_id is None
    assert table.lookup(tp(3)) is None
    assert tp(1) in table and tp(3) not in table and "nope" not in table


def test_every_status_combination_round_trips() -> None:
    entries = [
        upsert(i, enrollment_status=e.value, compliance_status=c.value, blocked=b)
        for i, (e, c, b) in enumerate(
            (e, c, b) for e in EnrollmentStatus for c in ComplianceStatus for b in (False, True)
        )
    ]
    table = DeviceTable.from_snapshot(1, entries)
    by_thumbprint = sorted(table.to_snapshot(), key=lambda entry: str(entry["thumbprint"]))
    assert by_thumbprint == sorted(entries, key=lambda entry: str(entry["thumbprint"]))


@pytest.mark.parametrize("bad", [tp(1).upper(), tp(1)[:-1], "0x" + tp(1)[2:], " " + tp(1)[1:]])
def test_lookup_refuses_non_canonical_thumbprints(bad: str) -> None:
    table = DeviceTable.from_snapshot(1, [upsert(1)])
    with pytest.raises(ValueError, match="canonical"):
        table.lookup(bad)


def test_snapshot_round_trips() -> None:
    table = DeviceTable.from_snapshot(3, [upsert(1), upsert(2, blocked=True, not_after=0)])
    copy = DeviceTable.from_snapshot(table.seq, table.to_snapshot())
    assert state(copy) == state(table)


def test_snapshot_accepts_a_stream() -> None:
    table = DeviceTable.from_snapshot(0, (upsert(i) for i in range(50)))
    assert len(table) == 50 and table.seq == 0


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([upsert(1), delete(2)], "only upserts"),
        ([upsert(1), upsert(1, blocked=True)], "duplicate"),
        ([upsert(1, blocked="no")], "blocked"),
        ({"thumbprint": tp(1)}, "must be a list"),
        ("entries", "must be a list"),
    ],
)
def test_snapshot_rejects(entries: Any, message: str) -> None:
    with pytest.raises(InvalidEntry, match=message):
        DeviceTable.from_snapshot(1, entries)


@pytest.mark.parametrize("seq", [-1, True, 1.0, "1"])
def test_snapshot_rejects_invalid_seq(seq: Any) -> None:
    with pytest.raises(SequenceError):
        DeviceTable.from_snapshot(seq, [])


def test_errors_belong_to_the_certgate_tree() -> None:
    for error in (InvalidEntry, SequenceError, SequenceGap, SequenceReplay):
        assert issubclass(error, FeedError) and issubclass(error, CertgateError)


# --- schema validation -----------------------------------------------------------------

INVALID_ENTRIES: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("not-an-object", lambda entry: [entry]),
    ("unknown-op", with_(op="update")),
    ("missing-op", without("op")),
    ("missing-key", without("not_after")),
    ("extra-key", with_(note="hi")),
    ("non-string-key", lambda entry: {**entry, 1: 2}),
    ("thumbprint-upper", with_(thumbprint=tp(9).upper())),
    ("thumbprint-short", with_(thumbprint=tp(9)[:63])),
    ("thumbprint-int", with_(thumbprint=123)),
    ("thumbprint-newline", with_(thumbprint=tp(9) + "\n")),
    ("uid-upper", with_(device_uid=uid(9).upper())),
    ("uid-long", with_(device_uid=uid(9) + "0")),
    ("group-upper", with_(group_id="G")),
    ("group-empty", with_(group_id="")),
    ("group-none", with_(group_id=None)),
    ("bundle-colon", with_(app_bundle_id="com.example:x")),
    ("bundle-empty", with_(app_bundle_id="")),
    ("bundle-int", with_(app_bundle_id=5)),
    ("enrollment-case", with_(enrollment_status="Enrolled")),
    ("enrollment-unknown", with_(enrollment_status="pending")),
    ("enrollment-list", with_(enrollment_status=["enrolled"])),
    ("compliance-unknown-value", with_(compliance_status="maybe")),
    ("blocked-int", with_(blocked=0)),
    ("blocked-string", with_(blocked="false")),
    ("not-after-bool", with_(not_after=True)),
    ("not-after-float", with_(not_after=1.5e9)),
    ("not-after-string", with_(not_after="1900000000")),
    ("not-after-negative", with_(not_after=-1)),
    ("not-after-huge", with_(not_after=2**63)),
    ("delete-extra-key", lambda entry: {**delete(9), "blocked": False}),
    ("delete-missing-uid", lambda entry: without("device_uid")(delete(9))),
    ("delete-bad-group", lambda entry: {**delete(9), "group_id": "-g"}),
]


@pytest.mark.parametrize(
    "corrupt", [c for _, c in INVALID_ENTRIES], ids=[name for name, _ in INVALID_ENTRIES]
)
def test_invalid_entry_rejects_the_whole_batch(corrupt: Callable[[dict[str, Any]], Any]) -> None:
    table = DeviceTable.from_snapshot(4, [upsert(1), upsert(2)])
    before = state(table)
    batch = [delete(1), upsert(2, blocked=True), corrupt(upsert(9)), upsert(10)]
    with pytest.raises(InvalidEntry, match=r"entries\[2\]"):
        table.apply_batch(5, 5, batch)
    assert state(table) == before


def test_error_messages_stay_bounded() -> None:
    table = DeviceTable()
    with pytest.raises(InvalidEntry) as caught:
        table.apply_batch(1, 1, [upsert(1, group_id="x" * 10_000)])
    assert len(str(caught.value)) < 200


def test_too_many_groups_is_rejected_before_mutation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table_module, "_MAX_GROUPS", 2)
    table = DeviceTable.from_snapshot(1, [upsert(1, group_id="a")])
    before = state(table)
    with pytest.raises(InvalidEntry, match="group ids"):
        table.apply_batch(2, 2, [upsert(2, group_id="b"), upsert(3, group_id="c")])
    assert state(table) == before
    with pytest.raises(InvalidEntry, match="group ids"):
        DeviceTable.from_snapshot(1, [upsert(i, group_id=f"g{i}") for i in range(3)])


# --- sequencing ------------------------------------------------------------------------


def test_batches_advance_the_sequence() -> None:
    table = DeviceTable()
    table.apply_batch(1, 3, [upsert(1)])
    table.apply_batch(4, 4, [])
    assert table.seq == 4 and len(table) == 1


@pytest.mark.parametrize(
    ("from_seq", "to_seq", "error"),
    [
        (7, 7, SequenceGap),  # skips 6
        (5, 5, SequenceReplay),  # already applied
        (3, 5, SequenceReplay),  # entirely old
        (4, 6, SequenceGap),  # overlaps: resync rather than guess
        (6, 5, SequenceError),  # backwards range
        (0, 0, SequenceError),  # seqs start at 1
        (True, 6, SequenceError),
        (6, "6", SequenceError),
    ],
)
def test_sequence_errors(from_seq: Any, to_seq: Any, error: type[SequenceError]) -> None:
    table = DeviceTable.from_snapshot(5, [upsert(1)])
    before = state(table)
    with pytest.raises(SequenceError) as caught:
        table.apply_batch(from_seq, to_seq, [delete(1)])
    assert type(caught.value) is error
    assert caught.value.table_seq == 5
    assert state(table) == before


# --- change reporting ------------------------------------------------------------------

CHANGE_CASES: list[tuple[str, list[dict[str, Any]], bool]] = [
    ("delete", [delete(1)], True),
    ("blocked", [upsert(1, blocked=True)], True),
    ("wiped", [upsert(1, enrollment_status="wiped")], True),
    ("unenrolled", [upsert(1, enrollment_status="unenrolled")], True),
    ("noncompliant", [upsert(1, compliance_status="noncompliant")], True),
    ("compliance-unknown", [upsert(1, compliance_status="unknown")], True),
    ("other-device", [upsert(1, device_uid=uid(99))], True),
    ("other-group", [upsert(1, group_id="h")], True),
    ("other-app", [upsert(1, app_bundle_id="com.example.other")], True),
    ("now-device-cert", [upsert(1, app_bundle_id=None)], True),
    ("expires-earlier", [upsert(1, not_after=1_800_000_000)], True),
    ("upsert-then-delete", [upsert(1, blocked=True), delete(1)], True),
    ("block-then-unblock", [upsert(1, blocked=True), upsert(1)], False),
    ("unchanged", [upsert(1)], False),
    ("expires-later", [upsert(1, not_after=2_000_000_000)], False),
    ("new-entry", [upsert(5)], False),
    ("unblocked", [upsert(2)], False),
]


@pytest.mark.parametrize(
    "batch", [batch for _, batch, _ in CHANGE_CASES], ids=[name for name, _, _ in CHANGE_CASES]
)
def test_changes_name_every_touched_thumbprint(batch: list[dict[str, Any]]) -> None:
    """The table reports what a batch touched and never judges it: admission does
    (tests/tunnel/test_enforcement.py holds the verdicts of these same cases)."""
    table = DeviceTable.from_snapshot(1, [upsert(1), upsert(2, blocked=True)])
    changes = table.apply_batch(2, 2, batch)
    assert changes.touched == tuple(sorted({entry["thumbprint"] for entry in batch}))
    assert changes.policy is None


def test_changes_count_operations() -> None:
    table = DeviceTable.from_snapshot(1, [upsert(1), upsert(2)])
    changes = table.apply_batch(2, 3, [delete(1), upsert(2, blocked=True), upsert(3), delete(4)])
    assert changes == Changes(
        2, 3, upserted=2, deleted=2, touched=tuple(sorted([tp(1), tp(2), tp(3), tp(4)]))
    )


# --- properties ------------------------------------------------------------------------

POOL = 6
entry_strategy = st.builds(
    upsert,
    st.integers(0, POOL - 1),
    device_uid=st.sampled_from([uid(0), uid(1)]),
    group_id=st.sampled_from(["g", "h"]),
    app_bundle_id=st.sampled_from([None, "com.example.a", "com.example.b"]),
    enrollment_status=st.sampled_from([e.value for e in EnrollmentStatus]),
    compliance_status=st.sampled_from([c.value for c in ComplianceStatus]),
    blocked=st.booleans(),
    not_after=st.integers(0, 2**40),
)
op_strategy = st.one_of(entry_strategy, st.builds(delete, st.integers(0, POOL - 1)))
bad_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=5), st.lists(st.none())
)


@settings(max_examples=200, deadline=None)
@given(
    start=st.lists(entry_strategy, max_size=POOL, unique_by=lambda e: e["thumbprint"]),
    batch=st.lists(op_strategy, max_size=8),
    position=st.integers(0, 8),
    field=st.sampled_from(sorted(upsert(0))),
    value=bad_values,
)
def test_invalid_batches_leave_the_table_unchanged(
    start: list[dict[str, Any]],
    batch: list[dict[str, Any]],
    position: int,
    field: str,
    value: object,
) -> None:
    bad = {**upsert(0), field: value}
    try:
        feed.decode_op(bad, "probe", feed.FEED_VERSION)
    except InvalidEntry:
        pass
    else:
        return  # the random value happened to be valid for that field
    table = DeviceTable.from_snapshot(10, start)
    before = state(table)
    with pytest.raises(InvalidEntry):
        table.apply_batch(11, 11, [*batch[:position], bad, *batch[position:]])
    assert state(table) == before


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(st.lists(op_strategy, max_size=6), max_size=6))
def test_table_matches_a_reference_model(batches: list[list[dict[str, Any]]]) -> None:
    table = DeviceTable()
    model: dict[str, dict[str, Any]] = {}
    for batch in batches:
        for op in batch:
            if op["op"] == "delete":
                model.pop(op["thumbprint"], None)
            else:
                model[op["thumbprint"]] = op
        changes = table.apply_batch(table.seq + 1, table.seq + 1, batch)
        assert set(changes.touched) == {op["thumbprint"] for op in batch}
    assert table.seq == len(batches)
    assert len(table) == len(model)
    for n in range(POOL):
        found = table.lookup(tp(n))
        assert (found.encode() if found else None) == model.get(tp(n))


# --- benchmark smoke test ----------------------------------------------------------------


def test_benchmark_script_runs_at_tiny_size(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "table_scale", REPO_ROOT / "bench" / "table_scale.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "table_scale.json"
    argv = ["--n", "1000", "--lookups", "200", "--batches", "2", "--batch-size", "50"]
    bench.main([*argv, "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["n"] == results["entries"] == 1000
    expected = {
        "build_seconds",
        "rss_delta_bytes",
        "rss_bytes_per_entry",
        "lookup_p50_us",
        "lookup_p99_us",
        "batch_entries_per_second",
    }
    assert expected <= set(results)
