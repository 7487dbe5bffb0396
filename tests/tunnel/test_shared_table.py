"""The workers' shared device table: the follower's own DeviceTable keeps its slots in a file
(``MappedFiles``) that a reader maps; both answer as a plain model of the feed after every
batch (upserts, deletes that shift probe runs back, new names), the table moves to a new
generation when it fills up, and a generation it leaves is removed."""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Any

import pytest

from certgate.tunnel import shared_table, slots
from certgate.tunnel.shared_table import MappedFiles, SharedTable, names_path
from certgate.tunnel.table import DeviceTable


def tp(n: int) -> str:
    return hashlib.sha256(b"cert:%d" % n).hexdigest()


def upsert(n: int, **changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "op": "upsert",
        "thumbprint": tp(n),
        "device_uid": hashlib.md5(b"dev:%d" % n).hexdigest(),
        "group_id": f"g{n % 3}",
        "app_bundle_id": None if n % 2 else f"com.example.app{n % 5}",
        "enrollment_status": "enrolled",
        "compliance_status": "compliant",
        "blocked": False,
        "not_after": 2_000_000_000 + n,
    }
    return entry | changes


def delete(n: int) -> dict[str, Any]:
    entry = upsert(n)
    return {"op": "delete", **{k: entry[k] for k in ("thumbprint", "device_uid", "group_id")}}


def same_answers(table: DeviceTable, shared: SharedTable, model: dict[int, Any]) -> None:
    """Both views answer as ``model`` (n -> the upsert in force, absent: unknown)."""
    assert len(shared) == len(table) == len(model) and shared.seq == table.seq
    for n in range(120):
        expected = model.get(n)
        entry = table.lookup(tp(n))
        assert (None if entry is None else entry.encode()) == expected, n
        assert shared.lookup(tp(n)) == entry, n


def mapped(tmp_path: Path, entries: list[dict[str, Any]], seq: int = 1) -> DeviceTable:
    return DeviceTable.from_snapshot(seq, entries, home=MappedFiles(tmp_path))


def test_a_reader_answers_as_the_follower_table(tmp_path: Path) -> None:
    table = mapped(tmp_path, [upsert(n) for n in range(100)], seq=7)
    table.set_last_exchange(123.5)
    assert table.path is not None and table.path.parent == tmp_path
    shared = SharedTable(table.path)
    same_answers(table, shared, {n: upsert(n) for n in range(100)})
    assert shared.last_exchange == 123.5
    with pytest.raises(ValueError):
        shared.lookup("not-hex")


def test_a_single_process_table_lives_in_anonymous_memory() -> None:
    table = DeviceTable.from_snapshot(1, [upsert(1)])
    assert table.path is None and table.lookup(tp(1)) is not None


def test_batches_keep_the_reader_in_step(tmp_path: Path) -> None:
    """Random batches of upserts (new and changed, new names) and deletes, small table so
    probe runs are long and wrap around, and it grows: a reader of the current generation
    answers as the model after every batch."""
    rng = random.Random(5)
    model: dict[int, Any] = {n: upsert(n) for n in range(40)}
    table = mapped(tmp_path, list(model.values()))
    assert table.path is not None
    shared = SharedTable(table.path)
    generations = {table.path}
    for seq in range(2, 80):
        ops = []
        for _ in range(rng.randrange(1, 12)):
            n = rng.randrange(120)
            if rng.random() < 0.4:
                ops.append(delete(n))
                model.pop(n, None)
            else:
                op = upsert(n, blocked=rng.random() < 0.5, group_id=f"g{rng.randrange(9)}")
                ops.append(op)
                model[n] = op
        table.apply_batch(seq, seq, ops)
        if table.path != shared.path:  # moved to a new generation: a worker is told
            assert table.path is not None
            generations.add(table.path)
            shared.close()
            shared = SharedTable(table.path)
        same_answers(table, shared, model)
    assert len(generations) > 1  # the table did grow
    assert sorted(tmp_path.iterdir()) == sorted([table.path, names_path(table.path)])


def test_a_full_table_moves_to_a_new_generation(tmp_path: Path) -> None:
    """Past MAX_LOAD the slots move to a new file; the old file is removed at once, and a
    reader still mapping it keeps answering from it until it swaps."""
    table = mapped(tmp_path, [upsert(n) for n in range(10)])
    old_path = table.path
    assert old_path is not None
    old = SharedTable(old_path)
    room = int(slots.MIN_SLOTS * slots.MAX_LOAD) - 10
    table.apply_batch(2, 2, [upsert(n) for n in range(10, 10 + room + 1)])
    assert table.path != old_path and table.path is not None
    assert not old_path.exists() and not names_path(old_path).exists()
    assert len(old) == 10 and old.lookup(tp(3)) is not None  # the old mapping still reads
    new = SharedTable(table.path)
    assert len(new) == len(table) == 10 + room + 1
    assert new.lookup(tp(10 + room)) == table.lookup(tp(10 + room))


def test_close_removes_the_generation(tmp_path: Path) -> None:
    table = mapped(tmp_path, [upsert(1)])
    table.close()
    assert list(tmp_path.iterdir()) == []


def test_a_writer_stuck_mid_write_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that died between its two version bumps (caused for real by calling only
    the first): readers give up after READ_SPIN_S and answer unknown."""
    monkeypatch.setattr(shared_table, "READ_SPIN_S", 0.05)
    table = mapped(tmp_path, [upsert(1)])
    assert table.path is not None
    shared = SharedTable(table.path)
    assert shared.lookup(tp(1)) is not None
    table._slots.begin()
    assert shared.lookup(tp(1)) is None
    table._slots.end()
    assert shared.lookup(tp(1)) is not None


def test_a_reader_waits_out_a_write_in_progress(tmp_path: Path) -> None:
    """A record half rewritten (the writer between its two version bumps): the reader
    waits and returns the whole new entry, never the torn one."""
    import threading

    table = mapped(tmp_path, [upsert(7)])
    assert table.path is not None
    shared = SharedTable(table.path)
    before = table.lookup(tp(7))
    at, found = table._slots._slot_of(bytes.fromhex(tp(7)))
    assert found
    view = table._slots._map
    record = bytes(view[at + 33 : at + slots.SLOT_SIZE])
    new_uid = bytes.fromhex("ff" * 16)
    table._slots.begin()
    view[at + 33 : at + 41] = new_uid[:8]  # the first half of the new device uid only

    def finish() -> None:
        time.sleep(0.2)
        view[at + 33 : at + slots.SLOT_SIZE] = new_uid + record[16:]
        table._slots.end()

    finishing = threading.Thread(target=finish)
    finishing.start()
    entry = shared.lookup(tp(7))
    finishing.join()
    assert before is not None and entry is not None
    assert entry.device_uid == "ff" * 16 and entry.not_after == before.not_after
