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

Memory layout (measured with ``bench/table_scale.py``; the target is 1,000,000 entries well
under 250 MB RSS). One plain ``dict`` maps each thumbprint to a packed record:

* key: the thumbprint as a 256-bit ``int`` (a 64-byte object; a 32-byte ``bytes`` key costs
  80 bytes because CPython rounds its 65-byte object up to the next 16-byte size class);
* value: one 31-byte ``struct`` record (a 64-byte object; 32 bytes would again cost 80):
  device uid (16 raw bytes), not_after (int64), bundle id index, group id index, status bits.

Group ids and bundle ids repeat across devices, so they are interned in small side tables.
A frozen ``Entry`` is materialised only on lookup.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
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

__all__ = [
    "Changes",
    "Columns",
    "DeviceTable",
    "SequenceError",
    "SequenceGap",
    "SequenceReplay",
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

    Entry ``i`` is ``keys[i]`` (the thumbprint as an int), ``device_uids[i]`` (16 bytes),
    ``not_after[i]`` and the ATTRIBUTE_FIELDS values ``attributes[index[i]]``, which
    ``DeviceTable.extend_columns`` checks like the fields of a feed entry.
    """

    keys: list[int]
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
assert _RECORD.size == 31
_MAX_GROUPS = 2**16 - 1
_MAX_BUNDLES = 2**32 - 1

# A validated upsert, ready to pack but for interning its names:
# (device uid, not_after, group id, bundle id, status bits).
_Upsert = tuple[bytes, int, str, str | None, int]
# A parsed operation: the thumbprint key, and the new upsert (None deletes).
_Op = tuple[int, _Upsert | None]

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
    table aside (``from_snapshot``, or page by page with ``extend_columns``) and swap the
    reference (STYLE.md habit 8). ``policy`` is None until the feed carried one (the node
    then applies the policy of its trust config).
    """

    __slots__ = ("_bundles", "_groups", "_records", "_seq", "policy")

    def __init__(self, seq: int = 0, policy: PolicyUpdate | None = None) -> None:
        if type(seq) is not int or seq < 0:
            raise SequenceError(f"invalid table seq {seq!r}", table_seq=seq, from_seq=0, to_seq=0)
        self._seq = seq
        self.policy = policy
        self._records: dict[int, bytes] = {}
        self._groups = _Interner(_MAX_GROUPS, "group ids")
        self._bundles = _Interner(_MAX_BUNDLES, "bundle ids")

    @classmethod
    def from_snapshot(
        cls, seq: int, entries: Iterable[object], policy: PolicyUpdate | None = None
    ) -> DeviceTable:
        """A table holding exactly ``entries`` (all ``upsert``; no duplicates) at ``seq``."""
        table = cls(seq, policy)
        table.extend(entries)
        return table

    def extend(self, entries: Iterable[object]) -> None:
        """Add a further page of a paged snapshot (upserts, no duplicates), seq unchanged.

        Only for a table nobody serves yet: failing halfway through leaves it partial.
        """
        start = len(self._records)
        for index, raw in enumerate(_iterate(entries), start):
            where = f"entries[{index}]"
            op = feed.decode_op(raw, where, feed.MIN_FEED_VERSION)
            if not isinstance(op, Entry):
                raise InvalidEntry(f"{where}: a snapshot holds only upserts")
            key, upsert = _packable(op)
            if key in self._records:
                raise InvalidEntry(f"{where}: duplicate thumbprint {_hex(key)}")
            assert upsert is not None  # an Entry packs to an upsert
            self._records[key] = self._pack(upsert)

    def extend_columns(self, columns: Columns) -> None:
        """Add a page of a format-2 snapshot, seq unchanged; like ``extend``, only for a
        table nobody serves yet. Attributes are checked once per distinct combination,
        so an entry costs one record packed (format 1: every field of every entry)."""
        packed = [
            self._pack_attributes(values, f"entries.attributes.values[{code}]")
            for code, values in enumerate(columns.attributes)
        ]
        records, pack = self._records, _RECORD.pack
        start = len(records)
        entries = zip(
            columns.keys, columns.device_uids, columns.not_after, columns.index, strict=True
        )
        for key, uid, not_after, code in entries:
            bundle, group, status = packed[code]
            records[key] = pack(uid, not_after, bundle, group, status)
        if len(records) != start + len(columns.keys):
            raise InvalidEntry("snapshot page repeats a thumbprint of an earlier page")

    def _pack_attributes(self, values: object, where: str) -> tuple[int, int, int]:
        """(bundle code, group code, status bits) of one ATTRIBUTE_FIELDS combination."""
        if type(values) is not list or len(values) != len(ATTRIBUTE_FIELDS):
            raise InvalidEntry(f"{where}: expected [{', '.join(ATTRIBUTE_FIELDS)}]")
        raw: dict[object, object] = dict(zip(ATTRIBUTE_FIELDS, values, strict=True))
        group_id, bundle_id, status = _parse_attributes(raw, where)
        return self._bundles.code(bundle_id), self._groups.code(group_id), status

    # Packed form, for persistence: records are RECORD_FORMAT structs keyed by the
    # thumbprint as an int; group and bundle codes index the name lists (1-based).

    def packed_names(self) -> tuple[list[str | None], list[str | None]]:
        """(group names, bundle names), in code order starting at code 1."""
        return self._groups._values[1:], self._bundles._values[1:]

    def packed_records(self) -> Iterator[tuple[int, bytes]]:
        return iter(self._records.items())

    @classmethod
    def from_packed(
        cls,
        seq: int,
        groups: list[str],
        bundles: list[str],
        records: dict[int, bytes],
        policy: PolicyUpdate | None = None,
    ) -> DeviceTable:
        """Rebuild a table from its packed form (trusted input: the node's own files)."""
        table = cls(seq, policy)
        for interner, names in ((table._groups, groups), (table._bundles, bundles)):
            for index, name in enumerate(names, start=1):
                if interner.code(name) != index:
                    raise InvalidEntry(f"duplicate name {name!r} in packed table")
        table._records = records
        return table

    @property
    def seq(self) -> int:
        """The last feed seq reflected in the table (0: nothing applied yet)."""
        return self._seq

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, thumbprint: object) -> bool:
        key = _key_or_none(thumbprint)
        return key is not None and key in self._records

    def lookup(self, thumbprint: str) -> Entry | None:
        """The entry for ``thumbprint``, or None when the table does not know it."""
        key = _key_or_none(thumbprint)
        if key is None:
            raise ValueError(f"not a canonical thumbprint: {thumbprint!r}")
        record = self._records.get(key)
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
        # Validation is complete: nothing below can raise, so the batch applies whole.
        for key, upsert in ops:
            if upsert is None:
                self._records.pop(key, None)
            else:
                self._records[key] = self._pack(upsert)
        if policies:
            self.policy = policies[-1]
        self._seq = to_seq
        touched = tuple(sorted({_hex(key) for key, _ in ops}))
        return Changes(
            from_seq,
            to_seq,
            len(upserts),
            len(ops) - len(upserts),
            touched,
            policies[-1] if policies else None,
        )

    def to_snapshot(self) -> Iterator[dict[str, object]]:
        """Every entry as a feed ``upsert`` object, for persistence and ``from_snapshot``.

        Lazy: finish iterating (or take a ``list``) before the next ``apply_batch``.
        """
        for key, record in self._records.items():
            yield self._unpack(_hex(key), record).encode()

    def thumbprints(self) -> Iterator[str]:
        """Every thumbprint the table holds (lazy, like ``to_snapshot``)."""
        return (_hex(key) for key in self._records)

    def _check_sequence(self, from_seq: int, to_seq: int) -> None:
        seqs = {"table_seq": self._seq, "from_seq": from_seq, "to_seq": to_seq}
        if type(from_seq) is not int or type(to_seq) is not int or not 1 <= from_seq <= to_seq:
            raise SequenceError(f"malformed batch range {from_seq!r}..{to_seq!r}", **seqs)
        if to_seq <= self._seq:
            raise SequenceReplay(f"batch {from_seq}..{to_seq} already applied", **seqs)
        if from_seq != self._seq + 1:
            raise SequenceGap(f"batch starts at {from_seq}, table is at {self._seq}", **seqs)

    def _pack(self, upsert: _Upsert) -> bytes:
        uid, not_after, group_id, bundle_id, status = upsert
        return _RECORD.pack(
            uid, not_after, self._bundles.code(bundle_id), self._groups.code(group_id), status
        )

    def _unpack(self, thumbprint: str, record: bytes) -> Entry:
        return unpack_entry(thumbprint, record, self._groups._values, self._bundles._values)

    def packed_record(self, key: int) -> bytes | None:
        """The packed record of the thumbprint ``key`` (an int), for the shared table."""
        return self._records.get(key)


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
    key = int(op.thumbprint, 16)
    if isinstance(op, Delete):
        return key, None
    status = _ENROLLMENT_CODE[op.enrollment_status.value]
    status |= _COMPLIANCE_CODE[op.compliance_status.value] << 2
    if op.blocked:
        status |= _BLOCKED_BIT
    return key, (bytes.fromhex(op.device_uid), op.not_after, op.group_id, op.app_bundle_id, status)


def _hex(key: int) -> str:
    return f"{key:064x}"


def _key_or_none(thumbprint: object) -> int | None:
    # Validate before int(): int() would also accept "0x", "_" separators and whitespace.
    if isinstance(thumbprint, str) and _canonical(thumbprint) is not None:
        return int(thumbprint, 16)
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
