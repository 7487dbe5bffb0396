"""The device table a node's worker processes share: the follower's slots, in a file.

``certgate tunnel run --workers N`` runs one feed follower (the supervisor, ``workers.py``)
and N worker processes that serve the data plane. The follower's ``DeviceTable`` keeps its
slots (``tunnel.slots``, the layout) in a file under ``/dev/shm`` (``MappedFiles``, its
``SlotHome``), applying every batch there itself; each worker maps that file read-only
(``MAP_SHARED``, ``SharedTable``), so the table's pages are in memory once whatever N is.
A snapshot, or a batch that needs more slots, puts the table in a new file (a new
generation): the supervisor tells the workers, which swap to it (STYLE.md habit 8); the
old file is removed at once, and a worker keeps its mapping of it until it swaps.

Concurrency: one writer process, readers in other processes. The header's ``version`` is a
seqlock: the writer makes it odd before changing any slot and even again after; a reader
that saw it odd, or changed across its read, reads again. A reader that cannot get a stable
read within ``READ_SPIN_S`` (a writer that died mid-write) answers "unknown", so admission
fails closed.

Group and bundle names (interned codes in the records) live beside the file in a small JSON
file, rewritten (atomically) before any record that uses a new code is written; a reader that
meets a code it does not know reads the names again.
"""

from __future__ import annotations

import itertools
import json
import logging
import mmap
import os
import time
from pathlib import Path

from certgate.feed import Entry
from certgate.pki.thumbprint import THUMBPRINT_RE
from certgate.tunnel import slots as layout
from certgate.tunnel.persist import atomic_write
from certgate.tunnel.slots import Slots
from certgate.tunnel.table import record_codes, unpack_entry

__all__ = ["MappedFiles", "SharedTable"]

log = logging.getLogger(__name__)

READ_SPIN_S = 1.0

_canonical = THUMBPRINT_RE.fullmatch


def names_path(path: Path) -> Path:
    return path.with_suffix(".names")


class MappedFiles:
    """The follower's ``SlotHome`` in a node with workers: each mapping a new file
    ``table-N.map`` in ``directory`` (mode 0600), its names in ``table-N.names``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._generations = itertools.count(1)

    def allocate(self, slots: int) -> Slots:
        return Slots(slots, self.directory / f"table-{next(self._generations)}.map")

    def release(self, slots: Slots) -> None:
        """Unmap and remove (a worker keeps its own mapping until it swaps)."""
        slots.close()
        if slots.path is not None:
            for path in (slots.path, names_path(slots.path)):
                path.unlink(missing_ok=True)

    def publish_names(
        self, slots: Slots, groups: list[str | None], bundles: list[str | None]
    ) -> None:
        assert slots.path is not None  # allocated here
        body = json.dumps({"groups": groups, "bundles": bundles}).encode()
        atomic_write(names_path(slots.path), body)


class SharedTable:
    """A worker's read-only view of the shared table; answers like ``DeviceTable``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as file:
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        magic, _, slots, _, _, _ = layout.HEADER.unpack_from(self._map, 0)
        if magic != layout.MAGIC or len(self._map) != layout.HEADER_SIZE + slots * layout.SLOT_SIZE:
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
        return int(layout.META.unpack_from(self._map, layout.META_AT)[1])

    @property
    def last_exchange(self) -> float | None:
        """When the follower last exchanged with the console (None: never)."""
        at = float(layout.META.unpack_from(self._map, layout.META_AT)[2])
        return at or None

    def __len__(self) -> int:
        return int(layout.META.unpack_from(self._map, layout.META_AT)[0])

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
        version = layout.VERSION.unpack_from
        deadline: float | None = None
        while True:
            (before,) = version(self._map, layout.VERSION_AT)
            if not before & 1:
                record = layout.find(self._map, self._slots, key)
                if version(self._map, layout.VERSION_AT)[0] == before:
                    return record
            if deadline is None:
                deadline = time.monotonic() + READ_SPIN_S
            elif time.monotonic() > deadline:
                log.error("shared device table stays mid-write; treating the device as unknown")
                return None
            os.sched_yield()

    def _read_names(self) -> None:
        try:
            names = json.loads(names_path(self.path).read_bytes())
            self._groups = [None, *names["groups"]]
            self._bundles = [None, *names["bundles"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("shared table names unreadable (%s)", exc)
