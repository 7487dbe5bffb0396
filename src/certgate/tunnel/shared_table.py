"""The device table a node's worker processes share: one file-backed ``mmap``.

``certgate tunnel run --workers N`` runs one feed follower (the supervisor, ``workers.py``)
and N worker processes that serve the data plane. The follower keeps its ``DeviceTable``;
what the workers read is this file, written by the supervisor alone and mapped read-only
(``MAP_SHARED``) by every worker, so the table's pages are in memory once whatever N is.

Layout (little-endian): a 64-byte header, then ``slots`` slots of 64 bytes each::

    header  "<8sQQQQd": magic b"CGSHTAB1", version, slots, count, feed seq, last exchange
    slot    used flag (1 byte) + thumbprint (32 bytes, big-endian) + table record (31 bytes,
            ``table.RECORD_FORMAT``; read by ``table.unpack_entry``, its one reader)

An open-addressing hash table with linear probing: a thumbprint's home slot is its first 8
bytes modulo ``slots``. Thumbprints are SHA-256 digests of certificates the console issued,
so nobody chooses where they land. At most ``MAX_LOAD`` of the slots are used; a batch that
would need more makes the supervisor write a new generation (a new file, built aside from
the follower's table) and the workers swap to it, as they do after a snapshot or a policy
change (STYLE.md habit 8). Deletions shift the following run back (no tombstones).

Concurrency: one writer process, readers in other processes. ``version`` is a seqlock: the
writer makes it odd before changing any slot and even again after; a reader that saw it odd,
or changed across its read, reads again. A reader that cannot get a stable read within
``READ_SPIN_S`` (a writer that died mid-write) answers "unknown", so admission fails closed.

Group and bundle names (interned codes in the records) live beside the file in a small JSON
file, rewritten (atomically) before any record that uses a new code is written; a reader that
meets a code it does not know reads the names again.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import time
from pathlib import Path

from certgate.feed import Entry
from certgate.pki.thumbprint import THUMBPRINT_RE
from certgate.tunnel.persist import atomic_write
from certgate.tunnel.table import RECORD_SIZE, DeviceTable, record_codes, unpack_entry

__all__ = ["MAX_LOAD", "SharedTable", "SharedTableWriter"]

log = logging.getLogger(__name__)

MAGIC = b"CGSHTAB1"
_HEADER = struct.Struct("<8sQQQQd")
HEADER_SIZE = 64
_VERSION = struct.Struct("<Q")
_VERSION_AT = 8
_META = struct.Struct("<QQd")  # count, seq, last exchange
_META_AT = 32
SLOT_SIZE = 64
_KEY_SIZE = 32
assert 1 + _KEY_SIZE + RECORD_SIZE == SLOT_SIZE
MAX_LOAD = 0.75
# A new generation is built with room to grow by this much before the next one.
BUILD_LOAD = 0.6
MIN_SLOTS = 64
READ_SPIN_S = 1.0

_canonical = THUMBPRINT_RE.fullmatch


def names_path(path: Path) -> Path:
    return path.with_suffix(".names")


def _home(key: bytes, slots: int) -> int:
    return int.from_bytes(key[:8], "big") % slots


class SharedTable:
    """A worker's read-only view of the shared table; answers like ``DeviceTable``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as file:
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        magic, _, slots, _, _, _ = _HEADER.unpack_from(self._map, 0)
        if magic != MAGIC or len(self._map) != HEADER_SIZE + slots * SLOT_SIZE:
            self._map.close()
            raise ValueError(f"{path} is not a shared device table")
        self._slots = slots
        self._groups: list[str | None] = [None]
        self._bundles: list[str | None] = [None]
        self._read_names()

    def close(self) -> None:
        self._map.close()

    @property
    def seq(self) -> int:
        return int(_META.unpack_from(self._map, _META_AT)[1])

    @property
    def last_exchange(self) -> float | None:
        """When the follower last exchanged with the console (None: never)."""
        at = float(_META.unpack_from(self._map, _META_AT)[2])
        return at or None

    def __len__(self) -> int:
        return int(_META.unpack_from(self._map, _META_AT)[0])

    def lookup(self, thumbprint: str) -> Entry | None:
        """The entry for ``thumbprint``, None when unknown (or no stable read: fail closed)."""
        if not isinstance(thumbprint, str) or _canonical(thumbprint) is None:
            raise ValueError(f"not a canonical thumbprint: {thumbprint!r}")
        record = self._stable_record(bytes.fromhex(thumbprint))
        if record is None:
            return None
        group, bundle = record_codes(record)
        if group >= len(self._groups) or bundle >= len(self._bundles):
            self._read_names()  # the writer wrote the new names before this record
            if group >= len(self._groups) or bundle >= len(self._bundles):
                log.error("shared table record names an unknown code; treated as unknown")
                return None
        return unpack_entry(thumbprint, record, self._groups, self._bundles)

    def _stable_record(self, key: bytes) -> bytes | None:
        version = _VERSION.unpack_from
        deadline: float | None = None
        while True:
            (before,) = version(self._map, _VERSION_AT)
            if not before & 1:
                record = self._find(key)
                if version(self._map, _VERSION_AT)[0] == before:
                    return record
            if deadline is None:
                deadline = time.monotonic() + READ_SPIN_S
            elif time.monotonic() > deadline:
                log.error("shared device table stays mid-write; treating the device as unknown")
                return None
            os.sched_yield()

    def _find(self, key: bytes) -> bytes | None:
        view, slots = self._map, self._slots
        slot = _home(key, slots)
        for _ in range(slots):
            at = HEADER_SIZE + slot * SLOT_SIZE
            if not view[at]:
                return None
            if view[at + 1 : at + 1 + _KEY_SIZE] == key:
                return view[at + 1 + _KEY_SIZE : at + SLOT_SIZE]
            slot = slot + 1 if slot + 1 < slots else 0
        return None

    def _read_names(self) -> None:
        try:
            names = json.loads(names_path(self.path).read_bytes())
            self._groups = [None, *names["groups"]]
            self._bundles = [None, *names["bundles"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("shared table names unreadable (%s)", exc)


class SharedTableWriter:
    """The supervisor's side: writes a generation from the follower's table, then keeps
    it in step batch by batch (``update``)."""

    def __init__(self, path: Path, slots: int) -> None:
        self.path = path
        self._slots = slots
        self._count = 0
        self._names = (0, 0)
        with path.open("w+b") as file:
            os.fchmod(file.fileno(), 0o600)
            file.truncate(HEADER_SIZE + slots * SLOT_SIZE)
            self._map = mmap.mmap(file.fileno(), 0)
        _HEADER.pack_into(self._map, 0, MAGIC, 0, slots, 0, 0, 0.0)

    @classmethod
    def build(
        cls, path: Path, table: DeviceTable, last_exchange: float | None
    ) -> SharedTableWriter:
        """A new generation at ``path`` holding exactly ``table`` (nobody reads it yet)."""
        slots = max(MIN_SLOTS, int(len(table) / BUILD_LOAD) + 1)
        writer = cls(path, slots)
        writer._write_names(table)
        view, count = writer._map, 0
        for key, record in table.packed_records():
            thumbprint = key.to_bytes(_KEY_SIZE, "big")
            slot = (key >> 192) % slots  # the first 8 bytes: _home without the bytes
            while view[HEADER_SIZE + slot * SLOT_SIZE]:
                slot = slot + 1 if slot + 1 < slots else 0
            at = HEADER_SIZE + slot * SLOT_SIZE
            view[at : at + SLOT_SIZE] = b"\x01" + thumbprint + record
            count += 1
        writer._count = count
        writer.set_meta(table.seq, last_exchange)
        return writer

    def close(self, unlink: bool = True) -> None:
        self._map.close()
        if unlink:
            for path in (self.path, names_path(self.path)):
                path.unlink(missing_ok=True)

    def set_meta(self, seq: int, last_exchange: float | None) -> None:
        _META.pack_into(self._map, _META_AT, self._count, seq, last_exchange or 0.0)

    def update(self, table: DeviceTable, thumbprints: tuple[str, ...]) -> bool:
        """Write what ``table`` now holds for ``thumbprints``; False (nothing written) when
        that would exceed ``MAX_LOAD``: then build a new generation instead."""
        changes = [(bytes.fromhex(t), table.packed_record(int(t, 16))) for t in thumbprints]
        added = sum(
            1 for key, record in changes if record is not None and not self._slot_of(key)[1]
        )
        if self._count + added > self._slots * MAX_LOAD:
            return False
        self._write_names(table)  # before any record that uses a new name
        for key, record in changes:
            self._begin()
            if record is None:
                self._delete(key)
            else:
                self._put(key, record)
            self._end()
        self.set_meta(table.seq, self.last_exchange)
        return True

    @property
    def last_exchange(self) -> float | None:
        return float(_META.unpack_from(self._map, _META_AT)[2]) or None

    def _begin(self) -> None:
        (version,) = _VERSION.unpack_from(self._map, _VERSION_AT)
        _VERSION.pack_into(self._map, _VERSION_AT, version + 1)  # odd: being written

    def _end(self) -> None:
        (version,) = _VERSION.unpack_from(self._map, _VERSION_AT)
        _VERSION.pack_into(self._map, _VERSION_AT, version + 1)

    def _slot_of(self, key: bytes) -> tuple[int, bool]:
        """(slot holding ``key``, True) or (the empty slot ending its run, False)."""
        view, slots = self._map, self._slots
        slot = _home(key, slots)
        while view[HEADER_SIZE + slot * SLOT_SIZE]:
            at = HEADER_SIZE + slot * SLOT_SIZE + 1
            if view[at : at + _KEY_SIZE] == key:
                return slot, True
            slot = slot + 1 if slot + 1 < slots else 0
        return slot, False

    def _put(self, key: bytes, record: bytes) -> None:
        slot, found = self._slot_of(key)
        at = HEADER_SIZE + slot * SLOT_SIZE
        if found:
            self._map[at + 1 + _KEY_SIZE : at + SLOT_SIZE] = record
            return
        self._map[at : at + SLOT_SIZE] = b"\x01" + key + record
        self._count += 1

    def _delete(self, key: bytes) -> None:
        """Remove ``key`` and shift the rest of its run back, so no probe stops early."""
        hole, found = self._slot_of(key)
        if not found:
            return
        view, slots = self._map, self._slots
        probe = hole
        while True:
            probe = probe + 1 if probe + 1 < slots else 0
            at = HEADER_SIZE + probe * SLOT_SIZE
            if not view[at]:
                break
            home = _home(view[at + 1 : at + 1 + _KEY_SIZE], slots)
            # The entry at probe may fill the hole unless its home lies in (hole, probe].
            stays = hole < home <= probe if hole <= probe else home > hole or home <= probe
            if not stays:
                to = HEADER_SIZE + hole * SLOT_SIZE
                view[to : to + SLOT_SIZE] = view[at : at + SLOT_SIZE]
                hole = probe
        to = HEADER_SIZE + hole * SLOT_SIZE
        view[to : to + SLOT_SIZE] = bytes(SLOT_SIZE)
        self._count -= 1

    def _write_names(self, table: DeviceTable) -> None:
        groups, bundles = table.packed_names()
        if (len(groups), len(bundles)) == self._names:
            return
        body = json.dumps({"groups": groups, "bundles": bundles}).encode()
        atomic_write(names_path(self.path), body)
        self._names = (len(groups), len(bundles))
