"""Tests for certgate.tunnel.persist: snapshot + journal round trips and crash damage."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certgate.tunnel import persist
from certgate.tunnel.persist import PersistError, TableStore, atomic_write
from certgate.tunnel.table import DeviceTable

STATUSES = [
    ("enrolled", "compliant", False),
    ("enrolled", "noncompliant", False),
    ("unenrolled", "unknown", False),
    ("enrolled", "compliant", True),
    ("wiped", "compliant", False),
]


def tp(n: int) -> str:
    return hashlib.sha256(b"cert %d" % n).hexdigest()


def upsert(n: int, version: int = 0) -> dict[str, Any]:
    enrollment, compliance, blocked = STATUSES[(n + version) % len(STATUSES)]
    return {
        "op": "upsert",
        "thumbprint": tp(n),
        "device_uid": hashlib.md5(b"device %d" % n).hexdigest(),
        "group_id": f"group-{n % 3}",
        "app_bundle_id": None if n % 2 else f"com.example.app{n % 5}",
        "enrollment_status": enrollment,
        "compliance_status": compliance,
        "blocked": blocked,
        "not_after": 1_900_000_000 + n + version,
    }


def delete(n: int) -> dict[str, Any]:
    entry = upsert(n)
    return {key: entry[key] for key in ("op", "thumbprint", "device_uid", "group_id")} | {
        "op": "delete"
    }


def contents(table: DeviceTable) -> tuple[int, list[dict[str, object]]]:
    return table.seq, sorted(table.to_snapshot(), key=lambda e: str(e["thumbprint"]))


def table_of(count: int, seq: int = 7) -> DeviceTable:
    return DeviceTable.from_snapshot(seq, [upsert(n) for n in range(count)])


def apply_and_journal(table: DeviceTable, store: TableStore, entries: list[dict[str, Any]]) -> None:
    seq = table.seq + 1
    table.apply_batch(seq, seq, entries)
    store.append_batch(seq, seq, entries)


def loaded(directory: Path) -> persist.LoadedTable:
    result = TableStore(directory).load()
    assert result is not None
    return result


def test_snapshot_round_trip(tmp_path: Path) -> None:
    table = table_of(500)
    TableStore(tmp_path).write_snapshot(table)
    again = loaded(tmp_path)
    assert contents(again.table) == contents(table)
    assert again.table.lookup(tp(3)) == table.lookup(tp(3))
    assert (again.snapshot_seq, again.batches_replayed, again.torn_tail) == (7, 0, False)
    assert stat.S_IMODE((tmp_path / persist.SNAPSHOT_FILE).stat().st_mode) == 0o600


def test_empty_table_round_trip(tmp_path: Path) -> None:
    TableStore(tmp_path).write_snapshot(DeviceTable(3))
    assert contents(loaded(tmp_path).table) == (3, [])


def test_a_restart_loads_straight_into_the_workers_file(tmp_path: Path) -> None:
    """A node with workers reloads its table into a mapped file (no copy beside it), the
    journal replayed there too, and a reader of that file answers as the table."""
    from certgate.tunnel.shared_table import MappedFiles, SharedTable

    state, shm = tmp_path / "state", tmp_path / "shm"
    state.mkdir()
    shm.mkdir()
    table, store = table_of(300), TableStore(state)
    store.write_snapshot(table)
    apply_and_journal(table, store, [upsert(1, version=1), delete(2), upsert(999)])
    result = TableStore(state).load(MappedFiles(shm))
    assert result is not None and result.batches_replayed == 1
    assert contents(result.table) == contents(table)
    assert result.table.path is not None and result.table.path.parent == shm
    reader = SharedTable(result.table.path)
    assert reader.seq == table.seq and len(reader) == len(table) == 300
    for n in (1, 2, 3, 999):
        assert reader.lookup(tp(n)) == table.lookup(tp(n))


def test_a_snapshot_file_repeating_a_thumbprint_is_refused(tmp_path: Path) -> None:
    """A packed record twice (a file written with a valid checksum, as a bug would): the
    load fails with PersistError, never a table holding one of them twice."""
    table = table_of(3)
    parts = list(persist.snapshot_parts(table))
    body = b"".join(parts[:-1])
    record = body[-persist._RECORD_BYTES :]
    head = persist._HEADER.unpack_from(body)
    names = body[persist._HEADER.size : len(body) - 3 * persist._RECORD_BYTES]
    doubled = persist._HEADER.pack(head[0], head[1], 4, *head[3:]) + names
    doubled += body[len(body) - 3 * persist._RECORD_BYTES :] + record
    data = doubled + hashlib.sha256(doubled).digest()
    with pytest.raises(PersistError, match="duplicate thumbprint"):
        persist.decode_snapshot(data)


def test_nothing_persisted_loads_as_none(tmp_path: Path) -> None:
    (tmp_path / persist.JOURNAL_FILE).write_bytes(b"orphan journal\n")
    assert TableStore(tmp_path).load() is None


def test_journal_replays_on_top_of_the_snapshot(tmp_path: Path) -> None:
    table, store = table_of(50), TableStore(tmp_path)
    store.write_snapshot(table)
    apply_and_journal(table, store, [upsert(1, version=1), delete(2), upsert(99)])
    apply_and_journal(table, store, [upsert(99, version=2)])
    again = loaded(tmp_path)
    assert contents(again.table) == contents(table)
    assert (again.snapshot_seq, again.batches_replayed) == (7, 2)
    assert again.journal_bytes == store.journal_bytes == (tmp_path / "table.journal").stat().st_size


batch_ops = st.lists(
    st.tuples(st.booleans(), st.integers(0, 40), st.integers(0, 4)), min_size=1, max_size=8
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(batch_ops, max_size=6), st.integers(0, 6))
def test_any_history_reloads_to_the_same_table(
    batches: list[list[tuple[bool, int, int]]], compact_at: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        table, store = table_of(20, seq=0), TableStore(Path(tmp))
        store.write_snapshot(table)
        for index, ops in enumerate(batches):
            latest = {n: upsert(n, v) if keep else delete(n) for keep, n, v in ops}
            apply_and_journal(table, store, list(latest.values()))
            if index == compact_at:
                store.write_snapshot(table)
        assert contents(loaded(Path(tmp)).table) == contents(table)


@pytest.mark.parametrize(
    "tail",
    [
        b'0badc0de {"from_seq":9,"to_',  # cut mid-line
        persist.encode_journal_line(9, 9, [upsert(5)])[:-1],  # complete but no newline
        b"00000000 " + persist.encode_journal_line(9, 9, [upsert(5)])[9:],  # bad CRC
        b"\0\0\0\0\0\0",  # a file system that extended the file with zeros
    ],
)
def test_torn_last_line_is_ignored_and_cut(
    tmp_path: Path, tail: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    table, store = table_of(10), TableStore(tmp_path)
    store.write_snapshot(table)
    apply_and_journal(table, store, [upsert(1, version=3)])
    good_size = store.journal_bytes
    with (tmp_path / persist.JOURNAL_FILE).open("ab") as handle:
        handle.write(tail)
    caplog.set_level(logging.INFO, "certgate.tunnel.persist")
    again = loaded(tmp_path)
    assert again.torn_tail and contents(again.table) == contents(table)
    assert (tmp_path / persist.JOURNAL_FILE).stat().st_size == good_size
    assert "ignoring the rest" in caplog.text
    # The next append starts on a clean line and survives the next restart.
    store = TableStore(tmp_path)
    assert store.load() is not None
    apply_and_journal(table, store, [delete(1)])
    assert contents(loaded(tmp_path).table) == contents(table)


def test_a_read_only_store_reads_a_torn_tail_without_cutting_it(tmp_path: Path) -> None:
    """``tunnel status`` reads beside a running node: the "torn" tail may be the line the
    node is writing at that moment, so it is left alone, and nothing is written."""
    table, store = table_of(10), TableStore(tmp_path)
    store.write_snapshot(table)
    apply_and_journal(table, store, [upsert(1, version=3)])
    with (tmp_path / persist.JOURNAL_FILE).open("ab") as handle:
        handle.write(b"123 {half a li")
    size = (tmp_path / persist.JOURNAL_FILE).stat().st_size
    reader = TableStore(tmp_path, read_only=True)
    again = reader.load()
    assert again is not None and again.torn_tail and contents(again.table) == contents(table)
    assert (tmp_path / persist.JOURNAL_FILE).stat().st_size == size
    with pytest.raises(persist.PersistError, match="read-only"):
        reader.write_snapshot(table)
    with pytest.raises(persist.PersistError, match="read-only"):
        reader.append_batch(12, 12, [delete(1)])
    with pytest.raises(persist.PersistError, match="read-only"):
        reader.save_exchange_time(1.0)
    assert (tmp_path / persist.JOURNAL_FILE).stat().st_size == size


def test_damaged_middle_line_stops_replay_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table, store = table_of(10), TableStore(tmp_path)
    store.write_snapshot(table)
    apply_and_journal(table, store, [upsert(1, version=1)])
    expected = contents(table)
    apply_and_journal(table, store, [upsert(2, version=1)])
    apply_and_journal(table, store, [upsert(3, version=1)])
    journal = tmp_path / persist.JOURNAL_FILE
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + lines[1].replace(b'"to_seq"', b'"to_SEQ"') + lines[2])
    caplog.set_level(logging.WARNING, "certgate.tunnel.persist")
    again = loaded(tmp_path)
    assert contents(again.table) == expected and again.batches_replayed == 1
    assert "torn or damaged at byte" in caplog.text


def test_snapshot_is_written_in_bounded_parts(tmp_path: Path) -> None:
    table = table_of(40_000)  # more records than one part holds
    parts = list(persist.snapshot_parts(table))
    assert len(parts) > 3 and max(len(part) for part in parts) <= 1_100_000
    TableStore(tmp_path).write_snapshot(table)
    assert (tmp_path / persist.SNAPSHOT_FILE).read_bytes() == b"".join(parts)
    assert contents(loaded(tmp_path).table) == contents(table)


def test_a_failed_parts_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    atomic_write(path, b"old")

    def failing() -> Iterator[bytes]:
        yield b"new, half"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        persist.atomic_write_parts(path, failing())
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_journal_left_behind_by_a_crash_during_compaction(tmp_path: Path) -> None:
    table, store = table_of(10, seq=0), TableStore(tmp_path)
    store.write_snapshot(table)
    for n in range(3):
        apply_and_journal(table, store, [upsert(n, version=1)])
    # Crash after the new snapshot was renamed in, before the journal was reset.
    atomic_write(tmp_path / persist.SNAPSHOT_FILE, persist.encode_snapshot(table))
    apply_and_journal(table, store, [delete(4)])
    again = loaded(tmp_path)
    assert contents(again.table) == contents(table)
    assert (again.snapshot_seq, again.batches_replayed) == (3, 4)


def test_journal_gap_stops_replay(tmp_path: Path) -> None:
    table, store = table_of(10, seq=0), TableStore(tmp_path)
    store.write_snapshot(table)
    store.append_batch(2, 2, [upsert(1, version=1)])  # seq 1 never written
    again = loaded(tmp_path)
    assert again.table.seq == 0 and again.torn_tail


def test_damaged_snapshot_is_refused(tmp_path: Path) -> None:
    TableStore(tmp_path).write_snapshot(table_of(20))
    path = tmp_path / persist.SNAPSHOT_FILE
    data = path.read_bytes()
    for damaged, reason in [
        (data[:100] + bytes([data[100] ^ 0x40]) + data[101:], "checksum"),
        (data[: len(data) // 2], "checksum"),
        (b"", "truncated"),
    ]:
        path.write_bytes(damaged)
        with pytest.raises(PersistError, match=reason):
            TableStore(tmp_path).load()
    body = b"NOTATABL" + data[8:-32]
    path.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(PersistError, match="not a certgate table snapshot"):
        TableStore(tmp_path).load()


def test_atomic_write_sets_the_exact_mode_and_leaves_no_temporary(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        atomic_write(tmp_path / "public.pem", b"one", 0o644)
    finally:
        os.umask(old_umask)
    atomic_write(tmp_path / "secret.key", b"two")
    atomic_write(tmp_path / "secret.key", b"three")
    assert stat.S_IMODE((tmp_path / "public.pem").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "secret.key").stat().st_mode) == 0o600
    assert (tmp_path / "secret.key").read_bytes() == b"three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["public.pem", "secret.key"]


def test_exchange_time_round_trip(tmp_path: Path) -> None:
    store = TableStore(tmp_path)
    assert store.load_exchange_time() is None
    store.save_exchange_time(1_800_000_000.5)
    assert TableStore(tmp_path).load_exchange_time() == 1_800_000_000.5
    (tmp_path / persist.SYNC_FILE).write_bytes(b"[not an object")
    assert store.load_exchange_time() is None


def test_describe_reads_headers_only(tmp_path: Path) -> None:
    empty = TableStore(tmp_path).describe()
    assert (empty.snapshot_seq, empty.snapshot_entries, empty.journal_batches) == (None, None, 0)
    table, store = table_of(30), TableStore(tmp_path)
    store.write_snapshot(table)
    apply_and_journal(table, store, [upsert(1, version=1)])
    info = TableStore(tmp_path).describe()
    assert (info.snapshot_seq, info.snapshot_entries, info.journal_batches) == (7, 30, 1)


def test_compaction_threshold(tmp_path: Path) -> None:
    table, store = table_of(5), TableStore(tmp_path, compact_after_bytes=500)
    store.write_snapshot(table)
    while not store.needs_compaction():
        apply_and_journal(table, store, [upsert(1, version=table.seq)])
    store.write_snapshot(table)
    assert not store.needs_compaction() and store.journal_bytes == 0
    assert contents(loaded(tmp_path).table) == contents(table)
