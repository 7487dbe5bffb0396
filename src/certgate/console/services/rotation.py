"""Rotation without downtime: one model for everything the system presents or trusts.

prepare: the new key and certificate exist and are distributed; old and new are both
trusted. switch: the new one is used for new work. finish: the old one is no longer
trusted and its certificate is revoked. ``next_phase`` is the one state machine (its
``_TRANSITIONS`` table; anything else raises); ``status`` says who still depends on the
old one, and ``finish`` refuses while anyone does, unless forced (audited by the caller).

Group tunnel identity (``tunnel-identity``): prepare issues the next identity and
publishes it in the group's feed as a ``trust`` operation (``certgate.feed.TrustUpdate``,
feed version 3): the certificate, its key sealed to the group's current tunnel identity
(``pki.keywrap``; only the group's nodes can open it) and a trust config naming it, all
signed, as every feed batch, by the group's console identity. Nodes check and hold it.
Switch makes it the group's current identity and publishes the step; nodes swap their
TLS context live (devices trust the chain, not the leaf). Until finish the console
accepts both identities from nodes (``tunnels.accepted_tunnel_serials``); finish revokes
the old one. A change of the group's tunnel names is such a rotation, prepared and
switched at once (``names_changed``), never an instant swap.

Group console identity (``console-identity``): prepare issues the next one and announces
it in a trust operation of a batch the current one signs, with a trust config the new
one signs; nodes then accept both signers. Switch makes it the signer, but the feed up
to the switch step stays signed by the old one (``tunnels.signed_batch``), so a node
always learns the new identity from a message it can verify; nodes pin the new one when
they apply the switch, and stop accepting the old one at finish.

Device Root (``device-root``), one per instance (the rotation row has no group; any
group's API path reaches it, for a top-level superadmin): prepare creates the next Device
Root under the Root (``ca.new_ca_version``, its key in the PKCS#11 token when the
instance uses one) and publishes to every group a trust operation whose trust config
lists both Device Roots: nodes rebuild the data plane's client-CA set and swap it live.
Switch makes the new one issue (the console reloads its PKI; the old one is "retiring",
still trusted); devices get new-root certificates at their next renewal, or at once after
``renew_devices`` (their agents see a newer profile version and fetch one). ``status``
counts the active certificates of the old root per kind (the device population still
presenting it); finish waits for none to be left (or ``force``), revokes those left,
retires the old root (nodes stop trusting it) and its CRL stays published at
``/pki/crl/<label>.crl``.

Secure Channel Root (``secure-channel-root``), one per instance like the Device Root, and
in the same model: prepare creates the next one under the Root and every group's trust
config lists both (nodes accept identities of either). No cross certificate is needed:
everyone anchors on the Root, which issues the new one (the old one, pathLen 0, could not
sign it). Switch makes it current and renews every group identity onto it through the
identity rotations above (``_renew_identities``: prepared and switched at once, their
steps in the feed after this one's), and the console TLS certificate is issued again
(``ConsoleState._console_tls``). Every chain is served with the CA that signed its leaf
(``ca.InstancePKI.chain_of``), so old and new leaves verify during the overlap. Finish
finishes those identity rotations (each with its own checks), then waits for every node
to report the new root and the console TLS certificate to be the new one's, revokes
what the old root issued, and retires it (nodes stop trusting it).

Root (``root``), one per instance, in the same model (docs/CONVENTIONS.md "Root"):
prepare creates a new Root with cross certificates both ways and issues every
intermediate again under it with the same subject and key (``ca.new_root_version``), so
every leaf verifies under either Root; every group's trust config lists both Roots and
the cross certificates (a node takes a Root it does not pin only when a Root it pins
vouches for it). Chains are served with the cross certificate of their Root
(``ca.InstancePKI.chain_of``), so a party trusting either Root verifies. Switch makes the
new Root and its intermediates current (new work chains to it; nothing is revoked: the
keys are the same). Finish waits for every node to report the new Root, retires the old
Root, its intermediates and ``root-back``, and tells every group (nodes trust the new Root
alone); ``root-cross`` (the old Root vouching for the new one) stays offered in chains and
trust configs, so a node down for the whole rotation catches up by itself. No other
instance CA rotation runs meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from cryptography import x509
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from certgate import jws
from certgate.console.services import audit, ca, feed, tunnels
from certgate.console.services.feed import CLIENT_KINDS
from certgate.console.services.groups import console_key_label, get_group, tunnel_key_label
from certgate.console.store.models import (
    CACert,
    Certificate,
    Device,
    Group,
    GroupIdentity,
    Instance,
    Rotation,
    SealedKey,
    TunnelNode,
)
from certgate.errors import BadRequest, Conflict, NotFound
from certgate.feed import (
    FEED_VERSION,
    RotationPhase,
    TrustUpdate,
    trust_kinds_of,
    tunnel_key_context,
)
from certgate.pki import identity, keywrap
from certgate.pki.authority import Names
from certgate.pki.keys import check_public_key, generate_key
from certgate.pki.profiles import CONSOLE_IDENTITY, RENEWAL_WINDOW, TUNNEL_IDENTITY, Profile
from certgate.pki.thumbprint import thumbprint

__all__ = [
    "DEFAULT_OVERLAP",
    "KINDS",
    "Phase",
    "finish",
    "names_changed",
    "next_phase",
    "prepare",
    "renew_devices",
    "renew_due",
    "status",
    "switch",
    "trust_in_use",
]

TUNNEL = tunnels.TUNNEL_IDENTITY_ROTATION
CONSOLE = tunnels.CONSOLE_IDENTITY_ROTATION
DEVICE = "device-root"
SECURE_CHANNEL = "secure-channel-root"
ROOT = "root"
KINDS = (TUNNEL, CONSOLE, DEVICE, SECURE_CHANNEL, ROOT)
IMPLEMENTED = KINDS
INSTANCE_KINDS = (DEVICE, SECURE_CHANNEL, ROOT)  # one per instance: the row has no group
# The instance CA each instance-wide kind rotates (a new version of it).
CA_ROLES = {DEVICE: ca.DEVICE_ROOT, SECURE_CHANNEL: ca.SECURE_CHANNEL_ROOT, ROOT: ca.ROOT}
# What a node's report lists as trusted, per CA kind (``tunnel.sync`` status).
_REPORTED = {DEVICE: "device_roots", SECURE_CHANNEL: "secure_channel_roots", ROOT: "roots"}
DEFAULT_OVERLAP = timedelta(hours=1)
MAX_OVERLAP = timedelta(days=400)
RENEWAL = "renewal"  # started_by of the rotations renew_due starts
# A node whose last call is older than this is reported as unseen (it may be down).
SEEN_WITHIN = timedelta(minutes=5)


class Phase(Enum):
    PREPARED = "prepared"
    SWITCHED = "switched"
    FINISHED = "finished"


_TRANSITIONS: dict[tuple[Phase | None, RotationPhase], Phase] = {
    (None, RotationPhase.PREPARE): Phase.PREPARED,
    (Phase.PREPARED, RotationPhase.SWITCH): Phase.SWITCHED,
    (Phase.SWITCHED, RotationPhase.FINISH): Phase.FINISHED,
}


def next_phase(current: Phase | None, step: RotationPhase) -> Phase:
    """The phase after ``step`` from ``current``; Conflict for an illegal step."""
    try:
        return _TRANSITIONS[(current, step)]
    except KeyError:
        where = "no rotation running" if current is None else f"the rotation is {current.value}"
        raise Conflict(f"cannot {step.value}: {where}") from None


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise BadRequest(f"unknown rotation kind {kind!r}; one of {', '.join(KINDS)}")


def _running(session: Session, group_id: str, kind: str) -> Rotation | None:
    scope = Rotation.group_id.is_(None) if kind in INSTANCE_KINDS else Rotation.group_id == group_id
    return session.execute(
        select(Rotation).where(scope, Rotation.kind == kind, Rotation.finished_at.is_(None))
    ).scalar_one_or_none()


def _require_running(session: Session, group_id: str, kind: str) -> Rotation:
    _check_kind(kind)
    get_group(session, group_id)
    rotation = _running(session, group_id, kind)
    if rotation is None:
        where = "" if kind in INSTANCE_KINDS else f" in group {group_id!r}"
        raise NotFound(f"no {kind} rotation is running{where}")
    return rotation


def _next_key_label(rotation: Rotation) -> str:
    return tunnels.rotation_key_label(rotation.id, "next")


def _previous_key_label(rotation: Rotation) -> str:
    return tunnels.rotation_key_label(rotation.id, "previous")


@dataclass(frozen=True, slots=True)
class _Kind:
    """What differs between the identities a group rotates."""

    profile: Profile
    names: Callable[[Group], Names]
    current_label: Callable[[str], str]
    serial: str  # the GroupIdentity column


def _console_names(group: Group) -> Names:
    return Names(f"console {group.id}"[:64], identity.console(group.id))


def _cert(session: Session, serial: str) -> x509.Certificate:
    row = session.get(Certificate, serial)
    assert row is not None  # FK-enforced
    return x509.load_pem_x509_certificate(row.cert_pem.encode())


# The steps


def prepare(
    session: Session,
    pki: ca.InstancePKI,
    group_id: str,
    kind: str,
    started_by: str,
    overlap: timedelta = DEFAULT_OVERLAP,
) -> Rotation:
    """Start a rotation: issue the new one and publish it to the group's nodes."""
    _check_kind(kind)
    pki.refresh(session, 0)  # a step another process made (the CLI) is seen here
    if not timedelta(0) <= overlap <= MAX_OVERLAP:
        raise BadRequest(f"overlap must be 0 to {MAX_OVERLAP.days} days")
    group = get_group(session, group_id)
    if _running(session, group_id, kind) is not None:
        where = "" if kind in INSTANCE_KINDS else f" in group {group_id!r}"
        raise Conflict(f"a {kind} rotation is already running{where}; finish it")
    next_phase(None, RotationPhase.PREPARE)
    if kind in CA_ROLES:
        return _prepare_ca(session, pki, kind, started_by, overlap)
    pair = session.get(GroupIdentity, group_id)
    if pair is None:
        raise NotFound(f"group {group_id!r} has no identity pair")
    what = _KINDS[kind]
    key = generate_key()  # P-256: console identities sign ES256
    _, row = pki.issue(
        session,
        ca.SECURE_CHANNEL_ROOT,
        what.profile,
        what.names(group),
        key.public_key(),
        ca.Record(kind=kind, group_id=group_id),
    )
    rotation = Rotation(
        group_id=group_id,
        kind=kind,
        phase=Phase.PREPARED.value,
        old_serial=getattr(pair, what.serial),
        new_serial=row.serial,
        overlap_s=int(overlap.total_seconds()),
        started_by=started_by[:200],
        prepared_at=ca.now(),
        forced=False,
    )
    session.add(rotation)
    session.flush()  # the id names the sealed key and the feed operation
    ca.seal_key(session, pki.master, _next_key_label(rotation), key)
    rotation.prepare_seq = _publish(session, pki, rotation, RotationPhase.PREPARE)
    return rotation


def switch(session: Session, pki: ca.InstancePKI, group_id: str, kind: str) -> Rotation:
    """Use the new one for new work: the group's current identity from now on. A console
    identity's old key is kept until finish: the feed up to this step stays signed by it
    (``tunnels.signed_batch``)."""
    rotation = _require_running(session, group_id, kind)
    pki.refresh(session, 0)
    rotation.phase = next_phase(Phase(rotation.phase), RotationPhase.SWITCH).value
    rotation.switched_at = ca.now()
    if kind in CA_ROLES:
        return _switch_ca(session, pki, rotation)
    pair = session.get(GroupIdentity, group_id)
    assert pair is not None  # prepare checked it
    what = _KINDS[kind]
    current = what.current_label(group_id)
    if kind == CONSOLE:
        ca.seal_key(
            session, pki.master, _previous_key_label(rotation), pki.unseal(session, current)
        )
    setattr(pair, what.serial, rotation.new_serial)
    ca.seal_key(session, pki.master, current, pki.unseal(session, _next_key_label(rotation)))
    rotation.switch_seq = _publish(session, pki, rotation, RotationPhase.SWITCH)
    return rotation


def finish(
    session: Session,
    pki: ca.InstancePKI,
    group_id: str,
    kind: str,
    *,
    force: bool = False,
) -> Rotation:
    """Stop trusting the old one and revoke it. Refused while a node still depends on it
    or the overlap has not passed since the switch, unless ``force``."""
    rotation = _require_running(session, group_id, kind)
    pki.refresh(session, 0)
    phase = next_phase(Phase(rotation.phase), RotationPhase.FINISH)
    if kind == SECURE_CHANNEL:  # the group identities it renewed first (their own checks)
        _finish_children(session, pki, rotation, force)
    if not force:
        blockers = _blockers(session, rotation)
        if blockers:
            what = _WHAT.get(kind, "identity")
            raise Conflict(
                f"the old {what} is still needed: " + "; ".join(blockers) + " (or --force)"
            )
    rotation.phase, rotation.finished_at, rotation.forced = phase.value, ca.now(), force
    ca.revoke(session, rotation.old_serial, "superseded")
    if rotation.kind == DEVICE:
        _retire_device_root(session, pki, rotation)
        return rotation
    if rotation.kind == SECURE_CHANNEL:
        _retire_secure_channel_root(session, pki, rotation)
        return rotation
    if rotation.kind == ROOT:
        _retire_root(session, pki, rotation)
        return rotation
    _publish(session, pki, rotation, RotationPhase.FINISH)
    for label in (_next_key_label(rotation), _previous_key_label(rotation)):
        sealed = session.get(SealedKey, label)
        if sealed is not None:  # the new key lives on as the group's current one
            session.delete(sealed)
    return rotation


def names_changed(session: Session, pki: ca.InstancePKI, group: Group, started_by: str) -> Rotation:
    """The group's tunnel names changed: a tunnel-identity rotation, prepared and switched
    at once (new connections need the new names); the old identity stays accepted until
    an admin finishes the rotation."""
    if _running(session, group.id, TUNNEL) is not None:
        raise Conflict(
            f"a tunnel-identity rotation is running in group {group.id!r}:"
            " finish it before changing the tunnel names"
        )
    prepare(session, pki, group.id, TUNNEL, started_by)
    return switch(session, pki, group.id, TUNNEL)


def renew_audited(session: Session, pki: ca.InstancePKI, actor: str) -> list[dict[str, Any]]:
    """``renew_due``, each rotation it moved audited as ``rotation.renew.<phase>`` by
    ``actor``; answers them as ``describe`` shows them (the local command's and the API's)."""
    rotations = renew_due(session, pki)
    for done in rotations:
        audit.append(
            session,
            actor,
            f"rotation.renew.{done.phase}",
            group_id=done.group_id,
            kind=done.kind,
            rotation=done.id,
        )
    return [describe(session, r) for r in rotations]


def renew_due(session: Session, pki: ca.InstancePKI, now: datetime | None = None) -> list[Rotation]:
    """Renewal before expiry: every group identity within ``RENEWAL_WINDOW`` of its end,
    and not already rotating, is rotated (prepared and switched at once; an admin, or a
    later call once the overlap has passed and nothing depends on it, finishes it).
    Rotations this started whose finish is no longer blocked are finished."""
    now = now or ca.now()
    rotations = []
    for pair in session.execute(select(GroupIdentity).order_by(GroupIdentity.group_id)).scalars():
        for kind, what in _KINDS.items():
            current = session.get(Certificate, getattr(pair, what.serial))
            assert current is not None  # FK-enforced
            if current.not_after - now > RENEWAL_WINDOW:
                continue
            if _running(session, pair.group_id, kind) is None:
                prepare(session, pki, pair.group_id, kind, RENEWAL)
                rotations.append(switch(session, pki, pair.group_id, kind))
    for running in session.execute(
        select(Rotation).where(Rotation.started_by == RENEWAL, Rotation.finished_at.is_(None))
    ).scalars():
        if running.switched_at is not None and not _blockers(session, running):
            assert running.group_id is not None
            rotations.append(finish(session, pki, running.group_id, running.kind))
    return rotations


def _tunnel_names(group: Group) -> Names:
    conf = group.settings["tunnel"]
    return Names(
        f"tunnel {group.id}"[:64],
        identity.tunnel(group.id),
        dns_names=tuple(conf["hostnames"]),
        ip_addresses=tuple(conf["ip_addresses"]),
    )


_KINDS = {
    TUNNEL: _Kind(TUNNEL_IDENTITY, _tunnel_names, tunnel_key_label, "tunnel_serial"),
    CONSOLE: _Kind(CONSOLE_IDENTITY, _console_names, console_key_label, "console_serial"),
}


def _current_label(rotation: Rotation) -> str:
    assert rotation.group_id is not None  # identities are per group
    return _KINDS[rotation.kind].current_label(rotation.group_id)


def _publish(
    session: Session,
    pki: ca.InstancePKI,
    rotation: Rotation,
    step: RotationPhase,
) -> int:
    """Emit the step as a trust operation in the group's feed; returns its seq."""
    assert rotation.group_id is not None  # group identities are per group
    op = _identity_op(session, pki, rotation, step)
    return feed.emit(session, rotation.group_id, [op.encode()])


def _identity_op(
    session: Session, pki: ca.InstancePKI, rotation: Rotation, step: RotationPhase
) -> TrustUpdate:
    """A group identity rotation's ``step`` as a trust operation (its key sealed to the old
    tunnel identity, its trust config signed as the step is)."""
    group_id = rotation.group_id
    assert group_id is not None  # group identities are per group
    instance = session.get(Instance, 1)
    assert instance is not None  # an initialised console
    console_url = instance.public_url
    old, new = _cert(session, rotation.old_serial), _cert(session, rotation.new_serial)
    key = pki.unseal(
        session,
        _next_key_label(rotation) if step is not RotationPhase.FINISH else _current_label(rotation),
    )
    if rotation.kind == TUNNEL:
        payload = tunnels.trust_payload(session, pki, group_id, console_url, tunnel_cert=new)
        trust = tunnels.sign_for_group(
            session, pki, group_id, payload, jws.TYP_TRUST, tunnels.TRUST_TTL_S
        )
        context = tunnel_key_context(group_id, thumbprint(new))
        sealed: dict[str, str] | None = keywrap.seal_key(
            key, check_public_key(old.public_key()), context
        )
    else:  # the new console identity signs the trust config that names it
        payload = tunnels.trust_payload(session, pki, group_id, console_url, console_cert=new)
        trust = tunnels.sign_for_group(
            session, pki, group_id, payload, jws.TYP_TRUST, tunnels.TRUST_TTL_S, (new, key)
        )
        sealed = None
    return TrustUpdate(rotation.kind, step, rotation.id, ca.pem(new), sealed, trust)


# Status


@dataclass(frozen=True, slots=True)
class NodeStatus:
    name: str
    last_seen_at: str
    seen_recently: bool
    has_new: bool  # the node's table is past the prepare step (from its reports)
    presents: str  # "old", "new" or "unknown" (the identity of its last call)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "last_seen_at": self.last_seen_at,
            "seen_recently": self.seen_recently,
            "has_new": self.has_new,
            "presents": self.presents,
        }


def _past(report_seq: object, seq: int | None) -> bool:
    """The node's reported table is at or past ``seq`` (it has read that step)."""
    return isinstance(report_seq, int) and seq is not None and report_seq >= seq


def _node_status(node: TunnelNode, rotation: Rotation, old: str, new: str) -> NodeStatus:
    report_seq = ((node.report or {}).get("status") or {}).get("table_seq")
    if rotation.kind == CONSOLE:  # what the node pins, from how far it has read the feed
        has_new = _past(report_seq, rotation.prepare_seq)
        presents = "new" if _past(report_seq, rotation.switch_seq) else "old"
        presents = "unknown" if report_seq is None else presents
    else:  # the identity of its last call
        has_new = _past(report_seq, rotation.prepare_seq) or node.identity_thumbprint == new
        presents = {old: "old", new: "new"}.get(node.identity_thumbprint or "", "unknown")
    return NodeStatus(
        node.name,
        node.last_seen_at.isoformat(timespec="seconds"),
        ca.now() - node.last_seen_at <= SEEN_WITHIN,
        has_new,
        presents,
    )


def _nodes(session: Session, rotation: Rotation, scope: str | None = None) -> list[NodeStatus]:
    old = session.get(Certificate, rotation.old_serial)
    new = session.get(Certificate, rotation.new_serial)
    assert old is not None and new is not None  # FK-enforced
    if rotation.kind in CA_ROLES:  # every node of the instance, or of the group ``scope``
        query = select(TunnelNode).order_by(TunnelNode.group_id, TunnelNode.name)
        if scope is not None:
            query = query.where(TunnelNode.group_id == scope)
        rows = session.execute(query).scalars()
        key = _REPORTED[rotation.kind]
        return [_ca_node(n, key, old.thumbprint, new.thumbprint) for n in rows]
    rows = session.execute(
        select(TunnelNode).where(TunnelNode.group_id == rotation.group_id).order_by(TunnelNode.name)
    ).scalars()
    return [_node_status(n, rotation, old.thumbprint, new.thumbprint) for n in rows]


def _blockers(session: Session, rotation: Rotation, scope: str | None = None) -> list[str]:
    """Who or what still depends on the old one (empty: finish may proceed); ``scope``: of
    one group only (an instance-wide rotation shown to that group's admins)."""
    if rotation.kind == DEVICE:
        blockers = _device_root_blockers(session, rotation, scope)
    elif rotation.kind == ROOT:
        blockers = _root_blockers(session, rotation, scope)
    elif rotation.kind == SECURE_CHANNEL:
        blockers = _secure_channel_blockers(session, rotation, scope)
    else:
        depends = "presents" if rotation.kind == TUNNEL else "pins"
        blockers = [
            f"node {n.name} still {depends} the old identity (last seen {n.last_seen_at})"
            for n in _nodes(session, rotation)
            if n.presents != "new"
        ]
    if rotation.switched_at is not None:
        ends = rotation.switched_at + timedelta(seconds=rotation.overlap_s)
        if ca.now() < ends:
            blockers.append(f"the overlap runs until {ends.isoformat(timespec='seconds')}")
    return blockers


def describe(session: Session, rotation: Rotation, scope: str | None = None) -> dict[str, Any]:
    """A rotation as the API and CLI show it, with its nodes and what blocks finish
    (``scope``: an instance-wide rotation as one group sees it, its own nodes and
    devices only)."""
    old = session.get(Certificate, rotation.old_serial)
    new = session.get(Certificate, rotation.new_serial)
    assert old is not None and new is not None  # FK-enforced
    running = rotation.finished_at is None
    return {
        "id": rotation.id,
        "group_id": rotation.group_id,
        "kind": rotation.kind,
        "phase": rotation.phase,
        "old": {"serial": old.serial, "thumbprint": old.thumbprint},
        "new": {"serial": new.serial, "thumbprint": new.thumbprint},
        "overlap_s": rotation.overlap_s,
        "started_by": rotation.started_by,
        "prepared_at": _iso(rotation.prepared_at),
        "switched_at": _iso(rotation.switched_at),
        "finished_at": _iso(rotation.finished_at),
        "forced": rotation.forced,
        "nodes": [n.to_dict() for n in _nodes(session, rotation, scope)] if running else [],
        "devices": (
            _old_root_population(session, rotation, scope) if rotation.kind == DEVICE else {}
        ),
        "dependents": (
            _secure_channel_dependents(session, rotation, scope)
            if rotation.kind == SECURE_CHANNEL
            else {}
        ),
        "blockers": _blockers(session, rotation, scope) if running else [],
    }


def _iso(value: Any) -> str | None:
    return None if value is None else str(value.isoformat(timespec="seconds"))


def status(session: Session, group_id: str, limit: int = 20) -> list[dict[str, Any]]:
    """The group's rotations, newest first: running ones with their nodes and blockers."""
    get_group(session, group_id)
    rows = session.execute(
        select(Rotation)
        .where((Rotation.group_id == group_id) | Rotation.group_id.is_(None))
        .order_by(Rotation.id.desc())
        .limit(limit)
    ).scalars()
    return [describe(session, r, group_id) for r in rows]


# Instance CAs: Device Root and Secure Channel Root (one per instance each)

_WHAT = {DEVICE: "Device Root", SECURE_CHANNEL: "Secure Channel Root", ROOT: "Root"}


def _prepare_ca(
    session: Session, pki: ca.InstancePKI, kind: str, started_by: str, overlap: timedelta
) -> Rotation:
    """A new version of the instance CA of ``kind`` under the Root, trusted by every node
    from this step on beside the current one (``_publish_ca``)."""
    role = CA_ROLES[kind]
    _check_no_other_ca_rotation(session, kind)
    old = session.execute(
        select(Certificate).where(
            Certificate.kind == f"ca:{role}",
            Certificate.thumbprint == thumbprint(pki.certs[role]),
        )
    ).scalar_one()
    rotation = Rotation(
        group_id=None,
        kind=kind,
        phase=Phase.PREPARED.value,
        old_serial=old.serial,
        new_serial=old.serial,  # the new root's, once issued (it is labelled by this id)
        overlap_s=int(overlap.total_seconds()),
        started_by=started_by[:200],
        prepared_at=ca.now(),
        forced=False,
    )
    session.add(rotation)
    session.flush()
    if kind == ROOT:
        ca.new_root_version(session, pki, rotation.id)
    else:
        ca.new_ca_version(session, pki, role, rotation.id)
    new_cert = pki.others[ca.version_label(role, rotation.id)][1]
    rotation.new_serial = format(new_cert.serial_number, "x")
    rotation.prepare_seq = _publish_ca(session, pki, rotation, RotationPhase.PREPARE)
    return rotation


def _switch_ca(session: Session, pki: ca.InstancePKI, rotation: Rotation) -> Rotation:
    """The new CA issues from now on; the old one is retiring (still trusted). A new
    Secure Channel Root renews every group identity onto it (``_renew_identities``)."""
    role = CA_ROLES[rotation.kind]
    if rotation.kind == SECURE_CHANNEL:
        _check_no_identity_rotation(session)
    roles = (ca.ROOT, *ca.INTERMEDIATES) if rotation.kind == ROOT else (role,)
    changes = {pki.label(r): ca.RETIRING for r in roles}
    changes |= {ca.version_label(r, rotation.id): ca.CURRENT for r in roles}
    ca.set_ca_status(session, pki, changes)
    rotation.switch_seq = _publish_ca(session, pki, rotation, RotationPhase.SWITCH)
    if rotation.kind == SECURE_CHANNEL:
        _renew_identities(session, pki, rotation)
    return rotation


def _retiring_label(pki: ca.InstancePKI, role: str = ca.DEVICE_ROOT) -> str:
    return next(
        label
        for label, (state, _, _) in pki.others.items()
        if ca.role_of(label) == role and state == ca.RETIRING
    )


def _retire_device_root(session: Session, pki: ca.InstancePKI, rotation: Rotation) -> None:
    """Revoke what the old root issued that is still active (tunnels drop it through the
    feed), stop trusting it, and tell every group's nodes."""
    old_label = _retiring_label(pki)
    deletes: dict[str, list[dict[str, Any]]] = {}
    for cert in _old_root_certificates(session, old_label):
        ca.revoke(session, cert.serial, "superseded")
        assert cert.group_id is not None  # client certificates belong to a group
        deletes.setdefault(cert.group_id, []).append(feed.delete_entry(cert))
    for group_id, entries in sorted(deletes.items()):
        feed.emit(session, group_id, entries)
    ca.set_ca_status(session, pki, {old_label: ca.RETIRED})
    _publish_ca(session, pki, rotation, RotationPhase.FINISH)


def _publish_ca(
    session: Session, pki: ca.InstancePKI, rotation: Rotation, step: RotationPhase
) -> int:
    """The step to every group's nodes: a trust config listing the Device Roots and the
    Secure Channel Roots to trust now (``pki.trusted``), signed by the group's console
    identity; returns the last seq emitted."""
    seq = 0
    for group_id in session.execute(
        select(GroupIdentity.group_id).order_by(GroupIdentity.group_id)
    ).scalars():
        op = _ca_op(session, pki, rotation, step, group_id)
        seq = feed.emit(session, group_id, [op.encode()])
    return seq


def _ca_op(
    session: Session, pki: ca.InstancePKI, rotation: Rotation, step: RotationPhase, group_id: str
) -> TrustUpdate:
    """A Device Root or Secure Channel Root rotation's ``step`` for one group: the trust
    config lists the roots of both kinds to trust now."""
    instance = session.get(Instance, 1)
    assert instance is not None  # an initialised console
    payload = tunnels.trust_payload(session, pki, group_id, instance.public_url)
    trust = tunnels.sign_for_group(
        session, pki, group_id, payload, jws.TYP_TRUST, tunnels.TRUST_TTL_S
    )
    new_root = ca.pem(_cert(session, rotation.new_serial))
    return TrustUpdate(rotation.kind, step, rotation.id, new_root, None, trust)


def _old_root_certificates(
    session: Session, label: str, scope: str | None = None
) -> list[Certificate]:
    query = select(Certificate).where(
        Certificate.issuer_label == label,
        Certificate.kind.in_(CLIENT_KINDS),
        Certificate.revoked_at.is_(None),
        Certificate.not_after > ca.now(),
    )
    if scope is not None:
        query = query.where(Certificate.group_id == scope)
    return list(session.execute(query).scalars())


def _old_label(session: Session, rotation: Rotation) -> str:
    """The label of the rotation's old root: the CA row holding its certificate."""
    old = _cert(session, rotation.old_serial)
    for row in session.execute(select(CACert)).scalars():
        if x509.load_pem_x509_certificate(row.cert_pem.encode()) == old:
            return row.label
    raise NotFound(f"no CA row holds the old {_WHAT[rotation.kind]} {rotation.old_serial}")


def _old_root_population(
    session: Session, rotation: Rotation, scope: str | None = None
) -> dict[str, Any]:
    """The device population still holding active certificates of the old root, by kind."""
    certs = _old_root_certificates(session, _old_label(session, rotation), scope)
    by_kind: dict[str, int] = {}
    for cert in certs:
        by_kind[cert.kind] = by_kind.get(cert.kind, 0) + 1
    devices = sorted({c.device_uid for c in certs if c.device_uid})
    return {
        "old_root_certificates": by_kind,
        "devices": devices[:50],
        "device_count": len(devices),
        "live_tunnels": _live_tunnels_of(session, {c.thumbprint for c in certs}, scope),
    }


def _live_tunnels_of(session: Session, thumbprints: set[str], scope: str | None) -> int:
    """How many live tunnels the nodes last reported with one of these certificates."""
    query = select(TunnelNode)
    if scope is not None:
        query = query.where(TunnelNode.group_id == scope)
    live = 0
    for node in session.execute(query).scalars():
        tunnels = (node.report or {}).get("live") or []
        live += sum(1 for t in tunnels if t.get("thumbprint") in thumbprints)
    return live


def _device_root_blockers(
    session: Session, rotation: Rotation, scope: str | None = None
) -> list[str]:
    if rotation.finished_at is not None:
        return []
    population = _old_root_population(session, rotation, scope)
    blockers = [
        f"{count} active {kind} certificate(s) of the old Device Root"
        f" (devices: {', '.join(population['devices'][:5])})"
        for kind, count in sorted(population["old_root_certificates"].items())
    ]
    blockers += [
        f"node {n.name} does not trust the new Device Root yet (last seen {n.last_seen_at})"
        for n in _nodes(session, rotation, scope)
        if not n.has_new
    ]
    return blockers


def _ca_node(node: TunnelNode, key: str, old: str, new: str) -> NodeStatus:
    """A node has the new CA when its report lists it among those it trusts (``key``:
    its Device Roots or its Secure Channel Roots)."""
    trusted = ((node.report or {}).get("status") or {}).get(key) or []
    presents = "new" if new in trusted and old not in trusted else "old"
    return NodeStatus(
        node.name,
        node.last_seen_at.isoformat(timespec="seconds"),
        ca.now() - node.last_seen_at <= SEEN_WITHIN,
        new in trusted,
        presents if trusted else "unknown",
    )


def renew_devices(session: Session, pki: ca.InstancePKI, group_id: str) -> list[str]:
    """The admin forces renewal: every device whose device certificate is still from the
    old root is told a newer profile exists (its profile version goes up), so its agent
    fetches one, from the new root, at its next check and uses it live. App certificates
    need their app to authenticate again (the agent says so). Only once switched."""
    rotation = _require_running(session, group_id, DEVICE)
    if rotation.switched_at is None:
        raise Conflict("renew devices after the switch: until then the old root issues")
    certs = _old_root_certificates(session, _old_label(session, rotation))
    uids = sorted({c.device_uid for c in certs if c.kind == "device" and c.device_uid})
    if uids:
        session.execute(
            update(Device)
            .where(Device.uid.in_(uids))
            .values(profile_version=Device.profile_version + 1)
        )
    return uids


# What a node resynchronising from a snapshot needs (services/snapshots.py)

_STEP_OF = {
    Phase.PREPARED: RotationPhase.PREPARE,
    Phase.SWITCHED: RotationPhase.SWITCH,
    Phase.FINISHED: RotationPhase.FINISH,
}


def trust_in_use(
    session: Session, pki: ca.InstancePKI, group_id: str, version: int = FEED_VERSION
) -> list[TrustUpdate]:
    """The trust operations a node of the group needs to converge at the feed's seq, as
    snapshot pages carry them (feed version 4, docs/CONVENTIONS.md "Snapshot pages").

    In use, first: the step of the latest console-identity rotation that made the group's
    console identity current, the switch step of a running tunnel-identity rotation (its
    key sealed to the old identity, which the console still accepts), the latest step of
    the latest Device Root and Secure Channel Root rotations. They are built now, so
    their trust configs name the identities in use together (a node applies them
    together). Then the prepared next console and tunnel identities, as their prepare
    steps. Only the kinds a node of contract ``version`` reads (``trust_kinds_of``)."""
    ops = []
    console = _latest(session, group_id, CONSOLE, switched=True)
    if console is not None:
        ops.append(_identity_op(session, pki, console, _STEP_OF[Phase(console.phase)]))
    tunnel = _running(session, group_id, TUNNEL)
    if tunnel is not None and tunnel.switched_at is not None:
        ops.append(_identity_op(session, pki, tunnel, RotationPhase.SWITCH))
    for kind in (DEVICE, SECURE_CHANNEL, ROOT):
        root = _latest(session, None, kind)
        if root is not None and kind in trust_kinds_of(version):
            ops.append(_ca_op(session, pki, root, _STEP_OF[Phase(root.phase)], group_id))
    for kind in (CONSOLE, TUNNEL):
        prepared = _running(session, group_id, kind)
        if prepared is not None and prepared.switched_at is None:
            ops.append(_identity_op(session, pki, prepared, RotationPhase.PREPARE))
    return ops


def _latest(
    session: Session, group_id: str | None, kind: str, *, switched: bool = False
) -> Rotation | None:
    """The group's (None: the instance's) newest rotation of ``kind``, finished or not;
    ``switched``: the newest that reached its switch."""
    scope = Rotation.group_id.is_(None) if group_id is None else Rotation.group_id == group_id
    query = select(Rotation).where(scope, Rotation.kind == kind)
    if switched:
        query = query.where(Rotation.switched_at.is_not(None))
    return session.execute(query.order_by(Rotation.id.desc()).limit(1)).scalar_one_or_none()


# Secure Channel Root: what it issued is renewed onto the new one at switch


def _child_tag(rotation: Rotation) -> str:
    """``started_by`` of the group identity rotations a Secure Channel Root switch starts."""
    return f"{SECURE_CHANNEL} rotation {rotation.id}"


def _check_no_identity_rotation(session: Session) -> None:
    """The switch renews every group identity: none may be rotating already."""
    running = session.execute(
        select(Rotation).where(Rotation.kind.in_((TUNNEL, CONSOLE)), Rotation.finished_at.is_(None))
    ).scalars()
    busy = [f"{r.kind} rotation {r.id} of group {r.group_id}" for r in running]
    if busy:
        raise Conflict(
            "switch the Secure Channel Root once no group identity rotates: finish "
            + ", ".join(busy)
        )


def _renew_identities(session: Session, pki: ca.InstancePKI, rotation: Rotation) -> None:
    """Every group's tunnel and console identity, issued again by the new Secure Channel
    Root through their own rotations (prepared and switched at once, as at a change of
    tunnel names); this rotation's finish finishes them. The feed carries each group's
    steps after this one's switch step, so a node trusts the new root before it sees an
    identity it issued."""
    overlap = timedelta(seconds=rotation.overlap_s)
    for group_id in session.execute(
        select(GroupIdentity.group_id).order_by(GroupIdentity.group_id)
    ).scalars():
        for kind in (TUNNEL, CONSOLE):
            prepare(session, pki, group_id, kind, _child_tag(rotation), overlap)
            switch(session, pki, group_id, kind)


def _children(session: Session, rotation: Rotation) -> list[Rotation]:
    """The group identity rotations the switch started that still run."""
    return list(
        session.execute(
            select(Rotation)
            .where(Rotation.started_by == _child_tag(rotation), Rotation.finished_at.is_(None))
            .order_by(Rotation.id)
        ).scalars()
    )


def _finish_children(
    session: Session, pki: ca.InstancePKI, rotation: Rotation, force: bool
) -> None:
    for child in _children(session, rotation):
        assert child.group_id is not None  # identities are per group
        try:
            finish(session, pki, child.group_id, child.kind, force=force)
        except Conflict as exc:
            where = f"{child.kind} rotation {child.id} of group {child.group_id}"
            raise Conflict(f"{where}: {exc}") from exc


def _old_ca_certificates(
    session: Session, label: str, scope: str | None = None
) -> list[Certificate]:
    """The active certificates the CA of row ``label`` issued (of group ``scope``)."""
    query = select(Certificate).where(
        Certificate.issuer_label == label,
        Certificate.revoked_at.is_(None),
        Certificate.not_after > ca.now(),
    )
    if scope is not None:
        query = query.where(Certificate.group_id == scope)
    return list(session.execute(query).scalars())


def _console_tls_is_old(session: Session, label: str) -> bool:
    """The console TLS certificate in use (the newest active one) is from CA row ``label``."""
    newest = (
        session.execute(
            select(Certificate.issuer_label)
            .where(Certificate.kind == "console-tls", Certificate.revoked_at.is_(None))
            .order_by(Certificate.issued_at.desc())
        )
        .scalars()
        .first()
    )
    return newest == label


def _secure_channel_dependents(
    session: Session, rotation: Rotation, scope: str | None = None
) -> dict[str, Any]:
    """What still depends on the old Secure Channel Root: its active group identities by
    kind, and whether the console still presents a TLS certificate it issued."""
    label = _old_label(session, rotation)
    by_kind: dict[str, int] = {}
    for cert in _old_ca_certificates(session, label, scope):
        if cert.kind in (TUNNEL, CONSOLE):
            by_kind[cert.kind] = by_kind.get(cert.kind, 0) + 1
    return {
        "old_ca_certificates": by_kind,
        "console_tls_old": _console_tls_is_old(session, label),
        "identity_rotations": [
            {"id": c.id, "group_id": c.group_id, "kind": c.kind, "phase": c.phase}
            for c in _children(session, rotation)
            if scope is None or c.group_id == scope
        ],
    }


def _secure_channel_blockers(
    session: Session, rotation: Rotation, scope: str | None = None
) -> list[str]:
    if rotation.finished_at is not None:
        return []
    dependents = _secure_channel_dependents(session, rotation, scope)
    renewing = {c.old_serial for c in _children(session, rotation)}  # finish finishes these
    left: dict[str, int] = {}
    for cert in _old_ca_certificates(session, _old_label(session, rotation), scope):
        if cert.kind in (TUNNEL, CONSOLE) and cert.serial not in renewing:
            left[cert.kind] = left.get(cert.kind, 0) + 1
    blockers = [
        f"{count} active {kind} certificate(s) of the old Secure Channel Root"
        for kind, count in sorted(left.items())
    ]
    for child in _children(session, rotation):
        waits = _blockers(session, child) if scope in (None, child.group_id) else []
        if waits:
            where = f"{child.kind} rotation {child.id} of group {child.group_id}"
            blockers.append(f"{where}: {'; '.join(waits)}")
    if dependents["console_tls_old"]:
        blockers.append(
            "the console still presents a TLS certificate of the old Secure Channel Root"
            " (a running console presents the new one within seconds of the switch)"
        )
    blockers += [
        f"node {n.name} does not trust the new Secure Channel Root yet (last seen {n.last_seen_at})"
        for n in _nodes(session, rotation, scope)
        if not n.has_new
    ]
    return blockers


def _retire_secure_channel_root(session: Session, pki: ca.InstancePKI, rotation: Rotation) -> None:
    """Revoke what the old root issued that is still active (a superseded console TLS
    certificate; group identities when forced), stop trusting it, tell every group."""
    old_label = _retiring_label(pki, ca.SECURE_CHANNEL_ROOT)
    for cert in _old_ca_certificates(session, old_label):
        ca.revoke(session, cert.serial, "superseded")
    ca.set_ca_status(session, pki, {old_label: ca.RETIRED})
    _publish_ca(session, pki, rotation, RotationPhase.FINISH)


# Root: a new Root cross-signed both ways, the intermediates issued again under it


def _check_no_other_ca_rotation(session: Session, kind: str) -> None:
    """A Root rotation runs alone among the instance CA rotations: it issues every
    intermediate again, and a Device Root or Secure Channel Root rotation meanwhile would
    add a third CA of its role to trust (nodes take two)."""
    others = (DEVICE, SECURE_CHANNEL) if kind == ROOT else (ROOT,)
    running = session.execute(
        select(Rotation).where(Rotation.kind.in_(others), Rotation.finished_at.is_(None))
    ).scalars()
    busy = [f"{r.kind} rotation {r.id}" for r in running]
    if busy:
        raise Conflict(f"finish the {', '.join(busy)} before a {kind} rotation")


def _root_blockers(session: Session, rotation: Rotation, scope: str | None = None) -> list[str]:
    if rotation.finished_at is not None:
        return []
    return [
        f"node {n.name} does not trust the new Root yet (last seen {n.last_seen_at})"
        for n in _nodes(session, rotation, scope)
        if not n.has_new
    ]


def _retire_root(session: Session, pki: ca.InstancePKI, rotation: Rotation) -> None:
    """The old Root, the intermediates it issued, ``root-back`` and the cross certificate
    an earlier rotation offered are retired (their CA certificates revoked,
    ``superseded``): nodes trust the new Root alone. ``root-cross`` (the old Root vouching
    for the new one) is offered from now on (``ca.OFFERED``): chains end at it, so a party
    that pins the old Root alone (a node down for the whole rotation) still verifies and
    takes the new Root by ``pki.verify.vouched_roots``; nobody trusts the old Root through
    it. No leaf is revoked: each intermediate kept its key."""
    retired = [
        label
        for label, (status, _, _) in pki.others.items()
        if status == ca.OFFERED
        or (status == ca.RETIRING and ca.role_of(label) in (ca.ROOT, *ca.INTERMEDIATES))
    ]
    retired.append(ca.version_label(ca.ROOT_BACK, rotation.id))
    for label in retired:
        serial = format(pki.others[label][1].serial_number, "x")
        if session.get(Certificate, serial) is not None:
            ca.revoke(session, serial, "superseded")
    offered = {ca.version_label(ca.ROOT_CROSS, rotation.id): ca.OFFERED}
    ca.set_ca_status(session, pki, {**dict.fromkeys(retired, ca.RETIRED), **offered})
    _publish_ca(session, pki, rotation, RotationPhase.FINISH)
