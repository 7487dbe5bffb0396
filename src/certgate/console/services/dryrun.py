"""Dry-run: who would lose access if a change were made, decided as the tunnel nodes decide.

Exact by construction. The real service call (``groups.update_settings``,
``devices.set_compliance``, ...) runs inside a SAVEPOINT; the feed operations it writes are
captured as they are written (the ``feed_events`` INSERTs on this session's connection, so
a concurrent writer's events are never taken for its own), and the savepoint is rolled
back: nothing of the change stays, and no long-poll is woken for it. Then the node's own
code decides:

* the captured operations are applied, as a node applies a batch
  (``DeviceTable.apply_batch``), to a table holding the current entries of the
  certificates concerned and the group's current policy;
* a ``Gate`` over that table judges every certificate an upsert or delete touched, as a
  new connection (``devices``: those it would refuse), and every reported live tunnel
  the node would judge again (``live_tunnels``: those it would close): the tunnels of the
  touched certificates, or every tunnel of the group when a policy operation came
  (``TunnelService.on_change`` -> ``Registry.enforce``).

Freshness. A node applies a change only as the result of a successful exchange with the
console, and it records that exchange before the data plane judges anything
(``FeedFollower.accept_batch``), so the judgement is made with a fresh table: lowering
``max_staleness_s`` closes no tunnel at once (it makes an unreachable node fail closed
sooner, later). A node that is stale now has closed its tunnels already and reports none.

Reports. A node's latest report (``tunnel.report``) is used while it is at most
``STALE_REPORT_S`` old; older ones, and registered nodes that never reported, are listed
in ``stale_reports`` and their tunnels are not judged, so a missing picture is never
silent. A report cut to its bounds says so (``live`` < ``live_total``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from sqlalchemy import Connection, Insert, event, select
from sqlalchemy.orm import Session

from certgate.console.services import ca, feed
from certgate.console.services.groups import get_group
from certgate.console.store.models import Certificate, Device, FeedEvent, TunnelNode
from certgate.feed import FEED_VERSION, Delete, Entry, Op, PolicyUpdate, decode_op
from certgate.tunnel.admission import Mode, PeerIdentity, peer_identity
from certgate.tunnel.report import STALE_REPORT_S
from certgate.tunnel.rules import Transport
from certgate.tunnel.server import Gate, Route
from certgate.tunnel.table import DeviceTable

__all__ = ["ClosedTunnel", "DryRun", "NodeReport", "RefusedCert", "rehearse"]

# Per-App Tunnel mode attributes traffic to the app the request names, which enters the
# decision only by its syntax (``admission`` check 11): any valid name stands in for it.
ANY_APP = "dry-run.any-app"
_QUERY_CHUNK = 5000  # thumbprints per IN (...) list
_FEED_EVENTS = FeedEvent.__tablename__


@dataclass(frozen=True, slots=True)
class RefusedCert:
    """A certificate whose entry after the change a node would refuse."""

    device_uid: str
    thumbprint: str
    app: str | None
    reason: str  # a DenyReason value


@dataclass(frozen=True, slots=True)
class ClosedTunnel:
    """A reported live tunnel the node would close after the change."""

    node: str
    thumbprint: str
    device_uid: str
    app: str | None
    destination: str
    since: float | None
    reason: str  # a DenyReason value, or destination_denied
    detail: str


@dataclass(frozen=True, slots=True)
class NodeReport:
    """What a node's latest report says, and how old it is."""

    node: str
    reported_at: datetime | None
    age_s: float | None
    live: int  # tunnels in the report
    live_total: int  # tunnels the node had (more than ``live``: the report was cut)
    table_seq: int | None
    policy_version: int | None
    fresh: bool | None


@dataclass(frozen=True, slots=True)
class DryRun:
    devices: tuple[RefusedCert, ...]
    live_tunnels: tuple[ClosedTunnel, ...]
    nodes_reporting: tuple[NodeReport, ...]
    stale_reports: tuple[NodeReport, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": True, **asdict(self)}


def rehearse(
    session: Session,
    group_id: str,
    change: Callable[[Session], object],
    now: datetime | None = None,
) -> DryRun:
    """Run ``change`` and roll it back; say whom the nodes of the group would refuse."""
    emitted = capture(session, change)
    now = now or ca.now()
    groups = dict.fromkeys([group_id, *(row["group_id"] for row in emitted)])
    devices: list[RefusedCert] = []
    tunnels: list[ClosedTunnel] = []
    reporting: list[NodeReport] = []
    stale: list[NodeReport] = []
    for gid in groups:
        trusted, listed = _reports(session, gid, now)
        ops = [row["entry"] for row in emitted if row["group_id"] == gid]
        refused, closed = _judge(session, gid, ops, trusted, now.timestamp())
        devices += refused
        tunnels += closed
        reporting += (r for r in listed if r.node in trusted)
        stale += (r for r in listed if r.node not in trusted)
    return DryRun(tuple(devices), tuple(tunnels), tuple(reporting), tuple(stale))


def capture(session: Session, change: Callable[[Session], object]) -> list[dict[str, Any]]:
    """The feed event rows ``change`` writes, in order; the change itself is rolled back.

    Errors of ``change`` propagate (after the rollback), so a dry-run refuses what the
    real call refuses, with the same error."""
    rows: list[dict[str, Any]] = []

    def written(conn: Connection, clause: object, multi: Any, params: Any, *_: Any) -> None:
        # By name: an INSERT built from the ORM class targets an annotated copy of the table.
        if isinstance(clause, Insert) and getattr(clause.table, "name", None) == _FEED_EVENTS:
            rows.extend(multi or [params])

    notified = session.info.get(feed.FEED_GROUPS_KEY)
    conn = session.connection()
    event.listen(conn, "after_execute", written)
    try:
        savepoint = session.begin_nested()
        try:
            change(session)
            session.flush()
        finally:
            savepoint.rollback()
    finally:
        event.remove(conn, "after_execute", written)
        _restore_notified(session, notified)
        session.expire_all()  # Core updates (feed_seq) set committed values in memory
    return rows


def _restore_notified(session: Session, notified: set[str] | None) -> None:
    """Groups to wake on commit: as before the change (a rolled-back one wakes nobody)."""
    if notified is None:
        session.info.pop(feed.FEED_GROUPS_KEY, None)
    else:
        session.info[feed.FEED_GROUPS_KEY] = set(notified)


# Reports


def _reports(
    session: Session, group_id: str, now: datetime
) -> tuple[dict[str, list[dict[str, Any]]], list[NodeReport]]:
    """(live tunnels by node, of the reports young enough to trust), every node listed."""
    nodes = session.execute(
        select(TunnelNode).where(TunnelNode.group_id == group_id).order_by(TunnelNode.name)
    ).scalars()
    trusted: dict[str, list[dict[str, Any]]] = {}
    listed = []
    for node in nodes:
        report = _listing(node, now)
        listed.append(report)
        if node.report is not None and report.age_s is not None:
            if abs(report.age_s) <= STALE_REPORT_S:
                trusted[node.name] = list(node.report["live"])
    return trusted, listed


def _listing(node: TunnelNode, now: datetime) -> NodeReport:
    report = node.report or {}
    status = report.get("status", {})
    at = node.reported_at
    return NodeReport(
        node.name,
        at,
        None if at is None else round((now - at).total_seconds(), 3),
        len(report.get("live", ())),
        report.get("live_total", 0),
        status.get("table_seq"),
        status.get("policy_version"),
        status.get("fresh"),
    )


# Judgement


@dataclass(frozen=True, slots=True)
class _Cert:
    """A client certificate as admission sees it, and its entry in the nodes' tables now."""

    peer: PeerIdentity
    device_uid: str
    entry: Entry | None  # None: revoked, so no node holds it

    @property
    def app(self) -> str | None:
        return self.peer.identity.bundle_id

    @property
    def mode(self) -> Mode:
        return Mode.PER_APP if self.app is None else Mode.PROXY


@dataclass(frozen=True, slots=True)
class _AfterChange:
    """A node's ``TableSource`` once it has applied the change: fresh, since the change
    arrives only with a successful exchange (see the module docstring)."""

    table: DeviceTable

    @property
    def policy(self) -> PolicyUpdate:
        assert self.table.policy is not None  # made with the group's policy
        return self.table.policy

    def is_fresh(self, now: float | None = None) -> bool:
        return True


def _judge(
    session: Session,
    group_id: str,
    ops: list[dict[str, Any]],
    live: dict[str, list[dict[str, Any]]],
    now: float,
) -> tuple[list[RefusedCert], list[ClosedTunnel]]:
    # Trust operations (rotations) change what a node presents, never whom it admits.
    ops = [op for op in ops if op.get("op") != "trust"]
    decoded = [decode_op(op, f"feed[{i}]", FEED_VERSION) for i, op in enumerate(ops)]
    touched = sorted({op.thumbprint for op in decoded if isinstance(op, Entry | Delete)})
    judged = _judged_tunnels(live, decoded, set(touched))
    certs = _certificates(session, {*touched, *(t["thumbprint"] for _, t in judged)})
    table = _table_after(session, group_id, certs.values(), ops)
    gate = Gate(group_id, _AfterChange(table), clock=lambda: now)
    refused = [_refused(gate, certs[tp]) for tp in touched if tp in certs]
    closed = [
        _closed(gate, node, t, certs[t["thumbprint"]])
        for node, t in judged
        if t["thumbprint"] in certs
    ]
    return [r for r in refused if r is not None], [c for c in closed if c is not None]


def _judged_tunnels(
    live: dict[str, list[dict[str, Any]]], ops: list[Op], touched: set[str]
) -> list[tuple[str, dict[str, Any]]]:
    """The live tunnels a node judges again after ``ops``: all of them after a policy
    operation, else those of the certificates the operations touched."""
    every = any(isinstance(op, PolicyUpdate) for op in ops)
    return [
        (node, tunnel)
        for node, tunnels in live.items()
        for tunnel in tunnels
        if every or tunnel["thumbprint"] in touched
    ]


def _table_after(
    session: Session, group_id: str, certs: Iterable[_Cert], ops: list[dict[str, Any]]
) -> DeviceTable:
    """The group's table as a node holds it after applying ``ops`` (for these certs)."""
    table = DeviceTable(0, feed.policy_of(get_group(session, group_id)))
    table.extend(
        c.entry.encode() for c in certs if c.entry is not None and c.entry.group_id == group_id
    )
    if ops:
        table.apply_batch(1, len(ops), ops, FEED_VERSION)
    return table


def _certificates(session: Session, thumbprints: set[str]) -> dict[str, _Cert]:
    """The client certificates of ``thumbprints`` that the console issued."""
    found: dict[str, _Cert] = {}
    for chunk in _chunks(sorted(thumbprints), _QUERY_CHUNK):
        rows = session.execute(
            select(Certificate, Device)
            .join(Device, Device.uid == Certificate.device_uid)
            .where(Certificate.thumbprint.in_(chunk), Certificate.kind.in_(feed.CLIENT_KINDS))
        )
        for cert, device in rows:
            found[cert.thumbprint] = _cert(cert, device)
    return found


def _cert(cert: Certificate, device: Device) -> _Cert:
    peer = peer_identity(x509.load_pem_x509_certificate(cert.cert_pem.encode()))
    active = cert.revoked_at is None and cert.group_id == device.group_id
    return _Cert(peer, device.uid, feed.entry_of(cert, device) if active else None)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _refused(gate: Gate, cert: _Cert) -> RefusedCert | None:
    app = cert.app if cert.mode is Mode.PROXY else ANY_APP
    decision = gate.admit(cert.peer, cert.mode, app)
    if decision.admitted or decision.reason is None:
        return None
    return RefusedCert(cert.device_uid, cert.peer.thumbprint, cert.app, decision.reason.value)


def _closed(gate: Gate, node: str, tunnel: dict[str, Any], cert: _Cert) -> ClosedTunnel | None:
    route = _route(tunnel)
    denial = gate.judge(cert.peer, Mode(tunnel["mode"]), tunnel["app"], route)
    if denial is None:
        return None
    return ClosedTunnel(
        node,
        cert.peer.thumbprint,
        cert.device_uid,
        tunnel["app"] or cert.app,
        "-" if route is None else f"{route.host}:{route.port}",
        tunnel["since"],
        denial.reason,
        denial.detail,
    )


def _route(tunnel: dict[str, Any]) -> Route | None:
    """Where the tunnel goes, as the node evaluated it (None: not yet routed)."""
    if tunnel["host"] is None or tunnel["port"] is None:
        return None
    addresses = tuple(ipaddress.ip_address(a) for a in tunnel["addresses"])
    transport = Transport(tunnel.get("transport", Transport.TCP.value))
    return Route(tunnel["host"], tunnel["port"], addresses, transport)
