"""The tunnel's device table: the console's device feed, keyed by CertThumbprint.

A tunnel "maintains a list of devices and certificates and only authenticates the
communication if it sees a certificate it recognizes" (spec, certificate integration cycle
step 6). This module is that list: pure data, no I/O. The shell (``sync.py``) verifies the
signed snapshot or batch and hands its ``entries`` here; ``admission.py`` reads the result.

Feed operations are decoded by the contract (``certgate.feed``: exact keys, exact types,
enum values, canonical hex) *before* any mutation, so a bad batch leaves the table exactly
as it was. The table keeps the group policy at its seq beside the entries (a batch or
snapshot carries it), and answers lookups; it never judges an entry: ``admission.admit``
is the one place that decides whether a certificate may pass.

Memory layout (measured with ``bench/table_scale.py``; the target is 1,000,000 entries in
at most 150 MB RSS). The entries live in one mapping of 64-byte slots (``tunnel.slots``), no
Python object per entry: the thumbprint (32 raw bytes) and one 31-byte ``struct`` record,
device uid (16 raw bytes), not_after (int64), bundle id index, group id index, status bits.
Where the mapping lives is the ``SlotHome``'s choice: anonymous memory (a single-process
node), or a file the workers of ``tunnel run --workers N`` map read-only (``shared_table``),
so a node keeps one table whatever its process count. (A ``dict`` of int keys and packed
records, the layout before, took 162 MB at 1,000,000 entries; these slots take 107 MB.)

Group ids and bundle ids repeat across devices, so they are interned in small side tables
(published beside a file mapping before any record that uses a new one).
A frozen ``Entry`` is materialised only on lookup.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from certgate import feed
from certgate.feed import (
    ATTRIBUTE_FIELDS,
    ComplianceStatus,
    Delete,
    EnrollmentStatus,
    Entry,
    FeedError,
    InvalidEntry,
    PolicyUpdate,
)
from certgate.pki.identity import BUNDLE_ID_RE, GROUP_ID_RE
from certgate.pki.thumbprint import THUMBPRINT_RE
from certgate.tunnel.slots import KEY_SIZE, SLOT_IMAGE, SLOT_SIZE, Slots, slots_for
from certgate.tunnel.slots import RECORD_SIZE as SLOT_RECORD_SIZE

__all__ = [
    "Changes",
    "Columns",
    "DeviceTable",
    "SequenceError",
    "SequenceGap",
    "SequenceReplay",
    "SlotHome",
    "TableView",
]


class SequenceError(FeedError):
    """A batch's ``from_seq``/``to_seq`` do not continue the table's sequence."""

    def __init__(self, message: str, *, table_seq: int, from_seq: int, to_seq: int) -> None:
        super().__init__(message)
        self.table_seq = table_seq
        self.from_seq = from_seq
        self.to_seq = to_seq


class SequenceGap(SequenceError):
    """The batch does not start right after the table's seq: resynchronise (snapshot)."""


class SequenceReplay(SequenceError):
    """Every seq in the batch is already applied: safe to ignore."""


@dataclass(frozen=True, slots=True)
class Changes:
    """What one applied batch did.

    ``touched`` holds (sorted) every thumbprint the batch upserted or deleted: the live
    tunnels of exactly these must be judged again (``admission.admit`` decides; the
    table does not). ``policy`` is the new group policy when the batch carried one.
    """

    from_seq: int
    to_seq: int
    upserted: int
    deleted: int
    touched: tuple[str, ...]
    policy: PolicyUpdate | None = None


@dataclass(frozen=True, slots=True)
class Columns:
    """A page of a format-2 snapshot, decoded (``tunnel.snapshot``) but for its attributes.

    Entry ``i`` is ``keys[i]`` (the thumbprint, 32 raw bytes), ``device_uids[i]`` (16 bytes),
    ``not_after[i]`` and the ATTRIBUTE_FIELDS values ``attributes[index[i]]``, which
    ``DeviceTable.extend_columns`` checks like the fields of a feed entry.
    """

    keys: list[bytes]
    device_uids: list[bytes]
    not_after: list[int]
    attributes: list[object]
    index: list[int]


_canonical = THUMBPRINT_RE.fullmatch  # is_thumbprint without a call: lookups are hot

# Status codes of the packed record, in enum order. The record stores the statuses, never
# a verdict on them: admission (``admission.admit``) is the only judge.
_ENROLLMENT_CODES = tuple(EnrollmentStatus)
_COMPLIANCE_CODES = tuple(ComplianceStatus)
_ENROLLMENT_CODE = {member.value: code for code, member in enumerate(_ENROLLMENT_CODES)}
_COMPLIANCE_CODE = {member.value: code for code, member in enumerate(_COMPLIANCE_CODES)}
_BLOCKED_BIT = 1 << 4

# uid, not_after, bundle index (0 = None), group index, status bits. 31 bytes on purpose:
# with the 33-byte bytes header this is exactly one 64-byte allocation.
_RECORD = struct.Struct("<16sqIHB")
RECORD_FORMAT = _RECORD.format  # the packed record layout, for persistence
RECORD_SIZE = _RECORD.size
assert _RECORD.size == SLOT_RECORD_SIZE == 31
assert SLOT_IMAGE.format == "<B32s" + _RECORD.format[1:]
_MAX_GROUPS = 2**16 - 1
_MAX_BUNDLES = 2**32 - 1

# A validated upsert, ready to pack but for interning its names:
# (device uid, not_after, group id, bundle id, status bits).
_Upsert = tuple[bytes, int, str, str | None, int]
# A parsed operation: the thumbprint key (32 raw bytes), and the new upsert (None deletes).
_Op = tuple[bytes, _Upsert | None]

# Lookups build an Entry per call. A frozen dataclass's __init__ sets each field through
# object.__setattr__ (1.5 us for these eight: a third of a lookup at 1,000,000 entries,
# bench/results/summary.md); setting the same slots through their descriptors takes 0.7 us.
(
    _set_thumbprint,
    _set_device_uid,
    _set_group_id,
    _set_app_bundle_id,
    _set_enrollment_status,
    _set_compliance_status,
    _set_blocked,
    _set_not_after,
) = (getattr(Entry, f.name).__set__ for f in fields(Entry))
_new_object = object.__new__


class TableView(Protocol):
    """What the data plane reads of a device table: this module's ``DeviceTable``, or a
    worker's ``shared_table.SharedTable``."""

    @property
    def seq(self) -> int: ...

    def __len__(self) -> int: ...

    def lookup(self, thumbprint: str) -> Entry | None: ...


class SlotHome(Protocol):
    """Where a table's slots live: ``allocate`` a mapping of ``slots`` slots, and
    ``publish_names`` for readers of that mapping (called before any record that uses a new
    group or bundle code is written to it), ``release`` one the table is done with."""

    def allocate(self, slots: int) -> Slots: ...

    def release(self, slots: Slots) -> None: ...

    def publish_names(
        self, slots: Slots, groups: list[str | None], bundles: list[str | None]
    ) -> None: ...


class MemoryHome:
    """Anonymous memory, read by this process alone (a single-process node)."""

    def allocate(self, slots: int) -> Slots:
        return Slots(slots)

    def release(self, slots: Slots) -> None:
        slots.close()

    def publish_names(
        self, slots: Slots, groups: list[str | None], bundles: list[str | None]
    ) -> None:
        pass


_MEMORY = MemoryHome()
_UNPUBLISHED = (-1, -1)  # a new mapping gets its names file even while there are none


class _Interner:
    """Interns strings to small ints; index 0 is reserved for None."""

    __slots__ = ("_index", "_limit", "_values", "_what")

    def __init__(self, limit: int, what: str) -> None:
        self._values: list[str | None] = [None]
        self._index: dict[str | None, int] = {None: 0}
        self._limit = limit
        self._what = what

    def code(self, value: str | None) -> int:
        found = self._index.get(value)
        if found is None:
            found = len(self._values)
            if found > self._limit:  # apply_batch calls check_room first, so never there
                raise InvalidEntry(f"too many distinct {self._what} (limit {self._limit})")
            self._values.append(value)
            self._index[value] = found
        return found

    def value(self, code: int) -> str | None:
        return self._values[code]

    def check_room(self, values: Iterable[str | None]) -> None:
        """Raise unless interning ``values`` stays within the record field's range."""
        new = {value for value in values if value not in self._index}
        if len(self._values) - 1 + len(new) > self._limit:
            raise InvalidEntry(f"too many distinct {self._what} (limit {self._limit})")


class DeviceTable:
    """Device certificates by thumbprint, the group policy, and the feed seq they reflect.

    Single-threaded by design (the asyncio shell owns it). ``apply_batch`` mutates in
    place, but only after the whole batch has validated; snapshot reloads build a new
    table aside (``from_snapshot``, or page by page with ``extend_columns``, then ``fit``)
    and swap the reference (STYLE.md habit 8); the replaced one is ``close``d. ``policy``
    is None until the feed carried one (the node then applies the policy of its trust
    config). ``home`` says where the slots live (default: anonymous memory).
    """

    __slots__ = (
        "_bundles",
        "_groups",
        "_home",
        "_pending",
        "_published",
        "_seq",
        "_slots",
        "policy",
    )

    def __init__(
        self,
        seq: int = 0,
        policy: PolicyUpdate | None = None,
        *,
        home: SlotHome | None = None,
        capacity: int = 0,
    ) -> None:
        if type(seq) is not int or seq < 0:
            raise SequenceError(f"invalid table seq {seq!r}", table_seq=seq, from_seq=0, to_seq=0)
        self._seq = seq
        self.policy = policy
        self._groups = _Interner(_MAX_GROUPS, "group ids")
        self._bundles = _Interner(_MAX_BUNDLES, "bundle ids")
        self._home: SlotHome = _MEMORY if home is None else home
        self._slots = self._home.allocate(slots_for(capacity))
        self._published = _UNPUBLISHED  # name counts the current mapping's readers know
        self._publish()
        self._pending = bytearray()  # slot images of snapshot pages, placed by ``fit``

    @classmethod
    def from_snapshot(
        cls,
        seq: int,
        entries: Iterable[object],
        policy: PolicyUpdate | None = None,
        *,
        home: SlotHome | None = None,
    ) -> DeviceTable:
        """A table holding exactly ``entries`` (all ``upsert``; no duplicates) at ``seq``."""
        table = cls(seq, policy, home=home)
        table.extend(entries)
        table.fit()
        return table

    @property
    def path(self) -> Path | None:
        """The file the slots are mapped from (None: anonymous memory)."""
        return self._slots.path

    def close(self) -> None:
        """Release the slots (a file mapping's file goes too): the table is done with."""
        self._home.release(self._slots)

    def extend(self, entries: Iterable[object]) -> None:
        """Add a further page of a paged snapshot (upserts, no duplicates), seq unchanged.

        Only for a table nobody serves yet: failing halfway through leaves it partial.
        """
        start = len(self)
        for index, raw in enumerate(_iterate(entries), start):
            where = f"entries[{index}]"
            op = feed.decode_op(raw, where, feed.MIN_FEED_VERSION)
            if not isinstance(op, Entry):
                raise InvalidEntry(f"{where}: a snapshot holds only upserts")
            key, upsert = _packable(op)
            assert upsert is not None  # an Entry packs to an upsert
            self._reserve(1, double=True)
            record = self._pack(upsert)
            self._publish()
            if not self._slots.put(key, record):
                raise InvalidEntry(f"{where}: duplicate thumbprint {key.hex()}")
        self._slots.set_meta(self._seq)

    def extend_columns(self, columns: Columns) -> None:
        """Add a page of a format-2 snapshot, seq unchanged; like ``extend``, only for a
        table nobody serves yet, and its entries are there once ``fit`` (after the last
        page) placed them. Attributes are checked once per distinct combination, so an
        entry costs one record packed (format 1: every field of every entry)."""
        packed = [
            self._pack_attributes(values, f"entries.attributes.values[{code}]")
            for code, values in enumerate(columns.attributes)
        ]
        # Pages come before their number is known: their entries wait as slot images and
        # ``fit`` places them all into slots sized once (no rehash per doubling).
        images = bytearray(SLOT_SIZE * len(columns.keys))
        pack, offsets = SLOT_IMAGE.pack_into, range(0, len(images), SLOT_SIZE)
        entries = zip(
            offsets,
            columns.keys,
            columns.device_uids,
            columns.not_after,
            columns.index,
            strict=True,
        )
        for at, key, uid, not_after, code in entries:
            bundle, group, status = packed[code]
            pack(images, at, 1, key, uid, not_after, bundle, group, status)
        self._pending += images

    def fit(self) -> None:
        """After a paged build: place the pages' entries (``extend_columns``) into slots
        sized for ``BUILD_LOAD``. Raises when a page repeated a thumbprint."""
        pending, self._pending = self._pending, bytearray()
        wanted = slots_for(len(self) + len(pending) // SLOT_SIZE)  # len(self): placed ones
        if not self._slots.has_room(len(pending) // SLOT_SIZE) or (
            self._slots.slots > wanted * 11 // 10
        ):
            self._move_to(wanted)
        self._publish()
        placed = self._slots.place(pending)
        self._slots.set_meta(self._seq)
        if not placed:
            raise InvalidEntry("snapshot page repeats a thumbprint of an earlier page")

    def _pack_attributes(self, values: object, where: str) -> tuple[int, int, int]:
        """(bundle code, group code, status bits) of one ATTRIBUTE_FIELDS combination."""
        if type(values) is not list or len(values) != len(ATTRIBUTE_FIELDS):
            raise InvalidEntry(f"{where}: expected [{', '.join(ATTRIBUTE_FIELDS)}]")
        raw: dict[object, object] = dict(zip(ATTRIBUTE_FIELDS, values, strict=True))
        group_id, bundle_id, status = _parse_attributes(raw, where)
        return self._bundles.code(bundle_id), self._groups.code(group_id), status

    # Packed form, for persistence: records are RECORD_FORMAT structs keyed by the
    # thumbprint (32 raw bytes); group and bundle codes index the name lists (1-based).

    def packed_names(self) -> tuple[list[str | None], list[str | None]]:
        """(group names, bundle names), in code order starting at code 1."""
        return self._groups._values[1:], self._bundles._values[1:]

    def packed_records(self) -> Iterator[tuple[bytes, bytes]]:
        """(thumbprint, record) of every entry (lazy: finish before the next change)."""
        return self._slots.items()

    @classmethod
    def from_packed(
        cls,
        seq: int,
        groups: list[str],
        bundles: list[str],
        entries: bytes,
        policy: PolicyUpdate | None = None,
        *,
        home: SlotHome | None = None,
    ) -> DeviceTable:
        """Rebuild a table from its packed form (trusted input: the node's own files):
        ``entries`` is thumbprint (32 bytes) + record, one after another; duplicates are
        refused."""
        width = KEY_SIZE + _RECORD.size
        count = len(entries) // width
        table = cls(seq, policy, home=home, capacity=count)
        for interner, names in ((table._groups, groups), (table._bundles, bundles)):
            for index, name in enumerate(names, start=1):
                if interner.code(name) != index:
                    table.close()
                    raise InvalidEntry(f"duplicate name {name!r} in packed table")
        table._publish()
        # Slot images (a used flag before each entry) by 64 strided copies, in C: a Python
        # step per entry took most of a 1,000,000-entry restart.
        images = bytearray(SLOT_SIZE * count)
        images[0::SLOT_SIZE] = b"\x01" * count
        for offset in range(width):
            images[1 + offset :: SLOT_SIZE] = entries[offset::width]
        if len(entries) % width or not table._slots.place(images):
            table.close()
            raise InvalidEntry("packed table holds a duplicate thumbprint or a partial entry")
        table._slots.set_meta(seq)
        return table

    @property
    def seq(self) -> int:
        """The last feed seq reflected in the table (0: nothing applied yet)."""
        return self._seq

    def __len__(self) -> int:
        """Entries held, counting those of pages ``fit`` has yet to place."""
        return self._slots.count + len(self._pending) // SLOT_SIZE

    def __contains__(self, thumbprint: object) -> bool:
        key = _key_or_none(thumbprint)
        return key is not None and self._slots.get(key) is not None

    def lookup(self, thumbprint: str) -> Entry | None:
        """The entry for ``thumbprint``, or None when the table does not know it."""
        key = _key_or_none(thumbprint)
        if key is None:
            raise ValueError(f"not a canonical thumbprint: {thumbprint!r}")
        record = self._slots.get(key)
        return None if record is None else self._unpack(thumbprint, record)

    def apply_batch(
        self,
        from_seq: int,
        to_seq: int,
        entries: Iterable[object],
        version: int = feed.MIN_FEED_VERSION,
    ) -> Changes:
        """Apply a gapless feed batch of contract ``version`` atomically: all of it, or
        (on any error) nothing."""
        self._check_sequence(from_seq, to_seq)
        if self._pending:
            raise RuntimeError("apply_batch on a table whose snapshot pages were not fitted")
        decoded = [
            feed.decode_op(raw, f"entries[{i}]", version) for i, raw in enumerate(_iterate(entries))
        ]
        policies = [op for op in decoded if isinstance(op, PolicyUpdate)]
        if any(isinstance(op, feed.TrustUpdate) for op in decoded):
            # The node applies rotations itself (sync.FeedFollower); never the table.
            raise feed.InvalidEntry("a trust operation reached the device table")
        ops = [_packable(op) for op in decoded if isinstance(op, Entry | Delete)]
        upserts = [upsert for _, upsert in ops if upsert is not None]
        self._groups.check_room(upsert[2] for upsert in upserts)
        self._bundles.check_room(upsert[3] for upsert in upserts)
        # Room and names before any record: a failure here (a full disk) changes no entry.
        self._reserve(len(upserts))
        records = [(key, None if upsert is None else self._pack(upsert)) for key, upsert in ops]
        self._publish()
        # Validation is complete: nothing below can raise, so the batch applies whole.
        slots = self._slots
        slots.begin()
        for key, record in records:
            if record is None:
                slots.delete(key)
            else:
                slots.put(key, record)
        slots.end()
        if policies:
            self.policy = policies[-1]
        self._seq = to_seq
        slots.set_meta(to_seq)
        touched = tuple(sorted({key.hex() for key, _ in ops}))
        return Changes(
            from_seq,
            to_seq,
            len(upserts),
            len(ops) - len(upserts),
            touched,
            policies[-1] if policies else None,
        )

    def set_last_exchange(self, at: float | None) -> None:
        """Record when the follower last exchanged with the console, for readers of a file
        mapping (the workers' freshness)."""
        self._slots.set_meta(self._seq, at)

    def to_snapshot(self) -> Iterator[dict[str, object]]:
        """Every entry as a feed ``upsert`` object, for persistence and ``from_snapshot``.

        Lazy: finish iterating (or take a ``list``) before the next ``apply_batch``.
        """
        for key, record in self._slots.items():
            yield self._unpack(key.hex(), record).encode()

    def thumbprints(self) -> Iterator[str]:
        """Every thumbprint the table holds (lazy, like ``to_snapshot``)."""
        return (key.hex() for key, _ in self._slots.items())

    def _check_sequence(self, from_seq: int, to_seq: int) -> None:
        seqs = {"table_seq": self._seq, "from_seq": from_seq, "to_seq": to_seq}
        if type(from_seq) is not int or type(to_seq) is not int or not 1 <= from_seq <= to_seq:
            raise SequenceError(f"malformed batch range {from_seq!r}..{to_seq!r}", **seqs)
        if to_seq <= self._seq:
            raise SequenceReplay(f"batch {from_seq}..{to_seq} already applied", **seqs)
        if from_seq != self._seq + 1:
            raise SequenceGap(f"batch starts at {from_seq}, table is at {self._seq}", **seqs)

    def _reserve(self, added: int, *, double: bool = False) -> None:
        """Room for ``added`` more entries: else a new mapping built at ``BUILD_LOAD`` (25 %
        growth before the next move; ``double``: twice the entries, for a build that ends
        with ``fit``), the entries copied over, the old one released (readers swap when
        told: ``workers``)."""
        if not self._slots.has_room(added):
            wanted = len(self) + added
            self._move_to(slots_for(max(wanted, 2 * len(self)) if double else wanted))

    def _move_to(self, slots: int) -> None:
        old, new = self._slots, self._home.allocate(slots)
        old.copy_into(new)
        new.set_meta(self._seq, old.last_exchange)
        self._slots, self._published = new, _UNPUBLISHED
        self._publish()
        self._home.release(old)

    def _publish(self) -> None:
        groups, bundles = self.packed_names()
        if (len(groups), len(bundles)) != self._published:
            self._home.publish_names(self._slots, groups, bundles)
            self._published = (len(groups), len(bundles))

    def _pack(self, upsert: _Upsert) -> bytes:
        uid, not_after, group_id, bundle_id, status = upsert
        return _RECORD.pack(
            uid, not_after, self._bundles.code(bundle_id), self._groups.code(group_id), status
        )

    def _unpack(self, thumbprint: str, record: bytes) -> Entry:
        return unpack_entry(thumbprint, record, self._groups._values, self._bundles._values)


def record_codes(record: bytes) -> tuple[int, int]:
    """(group code, bundle code) of a packed record: the names it needs to be read."""
    _, _, bundle, group, _ = _RECORD.unpack(record)
    return group, bundle


def unpack_entry(
    thumbprint: str,
    record: bytes,
    groups: Sequence[str | None],
    bundles: Sequence[str | None],
) -> Entry:
    """The ``Entry`` a packed record stands for; ``groups``/``bundles`` index names by
    code (code 0: None). The one reader of the record layout, for this table and the
    workers' shared one (``tunnel.shared_table``)."""
    uid, not_after, bundle, group, status = _RECORD.unpack(record)
    # Groups are never None (code 0 is never handed out for them).
    entry: Entry = _new_object(Entry)
    _set_thumbprint(entry, thumbprint)
    _set_device_uid(entry, uid.hex())
    _set_group_id(entry, groups[group])
    _set_app_bundle_id(entry, bundles[bundle])
    _set_enrollment_status(entry, _ENROLLMENT_CODES[status & 0b11])
    _set_compliance_status(entry, _COMPLIANCE_CODES[(status >> 2) & 0b11])
    _set_blocked(entry, status & _BLOCKED_BIT != 0)
    _set_not_after(entry, not_after)
    return entry


def _packable(op: Entry | Delete) -> _Op:
    """The thumbprint key and, for an upsert, its fields ready to pack."""
    key = bytes.fromhex(op.thumbprint)
    if isinstance(op, Delete):
        return key, None
    status = _ENROLLMENT_CODE[op.enrollment_status.value]
    status |= _COMPLIANCE_CODE[op.compliance_status.value] << 2
    if op.blocked:
        status |= _BLOCKED_BIT
    return key, (bytes.fromhex(op.device_uid), op.not_after, op.group_id, op.app_bundle_id, status)


def _key_or_none(thumbprint: object) -> bytes | None:
    # Validate before fromhex(): it would also accept whitespace and upper case.
    if isinstance(thumbprint, str) and _canonical(thumbprint) is not None:
        return bytes.fromhex(thumbprint)
    return None


def _iterate(entries: Iterable[object]) -> Iterator[object]:
    if isinstance(entries, str | bytes | Mapping) or not isinstance(entries, Iterable):
        raise InvalidEntry(f"entries must be a list, not {type(entries).__name__}")
    return iter(entries)


def _parse_attributes(raw: Mapping[Any, Any], where: str) -> tuple[str, str | None, int]:
    """(group id, bundle id, status bits) of the ATTRIBUTE_FIELDS in ``raw``."""
    group_id = feed.text(raw, "group_id", GROUP_ID_RE, where)
    bundle = raw["app_bundle_id"]
    bundle_id = None if bundle is None else feed.text(raw, "app_bundle_id", BUNDLE_ID_RE, where)
    status = feed.choice(raw, "enrollment_status", _ENROLLMENT_CODE, where)
    status |= feed.choice(raw, "compliance_status", _COMPLIANCE_CODE, where) << 2
    if feed.boolean(raw, "blocked", where):
        status |= _BLOCKED_BIT
    return group_id, bundle_id, status
