"""The workers' shared device table: the same answers as the follower's DeviceTable after
every batch (upserts, deletes that shift probe runs back, new names), and a new generation
when it fills up."""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Any

import pytest

from certgate.tunnel import shared_table
from certgate.tunnel.shared_table import SharedTable, SharedTableWriter
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


def same_answers(table: DeviceTable, shared: SharedTable, known: range) -> None:
    assert len(shared) == len(table) and shared.seq == table.seq
    for n in known:
        assert shared.lookup(tp(n)) == table.lookup(tp(n)), n


def test_a_generation_answers_as_the_table(tmp_path: Path) -> None:
    table = DeviceTable.from_snapshot(7, [upsert(n) for n in range(500)])
    writer = SharedTableWriter.build(tmp_path / "t.map", table, 123.5)
    shared = SharedTable(tmp_path / "t.map")
    same_answers(table, shared, range(600))
    assert shared.last_exchange == 123.5
    with pytest.raises(ValueError):
        shared.lookup("not-hex")
    writer.close()


def test_batches_keep_the_shared_table_in_step(tmp_path: Path) -> None:
    """Random batches of upserts (new and changed, new names) and deletes, small table so
    probe runs are long and wrap around: every answer stays the follower's."""
    rng = random.Random(5)
    table = DeviceTable.from_snapshot(1, [upsert(n) for n in range(40)])
    writer = SharedTableWriter.build(tmp_path / "t.map", table, None)
    shared = SharedTable(tmp_path / "t.map")
    for seq in range(2, 60):
        ops = []
        for _ in range(rng.randrange(1, 12)):
            n = rng.randrange(120)
            if rng.random() < 0.4:
                ops.append(delete(n))
            else:
                ops.append(upsert(n, blocked=rng.random() < 0.5, group_id=f"g{rng.randrange(9)}"))
        changes = table.apply_batch(seq, seq, ops)
        if not writer.update(table, changes.touched):
            writer.close()
            writer = SharedTableWriter.build(tmp_path / f"t{seq}.map", table, None)
            shared = SharedTable(writer.path)
        same_answers(table, shared, range(120))


def test_a_full_table_asks_for_a_new_generation(tmp_path: Path) -> None:
    table = DeviceTable.from_snapshot(1, [upsert(n) for n in range(10)])
    writer = SharedTableWriter.build(tmp_path / "t.map", table, None)
    room = int(shared_table.MIN_SLOTS * shared_table.MAX_LOAD) - 10
    changes = table.apply_batch(2, 2, [upsert(n) for n in range(10, 10 + room + 1)])
    assert not writer.update(table, changes.touched)
    assert len(SharedTable(writer.path)) == 10  # nothing written


def test_a_writer_stuck_mid_write_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that died between its two version bumps (caused for real by calling only
    the first): readers give up after READ_SPIN_S and answer unknown."""
    monkeypatch.setattr(shared_table, "READ_SPIN_S", 0.05)
    table = DeviceTable.from_snapshot(1, [upsert(1)])
    writer = SharedTableWriter.build(tmp_path / "t.map", table, None)
    shared = SharedTable(writer.path)
    assert shared.lookup(tp(1)) is not None
    writer._begin()
    assert shared.lookup(tp(1)) is None
    writer._end()
    assert shared.lookup(tp(1)) is not None


def test_a_reader_waits_out_a_write_in_progress(tmp_path: Path) -> None:
    """A record half rewritten (the writer between its two version bumps): the reader
    waits and returns the whole new entry, never the torn one."""
    import threading

    table = DeviceTable.from_snapshot(1, [upsert(7)])
    writer = SharedTableWriter.build(tmp_path / "t.map", table, None)
    shared = SharedTable(writer.path)
    changes = table.apply_batch(2, 2, [upsert(7, device_uid="ff" * 16, not_after=1)])
    record = table.packed_record(int(tp(7), 16))
    assert record is not None
    slot, found = writer._slot_of(bytes.fromhex(tp(7)))
    assert found
    at = shared_table.HEADER_SIZE + slot * shared_table.SLOT_SIZE + 33
    writer._begin()
    writer._map[at : at + 8] = record[:8]  # the first half of the new device uid only

    def finish() -> None:
        time.sleep(0.2)
        writer._map[at : at + len(record)] = record
        writer._end()

    finishing = threading.Thread(target=finish)
    finishing.start()
    assert shared.lookup(tp(7)) == table.lookup(tp(7))
    finishing.join()
    assert changes.touched == (tp(7),)
