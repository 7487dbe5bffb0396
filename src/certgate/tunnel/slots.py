"""The device table's storage: one mapping of fixed 64-byte slots, no Python object per entry.

A node keeps its whole device table here (``table.DeviceTable`` over a ``Slots``): an
anonymous mapping for a single-process node, a file under ``/dev/shm`` that the workers map
read-only for ``tunnel run --workers N`` (``shared_table``). One layout, written by the feed
follower alone, so the table is in memory once (1,000,000 entries: about 107 MB, where a
``dict`` of int keys and packed records took 162 MB beside the workers' file).

Layout (little-endian): a 64-byte header, then ``slots`` slots of 64 bytes each::

    header  "<8sQQQQd": magic b"CGSHTAB1", version, slots, count, feed seq, last exchange
    slot    used flag (1 byte) + thumbprint (32 bytes, big-endian) + table record (31 bytes,
            ``table.RECORD_FORMAT``; read by ``table.unpack_entry``, its one reader)

An open-addressing hash table with linear probing: a thumbprint's home slot is its first 8
bytes modulo ``slots``. Thumbprints are SHA-256 digests of certificates the console issued,
so nobody chooses where they land. At most ``MAX_LOAD`` of the slots are used; the table
grows into a new mapping sized for ``BUILD_LOAD`` first. Deletions shift the following run
back (no tombstones).

``version`` is a seqlock for readers in other processes: the writer makes it odd before
changing any slot and even again after (``begin``/``end``).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

__all__ = ["BUILD_LOAD", "HEADER_SIZE", "MAX_LOAD", "MIN_SLOTS", "SLOT_SIZE", "Slots", "find"]

MAGIC = b"CGSHTAB1"
HEADER = struct.Struct("<8sQQQQd")
HEADER_SIZE = 64
VERSION = struct.Struct("<Q")
VERSION_AT = 8
META = struct.Struct("<QQd")  # count, seq, last exchange
META_AT = 32
SLOT_SIZE = 64
KEY_SIZE = 32
RECORD_SIZE = SLOT_SIZE - 1 - KEY_SIZE
MAX_LOAD = 0.75
BUILD_LOAD = 0.6  # a new mapping has room to grow by this much before the next one
MIN_SLOTS = 64
_RECORD_AT = 1 + KEY_SIZE
# A used slot whose record is spelled out: used flag, key, then table.RECORD_FORMAT's fields.
SLOT_IMAGE = struct.Struct("<B32s16sqIHB")
assert SLOT_IMAGE.size == SLOT_SIZE


def slots_for(count: int) -> int:
    """The slot count of a mapping built to hold ``count`` entries."""
    return max(MIN_SLOTS, int(count / BUILD_LOAD) + 1)


def find(view: mmap.mmap, slots: int, key: bytes) -> bytes | None:
    """The record stored under ``key`` (32 bytes), or None. Bounded by ``slots`` probes,
    so a damaged mapping cannot make a reader loop."""
    at = HEADER_SIZE + int.from_bytes(key[:8], "big") % slots * SLOT_SIZE
    end = HEADER_SIZE + slots * SLOT_SIZE
    for _ in range(slots):
        if not view[at]:
            return None
        if view[at + 1 : at + _RECORD_AT] == key:
            return view[at + _RECORD_AT : at + SLOT_SIZE]
        at += SLOT_SIZE
        if at == end:
            at = HEADER_SIZE
    return None


class Slots:
    """One mapping of the layout above; the writer's side (``shared_table.SharedTable``
    reads it in the workers). ``path`` None: anonymous memory, this process only."""

    __slots__ = ("_map", "count", "path", "slots")

    def __init__(self, slots: int, path: Path | None = None) -> None:
        size = HEADER_SIZE + slots * SLOT_SIZE
        if path is None:
            self._map = mmap.mmap(-1, size)
        else:
            with path.open("w+b") as file:
                os.fchmod(file.fileno(), 0o600)
                file.truncate(size)
                self._map = mmap.mmap(file.fileno(), 0)
        HEADER.pack_into(self._map, 0, MAGIC, 0, slots, 0, 0, 0.0)
        self.slots = slots
        self.path = path
        self.count = 0

    def close(self) -> None:
        """Unmap (the file, if any, is its home's to remove: ``SlotHome.release``)."""
        self._map.close()

    def has_room(self, added: int) -> bool:
        return self.count + added <= self.slots * MAX_LOAD

    def get(self, key: bytes) -> bytes | None:
        return find(self._map, self.slots, key)

    def put(self, key: bytes, record: bytes) -> bool:
        """Store ``record`` under ``key``; True when the key is new. The caller keeps the
        load under MAX_LOAD (``has_room``), so an empty slot always ends the run."""
        view, at, found = self._map, *self._slot_of(key)
        if found:
            view[at + _RECORD_AT : at + SLOT_SIZE] = record
            return False
        view[at : at + SLOT_SIZE] = b"\x01" + key + record
        self.count += 1
        return True

    def delete(self, key: bytes) -> None:
        """Remove ``key`` and shift the rest of its run back, so no probe stops early."""
        hole, found = self._slot_of(key)
        if not found:
            return
        view, slots = self._map, self.slots
        first, end = HEADER_SIZE, HEADER_SIZE + slots * SLOT_SIZE
        probe = hole
        while True:
            probe = probe + SLOT_SIZE if probe + SLOT_SIZE < end else first
            if not view[probe]:
                break
            home = first + int.from_bytes(view[probe + 1 : probe + 9], "big") % slots * SLOT_SIZE
            # The entry at probe may fill the hole unless its home lies in (hole, probe].
            stays = hole < home <= probe if hole <= probe else home > hole or home <= probe
            if not stays:
                view[hole : hole + SLOT_SIZE] = view[probe : probe + SLOT_SIZE]
                hole = probe
        view[hole : hole + SLOT_SIZE] = bytes(SLOT_SIZE)
        self.count -= 1

    def place(self, images: bytes | bytearray) -> bool:
        """Add whole slot images (64 bytes each, used flag set: ``SLOT_IMAGE``) in one pass;
        False at the first key already present (the rest not placed). The caller made room
        (``has_room``). The bulk path of a snapshot build: a loop over bytes, no call per
        entry."""
        view, slots, count = self._map, self.slots, self.count
        end = HEADER_SIZE + slots * SLOT_SIZE
        try:
            for start in range(0, len(images), SLOT_SIZE):
                key = images[start + 1 : start + _RECORD_AT]
                at = HEADER_SIZE + int.from_bytes(key[:8], "big") % slots * SLOT_SIZE
                while view[at]:
                    if view[at + 1 : at + _RECORD_AT] == key:
                        return False
                    at = at + SLOT_SIZE if at + SLOT_SIZE < end else HEADER_SIZE
                view[at : at + SLOT_SIZE] = images[start : start + SLOT_SIZE]
                count += 1
        finally:
            self.count = count
        return True

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, record) of every used slot, in slot order (lazy: no write meanwhile)."""
        view = self._map
        for at in range(HEADER_SIZE, HEADER_SIZE + self.slots * SLOT_SIZE, SLOT_SIZE):
            if view[at]:
                yield view[at + 1 : at + _RECORD_AT], view[at + _RECORD_AT : at + SLOT_SIZE]

    def copy_into(self, other: Slots) -> None:
        """Every entry into ``other`` (empty, larger): whole slots, no record decoded."""
        view, target, slots = self._map, other._map, other.slots
        end = HEADER_SIZE + slots * SLOT_SIZE
        for at in range(HEADER_SIZE, HEADER_SIZE + self.slots * SLOT_SIZE, SLOT_SIZE):
            if not view[at]:
                continue
            to = HEADER_SIZE + int.from_bytes(view[at + 1 : at + 9], "big") % slots * SLOT_SIZE
            while target[to]:
                to = to + SLOT_SIZE if to + SLOT_SIZE < end else HEADER_SIZE
            target[to : to + SLOT_SIZE] = view[at : at + SLOT_SIZE]
        other.count = self.count

    def begin(self) -> None:
        (version,) = VERSION.unpack_from(self._map, VERSION_AT)
        VERSION.pack_into(self._map, VERSION_AT, version + 1)  # odd: being written

    def end(self) -> None:
        (version,) = VERSION.unpack_from(self._map, VERSION_AT)
        VERSION.pack_into(self._map, VERSION_AT, version + 1)

    def set_meta(self, seq: int, last_exchange: float | None = None) -> None:
        """Count and seq; the last exchange too when given (else the one written before)."""
        if last_exchange is None:
            last_exchange = self.last_exchange
        META.pack_into(self._map, META_AT, self.count, seq, last_exchange or 0.0)

    @property
    def last_exchange(self) -> float | None:
        return float(META.unpack_from(self._map, META_AT)[2]) or None

    def _slot_of(self, key: bytes) -> tuple[int, bool]:
        """(offset of the slot holding ``key``, True) or (the empty slot ending its run,
        False)."""
        view, slots = self._map, self.slots
        at = HEADER_SIZE + int.from_bytes(key[:8], "big") % slots * SLOT_SIZE
        end = HEADER_SIZE + slots * SLOT_SIZE
        while view[at]:
            if view[at + 1 : at + _RECORD_AT] == key:
                return at, True
            at = at + SLOT_SIZE if at + SLOT_SIZE < end else HEADER_SIZE
        return at, False
