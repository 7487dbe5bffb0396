"""Fill a console's database with a synthetic fleet, straight through SQLAlchemy core.

Enrolling a million devices through the API would take hours (scrypt, one signature per
certificate), so rows are written directly. They are shaped like the console's own: a
``devices`` row per device (enrolled, compliant) and one ``certificates`` row per device
(alternately a Per-App Tunnel device certificate and a Proxy-mode app certificate), with
well-formed uids, serials, subjects and thumbprints (SHA-256 hex of a per-row seed, so
they are unique but belong to no real key), the validity of a fresh certificate, and the
PEM text of a real device certificate of the same instance (so row sizes are real). The
console's snapshot query returns them exactly as it returns enrolled devices.

``feed_flips`` appends feed events the way ``services.feed.emit`` does (one per change,
``groups.feed_seq`` bumped), for measuring how fast tunnels apply changes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Column, Table, create_engine, event, insert, select, update
from sqlalchemy.engine import Connection, Engine

from certgate.console.services.ca import DEVICE_ROOT
from certgate.console.store.models import Base, Group

_TABLES = Base.metadata.tables
CHUNK = 20_000
PLATFORMS = ("android", "ios", "windows", "macos", "linux")
APPS = tuple(f"com.example.fleet{i}" for i in range(50))
CERT_VALIDITY = timedelta(days=365)


def thumbprint(i: int) -> str:
    """The thumbprint of the fleet's ``i``-th certificate (unique, well-formed, keyless)."""
    return hashlib.sha256(b"bench-cert:%d" % i).hexdigest()


@dataclass(frozen=True)
class Fleet:
    group_id: str
    count: int
    template_pem: str  # a real device certificate PEM of this instance
    issued_at: datetime  # one issuance time for the whole fleet, feed entries included

    def device_uid(self, i: int) -> str:
        return hashlib.md5(b"bench-device:%d" % i, usedforsecurity=False).hexdigest()

    def thumbprint(self, i: int) -> str:
        return thumbprint(i)

    def serial(self, i: int) -> str:
        # 159 random-looking bits, hex without leading zeros (as format(serial, "x")).
        digest = hashlib.sha1(b"bench-serial:%d" % i, usedforsecurity=False).digest()
        return format(int.from_bytes(digest, "big") >> 1, "x")

    def bundle(self, i: int) -> str | None:
        return None if i % 2 == 0 else APPS[i % len(APPS)]


def engine_for(db_path: str, *, offline: bool) -> Engine:
    """An engine on the console's SQLite file. ``offline`` (the console is stopped): no
    journal and no fsync for the bulk load; the console turns WAL back on when it opens the
    file (``store.db``). Otherwise the console's own WAL mode and a busy timeout apply."""
    engine = create_engine(f"sqlite:///{db_path}", connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi: Any, _record: Any) -> None:
        cursor = dbapi.cursor()
        for pragma in ("journal_mode=OFF", "synchronous=OFF") if offline else ():
            cursor.execute(f"PRAGMA {pragma}")
        cursor.execute("PRAGMA cache_size=-1000000")
        cursor.close()

    return engine


def insert_fleet(db_path: str, fleet: Fleet) -> dict[str, float]:
    """Insert ``fleet.count`` devices and certificates; return timings.

    Rows for the next chunk are built on a worker thread while SQLite writes the current
    one (``sqlite3`` releases the GIL while it steps), so the load uses both cores.
    """
    engine = engine_for(db_path, offline=True)
    started = time.perf_counter()
    try:
        with engine.begin() as conn, ThreadPoolExecutor(1) as builder:
            devices, certs = _Rows(conn, _TABLES["devices"]), _Rows(conn, _TABLES["certificates"])
            times = _Times.of(conn, fleet)
            chunks = [(a, min(fleet.count, a + CHUNK)) for a in range(0, fleet.count, CHUNK)]
            pending = builder.submit(_chunk_rows, fleet, times, *chunks[0])
            for index in range(len(chunks)):
                device_rows, cert_rows = pending.result()
                if index + 1 < len(chunks):
                    pending = builder.submit(_chunk_rows, fleet, times, *chunks[index + 1])
                devices.insert(device_rows)
                certs.insert(cert_rows)
    finally:
        engine.dispose()
    seconds = time.perf_counter() - started
    return {"insert_s": round(seconds, 2), "rows_per_s": round(2 * fleet.count / seconds)}


def _chunk_rows(
    fleet: Fleet, times: _Times, first: int, end: int
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    devices = [_device(fleet, i, times) for i in range(first, end)]
    certs = [_certificate(fleet, i, times) for i in range(first, end)]
    return devices, certs


class _Rows:
    """Executemany of plain tuples through SQLAlchemy core's connection.

    The statement is compiled once by SQLAlchemy for the table, and the row functions
    below give values in the table's column order, already in the form the column types
    bind them (``_Times``): a per-value type round trip would otherwise take most of the
    load time.
    """

    def __init__(self, conn: Connection, table: Table) -> None:
        self.conn = conn
        self.sql = str(insert(table).compile(dialect=conn.dialect))
        expected = DEVICE_COLUMNS if table.name == "devices" else CERT_COLUMNS
        if table.name != "feed_events" and tuple(c.name for c in table.columns) != expected:
            raise RuntimeError(f"the console's {table.name} columns changed; update fleet_db")

    def insert(self, rows: list[tuple[Any, ...]]) -> None:
        self.conn.exec_driver_sql(self.sql, rows)


@dataclass(frozen=True)
class _Times:
    """The fleet's timestamps, already in their bound (stored) form."""

    issued: Any
    not_before: Any
    not_after: Any

    @classmethod
    def of(cls, conn: Connection, fleet: Fleet) -> _Times:
        bind = _processor(conn, _TABLES["devices"].c.enrolled_at)
        at = fleet.issued_at
        return cls(bind(at), bind(at - timedelta(minutes=5)), bind(at + CERT_VALIDITY))


def _processor(conn: Connection, column: Column[Any]) -> Callable[[Any], Any]:
    """How ``column``'s type binds a value on this dialect (what an ORM insert stores)."""
    process = column.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
    return process if process is not None else (lambda value: value)


DEVICE_COLUMNS = (
    "uid",
    "group_id",
    "platform",
    "owner",
    "name",
    "enrollment_status",
    "compliance_status",
    "blocked",
    "credential_hash",
    "enrolled_at",
    "updated_at",
    "profile_version",
)


def _device(fleet: Fleet, i: int, times: _Times) -> tuple[Any, ...]:
    return (
        fleet.device_uid(i),
        fleet.group_id,
        PLATFORMS[i % len(PLATFORMS)],
        f"fleet-user-{i % 10_000}",
        f"device {i}",
        "enrolled",
        "compliant",
        False,
        hashlib.sha256(b"bench-credential:%d" % i).hexdigest(),  # credential hash
        times.issued,
        times.issued,
        1 if fleet.bundle(i) is None else 0,  # profile version: device certs come by profile
    )


CERT_COLUMNS = (
    "serial",
    "thumbprint",
    "kind",
    "issuer_label",
    "group_id",
    "device_uid",
    "bundle_id",
    "admin_id",
    "subject",
    "not_before",
    "not_after",
    "issued_at",
    "cert_pem",
    "revoked_at",
    "revocation_reason",
)


def _certificate(fleet: Fleet, i: int, times: _Times) -> tuple[Any, ...]:
    uid, bundle = fleet.device_uid(i), fleet.bundle(i)
    common_name = f"device {uid}" if bundle is None else bundle
    return (
        fleet.serial(i),
        fleet.thumbprint(i),
        "device" if bundle is None else "app",
        DEVICE_ROOT,
        fleet.group_id,
        uid,
        bundle,
        None,
        f"CN={common_name},O=certgate",
        times.not_before,
        times.not_after,
        times.issued,
        fleet.template_pem,
        None,
        None,
    )


def feed_flips(db_path: str, fleet: Fleet, changes: int) -> int:
    """Append ``changes`` feed events (each cert noncompliant, then compliant again, so the
    feed ends where the devices table is); return the group's new feed seq. The console
    may be running: this is one more writer, as a second console node would be."""
    engine = engine_for(db_path, offline=False)
    try:
        with engine.begin() as conn:
            seq = conn.execute(
                select(Group.feed_seq).where(Group.id == fleet.group_id)
            ).scalar_one()
            events = _Rows(conn, _TABLES["feed_events"])
            as_json = _processor(conn, _TABLES["feed_events"].c.entry)
            created = _Times.of(conn, fleet).issued
            for first in range(0, changes, CHUNK):
                events.insert(
                    [
                        (None, fleet.group_id, seq + k + 1, as_json(_flip(fleet, k)), created)
                        for k in range(first, min(changes, first + CHUNK))
                    ]
                )
            seq += changes
            conn.execute(update(Group).where(Group.id == fleet.group_id).values(feed_seq=seq))
    finally:
        engine.dispose()
    return int(seq)


def _flip(fleet: Fleet, k: int) -> dict[str, Any]:
    """Change ``k``: even ones make a cert noncompliant, the next one makes it compliant."""
    status = "noncompliant" if k % 2 == 0 else "compliant"
    not_after = int((fleet.issued_at + CERT_VALIDITY).timestamp())
    return _feed_entry(fleet, (k // 2) % fleet.count, status, not_after)


def _feed_entry(fleet: Fleet, i: int, status: str, not_after: int) -> dict[str, Any]:
    return {
        "op": "upsert",
        "thumbprint": fleet.thumbprint(i),
        "device_uid": fleet.device_uid(i),
        "group_id": fleet.group_id,
        "app_bundle_id": fleet.bundle(i),
        "enrollment_status": "enrolled",
        "compliance_status": status,
        "blocked": False,
        "not_after": not_after,
    }
