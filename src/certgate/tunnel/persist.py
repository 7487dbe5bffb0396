"""The tunnel's device table on disk: a compact snapshot plus an append-only journal.

A tunnel that restarts while the console is down must still admit the devices it knew
(issue 3, "Device list sync"), so every verified change is made durable before the next
one is fetched:

* ``table.snapshot``: the whole table at one feed seq, in a compact binary format (below),
  replaced atomically (tmp + fsync + rename + directory fsync).
* ``table.journal``: one line per applied batch after the snapshot,
  ``<crc32 hex> <json {"from_seq", "to_seq", "entries"}>\\n``, fsynced per batch. After a
  crash the last line may be torn; a line without its newline or with a bad CRC ends the
  journal, and the file is cut back to the last good line before anything is appended.
* ``sync.json``: when the last successful exchange with the console happened, so that the
  staleness budget survives a restart.

The files live in the tunnel's state directory (mode 0700), so they are trusted as much as
the identity key beside them: they are checked for damage (SHA-256 trailer, CRC per line),
not re-verified against the console's signature.

Snapshot format (all integers little-endian)::

    header   "<8sQQIII": magic b"CGTABLE2", seq, record count, len(groups), len(bundles),
             len(policy)
    groups   JSON array of group ids, bundles: JSON array of bundle ids
    policy   the group policy at seq as a feed ``policy`` operation (JSON), or ``null``
    records  count x 63 bytes: thumbprint (32 bytes, big-endian) + packed table record (31)
    trailer  SHA-256 of everything above

A ``CGTABLE1`` file (written before policies were feed content) has no policy length nor
policy and still loads; the trust config's policy then applies until the feed sends one.
Journal lines carry the batch's contract version (``"version"``, absent for version 1).

Loading 1,000,000 entries must take seconds, and ``DeviceTable.from_snapshot`` validates
each entry (about 8 us each), so the snapshot stores the table's own packed records and
``_PackedTable`` moves them in and out without re-parsing. That adapter is the only code
that knows the table's internal layout; it checks the layout version first and, if
``table.py`` changed, refuses the file (the follower then fetches a fresh snapshot).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from certgate import feed
from certgate.errors import CertgateError
from certgate.feed import FeedError, InvalidEntry, PolicyUpdate
from certgate.pki.identity import BUNDLE_ID_RE, GROUP_ID_RE
from certgate.tunnel import table as table_module
from certgate.tunnel.table import DeviceTable, SequenceReplay, SlotHome

__all__ = [
    "DEFAULT_COMPACT_AFTER_BYTES",
    "JOURNAL_FILE",
    "SNAPSHOT_FILE",
    "SYNC_FILE",
    "LoadedTable",
    "PersistError",
    "StoreInfo",
    "TableStore",
    "atomic_write",
    "atomic_write_parts",
]

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "table.snapshot"
JOURNAL_FILE = "table.journal"
SYNC_FILE = "sync.json"
DEFAULT_COMPACT_AFTER_BYTES = 16 * 1024 * 1024

_MAGIC_V1 = b"CGTABLE1"
_MAGIC = b"CGTABLE2"
_HEADER_V1 = struct.Struct("<8sQQII")
_HEADER = struct.Struct("<8sQQIII")
_KEY_BYTES = 32
_TABLE_RECORD_FORMAT = "<16sqIHB"  # table.py's packed record, as this file format knows it
_RECORD_BYTES = _KEY_BYTES + struct.calcsize(_TABLE_RECORD_FORMAT)
_ENTRY = struct.Struct(f"{_KEY_BYTES}s{_RECORD_BYTES - _KEY_BYTES}s")  # key, packed record
_DIGEST_BYTES = 32
_RECORDS_PER_PART = 16_384  # about 1 MB
_MAX_NAMES_BYTES = 64 * 1024 * 1024


class PersistError(CertgateError):
    """A persisted table file is damaged or in an unknown format."""


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file whole.

    Write a temporary file in the same directory, fsync it, rename it over ``path`` (atomic
    on POSIX), then fsync the directory so the rename itself is durable.
    """
    atomic_write_parts(path, [data], mode)


def atomic_write_parts(path: Path, parts: Iterable[bytes | bytearray], mode: int = 0o600) -> None:
    """``atomic_write`` of the concatenation of ``parts``, written as they come."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            for part in parts:
                handle.write(part)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # O_CREAT honours the umask; the mode must be exact
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _PackedTable:
    """Adapter from this file format to ``DeviceTable``'s packed form."""

    @staticmethod
    def check_layout() -> None:
        if table_module.RECORD_FORMAT != _TABLE_RECORD_FORMAT:
            raise PersistError("the table's record layout changed; snapshot format is stale")

    @staticmethod
    def names(table: DeviceTable) -> tuple[list[str | None], list[str | None]]:
        return table.packed_names()

    @staticmethod
    def records(table: DeviceTable) -> Iterator[tuple[bytes, bytes]]:
        return table.packed_records()

    @staticmethod
    def build(
        seq: int,
        names: tuple[list[str], list[str]],
        records: bytes,
        policy: PolicyUpdate | None,
        home: SlotHome | None,
    ) -> DeviceTable:
        groups, bundles = names
        try:
            return DeviceTable.from_packed(seq, groups, bundles, records, policy, home=home)
        except InvalidEntry as exc:
            raise PersistError(str(exc)) from exc


def encode_snapshot(table: DeviceTable) -> bytes:
    """The snapshot file's bytes for ``table`` (see the module docstring)."""
    return b"".join(snapshot_parts(table))


def snapshot_parts(table: DeviceTable) -> Iterator[bytes | bytearray]:
    """The snapshot file of ``table`` in parts of about 1 MB, its SHA-256 trailer last.

    Written part by part: joining a ``bytes`` per record, then the parts, held 1,000,000
    small objects and three 63 MB copies at once (220 MB over the table, and heap the
    node kept afterwards)."""
    _PackedTable.check_layout()
    groups, bundles = _PackedTable.names(table)
    policy = None if table.policy is None else table.policy.encode()
    names = [json.dumps(n, separators=(",", ":")).encode() for n in (groups, bundles, policy)]
    head = _HEADER.pack(_MAGIC, table.seq, len(table), *map(len, names))
    digest = hashlib.sha256()
    for part in itertools.chain([head, *names], _record_parts(table)):
        digest.update(part)
        yield part
    yield digest.digest()


def _record_parts(table: DeviceTable) -> Iterator[bytes | bytearray]:
    records, pack = _PackedTable.records(table), _ENTRY.pack_into
    while chunk := list(itertools.islice(records, _RECORDS_PER_PART)):
        part = bytearray(len(chunk) * _RECORD_BYTES)
        for at, (key, record) in zip(range(0, len(part), _RECORD_BYTES), chunk, strict=True):
            pack(part, at, key, record)
        yield part


def decode_snapshot(data: bytes, home: SlotHome | None = None) -> DeviceTable:
    """Parse a snapshot file into a table whose slots live in ``home``; raise
    ``PersistError`` if it is damaged or foreign."""
    _PackedTable.check_layout()
    body, digest = data[:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
    if len(data) < _HEADER.size + _DIGEST_BYTES or hashlib.sha256(body).digest() != digest:
        raise PersistError("snapshot file is truncated or damaged (checksum mismatch)")
    magic = body[:8]
    if magic == _MAGIC:
        _, seq, count, group_len, bundle_len, policy_len = _HEADER.unpack_from(body)
        at = _HEADER.size
    elif magic == _MAGIC_V1:
        _, seq, count, group_len, bundle_len = _HEADER_V1.unpack_from(body)
        at, policy_len = _HEADER_V1.size, 0
    else:
        raise PersistError(f"not a certgate table snapshot (magic {magic!r})")
    start = at + group_len + bundle_len + policy_len
    if len(body) != start + count * _RECORD_BYTES:
        raise PersistError("snapshot file length does not match its header")
    groups = _names(body[at : at + group_len], GROUP_ID_RE)
    bundles = _names(body[at + group_len : at + group_len + bundle_len], BUNDLE_ID_RE)
    policy = _policy(body[at + group_len + bundle_len : start]) if policy_len else None
    records = body[start : start + count * _RECORD_BYTES]
    return _PackedTable.build(seq, (groups, bundles), records, policy, home)


def _policy(blob: bytes) -> PolicyUpdate | None:
    try:
        raw = json.loads(blob)
        decoded = None if raw is None else feed.decode_op(raw, "policy", feed.FEED_VERSION)
    except (ValueError, FeedError) as exc:
        raise PersistError(f"snapshot policy is malformed: {exc}") from exc
    if decoded is not None and not isinstance(decoded, PolicyUpdate):
        raise PersistError("snapshot policy is not a policy operation")
    return decoded


def _names(blob: bytes, pattern: re.Pattern[str]) -> list[str]:
    try:
        names = json.loads(blob)
    except ValueError as exc:
        raise PersistError("snapshot name table is not JSON") from exc
    if not isinstance(names, list) or not all(
        isinstance(n, str) and pattern.fullmatch(n) for n in names
    ):
        raise PersistError("snapshot name table is malformed")
    return names


def encode_journal_line(
    from_seq: int, to_seq: int, entries: Sequence[object], version: int = feed.MIN_FEED_VERSION
) -> bytes:
    batch: dict[str, object] = {"from_seq": from_seq, "to_seq": to_seq, "entries": list(entries)}
    if version != feed.MIN_FEED_VERSION:
        batch["version"] = version
    body = json.dumps(batch, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode_journal_line(line: bytes) -> tuple[int, int, list[object], int]:
    """One complete journal line (newline included); raise ``PersistError`` if damaged."""
    crc, _, body = line.rstrip(b"\n").partition(b" ")
    if not line.endswith(b"\n") or len(crc) != 8 or f"{zlib.crc32(body):08x}".encode() != crc:
        raise PersistError("journal line is torn or damaged")
    try:
        batch = json.loads(body)
    except ValueError as exc:
        raise PersistError("journal line is not JSON") from exc
    if not isinstance(batch, dict):
        raise PersistError("journal line is not a JSON object")
    from_seq, to_seq, entries = batch.get("from_seq"), batch.get("to_seq"), batch.get("entries")
    if type(from_seq) is not int or type(to_seq) is not int or not isinstance(entries, list):
        raise PersistError("journal line is not a batch")
    try:
        version = feed.message_version(batch)
    except FeedError as exc:
        raise PersistError(f"journal line: {exc}") from exc
    return from_seq, to_seq, entries, version


@dataclass(frozen=True, slots=True)
class LoadedTable:
    """What ``TableStore.load`` recovered."""

    table: DeviceTable
    snapshot_seq: int
    batches_replayed: int
    journal_bytes: int
    torn_tail: bool


@dataclass(frozen=True, slots=True)
class StoreInfo:
    """A cheap summary for ``certgate tunnel status`` (reads headers, not the records)."""

    snapshot_seq: int | None
    snapshot_entries: int | None
    journal_batches: int
    journal_bytes: int
    last_exchange_at: float | None


class TableStore:
    """Snapshot + journal + sync time of one state directory. Blocking I/O: the follower
    calls it from a worker thread, one call at a time.

    ``read_only``: for a reader beside the running node (``certgate tunnel status``), which
    must not cut a journal line the node may be writing at that moment."""

    def __init__(
        self,
        directory: Path,
        *,
        compact_after_bytes: int = DEFAULT_COMPACT_AFTER_BYTES,
        read_only: bool = False,
    ) -> None:
        self.directory = directory
        self.compact_after_bytes = compact_after_bytes
        self.read_only = read_only
        self._journal_bytes = 0

    @property
    def snapshot_path(self) -> Path:
        return self.directory / SNAPSHOT_FILE

    @property
    def journal_path(self) -> Path:
        return self.directory / JOURNAL_FILE

    @property
    def sync_path(self) -> Path:
        return self.directory / SYNC_FILE

    @property
    def journal_bytes(self) -> int:
        return self._journal_bytes

    def _check_writable(self) -> None:
        if self.read_only:
            raise PersistError(f"{self.directory} is open read-only")

    def needs_compaction(self) -> bool:
        return self._journal_bytes > self.compact_after_bytes

    def load(self, home: SlotHome | None = None) -> LoadedTable | None:
        """The persisted table (its slots in ``home``), or None when there is none. Raises
        ``PersistError`` when the snapshot is damaged (the caller starts over from a
        console snapshot)."""
        try:
            data = self.snapshot_path.read_bytes()
        except FileNotFoundError:
            return None
        table = decode_snapshot(data, home)
        del data  # the file's bytes go before the journal is read
        snapshot_seq = table.seq
        replayed, good_bytes, torn = self._replay_journal(table)
        self._journal_bytes = good_bytes
        return LoadedTable(table, snapshot_seq, replayed, good_bytes, torn)

    def _replay_journal(self, table: DeviceTable) -> tuple[int, int, bool]:
        """Apply journal lines in order; stop at the first one that cannot be applied and
        cut the file there, so that the next append starts on a clean line."""
        try:
            data = self.journal_path.read_bytes()
        except FileNotFoundError:
            return 0, 0, False
        replayed, offset = 0, 0
        while offset < len(data):
            end = data.find(b"\n", offset)
            line = data[offset:] if end < 0 else data[offset : end + 1]
            if not self._replay_line(table, line, offset, is_last=end < 0 or end + 1 == len(data)):
                break
            replayed, offset = replayed + 1, offset + len(line)
        torn = offset < len(data)
        if torn and not self.read_only:
            os.truncate(self.journal_path, offset)
            _fsync_file(self.journal_path)
        return replayed, offset, torn

    def _replay_line(self, table: DeviceTable, line: bytes, offset: int, *, is_last: bool) -> bool:
        try:
            table.apply_batch(*_decode_journal_line(line))
        except SequenceReplay:
            return True  # a crash between snapshot rename and journal reset: already in
        except (PersistError, FeedError) as exc:
            level = logging.INFO if is_last else logging.WARNING
            where = "last line" if is_last else f"byte {offset}"
            log.log(level, "journal %s: %s at %s; ignoring the rest", self.journal_path, exc, where)
            return False
        return True

    def write_snapshot(self, table: DeviceTable) -> None:
        """Persist ``table`` whole and start an empty journal after it."""
        self._check_writable()
        atomic_write_parts(self.snapshot_path, snapshot_parts(table))
        atomic_write(self.journal_path, b"")
        self._journal_bytes = 0

    def append_batch(
        self,
        from_seq: int,
        to_seq: int,
        entries: Sequence[object],
        version: int = feed.MIN_FEED_VERSION,
    ) -> None:
        """Append one applied batch and fsync it (the batch is durable on return)."""
        self._check_writable()
        line = encode_journal_line(from_seq, to_seq, entries, version)
        created = not self.journal_path.exists()
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_directory(self.directory)
        self._journal_bytes += len(line)

    def save_exchange_time(self, at: float) -> None:
        self._check_writable()
        atomic_write(self.sync_path, json.dumps({"last_exchange_at": at}).encode())

    def load_exchange_time(self) -> float | None:
        try:
            value = json.loads(self.sync_path.read_bytes()).get("last_exchange_at")
        except (FileNotFoundError, ValueError, AttributeError):
            return None
        return float(value) if isinstance(value, int | float) else None

    def describe(self) -> StoreInfo:
        seq = entries = None
        try:
            with self.snapshot_path.open("rb") as handle:
                magic, seq, entries, _, _ = _HEADER_V1.unpack(handle.read(_HEADER_V1.size))
            if magic not in (_MAGIC, _MAGIC_V1):
                seq = entries = None
        except (FileNotFoundError, struct.error):
            pass
        try:
            journal = self.journal_path.read_bytes()
        except FileNotFoundError:
            journal = b""
        return StoreInfo(
            seq, entries, journal.count(b"\n"), len(journal), self.load_exchange_time()
        )


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
