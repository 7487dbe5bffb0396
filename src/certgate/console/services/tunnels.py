"""Tunnel setup, trust configuration, installer bundles, node registry, signed feed.

Everything a tunnel trusts arrives as a JWS signed by its group's console identity; the
tunnel pins that certificate at setup (docs/CONVENTIONS.md, "Signed messages").
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session

from certgate import jws
from certgate.console.services import audit, ca, denials, feed, rbac
from certgate.console.services.devices import consume_token
from certgate.console.services.groups import (
    console_key_label,
    get_group,
    group_certificates,
    tunnel_key_label,
)
from certgate.console.services.secrets import IssuedSecret, new_secret
from certgate.console.store.models import (
    Admin,
    Certificate,
    GroupIdentity,
    OneTimeToken,
    Rotation,
    TunnelNode,
)
from certgate.errors import AuthError, BadRequest, ChainError, NotFound
from certgate.feed import MIN_FEED_VERSION
from certgate.pki import identity
from certgate.pki.keys import PrivateKey, private_key_pem
from certgate.pki.thumbprint import thumbprint
from certgate.pki.verify import verify_client_chain

INSTALL_TOKEN_PREFIX = "cgi"
TRUST_TTL_S = 365 * 24 * 3600
FEED_TTL_S = 3600
INSTALLER_FORMAT = "certgate-tunnel-installer/1"
NODE_NAME_MAX = 128
TUNNEL_IDENTITY_ROTATION = "tunnel-identity"
CONSOLE_IDENTITY_ROTATION = "console-identity"


def trust_payload(
    session: Session,
    pki: ca.InstancePKI,
    group_id: str,
    console_url: str,
    tunnel_cert: x509.Certificate | None = None,
    console_cert: x509.Certificate | None = None,
) -> dict[str, Any]:
    """The trust config of the group's nodes; ``tunnel_cert``, ``console_cert``: name this
    identity instead of the current one (a rotation's next identity)."""
    group = get_group(session, group_id)
    pki.refresh(session, 0)  # never list a Device Root another process retired
    current_console, current_tunnel = group_certificates(session, group_id)
    tunnel_cert, console_cert = tunnel_cert or current_tunnel, console_cert or current_console
    return {
        "group_id": group_id,
        "console_url": console_url,
        # Two during a Root rotation, the current one first; its cross certificates vouch
        # for the Root a node does not pin yet (tunnel.config._vouched_roots).
        "root": "".join(ca.pem(c) for c in pki.roots()),
        "root_cross": "".join(ca.pem(c) for c in pki.root_crosses()),
        # Two during a Secure Channel Root rotation, the current one first.
        "secure_channel_root": "".join(ca.pem(c) for c in pki.secure_channel_roots()),
        "device_root": "".join(ca.pem(c) for c in pki.device_roots()),  # rotation overlap
        "console_identity_thumbprint": thumbprint(console_cert),
        "tunnel_identity_thumbprint": thumbprint(tunnel_cert),
        "feed": {
            "snapshot_path": "/api/v1/tunnel/feed/snapshot",
            "feed_path": "/api/v1/tunnel/feed",
            **group.settings["feed"],
        },
        "tunnel": group.settings["tunnel"],
        "server_rules": group.settings["server_rules"],
        "device_rules": group.settings["device_rules"],
        "policy_version": group.policy_version,
    }


def sign_for_group(
    session: Session,
    pki: ca.InstancePKI,
    group_id: str,
    payload: dict[str, Any],
    typ: str,
    ttl_s: int,
    signer: tuple[x509.Certificate, PrivateKey] | None = None,
) -> str:
    """``payload`` signed by the group's console identity (or ``signer``, a rotation's
    other one)."""
    if signer is None:
        console_cert, _ = group_certificates(session, group_id)
        signer = console_cert, pki.unseal(session, console_key_label(group_id))
    console_cert, console_key = signer
    chain = [console_cert, pki.issuing_ca(console_cert)]
    return jws.sign({**payload, "group_id": group_id}, console_key, chain, typ, ttl_s)


def _register_node(session: Session, group_id: str, name: str, address: str) -> TunnelNode:
    if not 0 < len(name) <= NODE_NAME_MAX or not name.isprintable():
        raise BadRequest("node name must be 1-128 printable characters")
    node = session.execute(
        select(TunnelNode).where(TunnelNode.group_id == group_id, TunnelNode.name == name)
    ).scalar_one_or_none()
    if node is None:
        node = TunnelNode(
            group_id=group_id,
            name=name,
            address=address[:255],
            registered_at=ca.now(),
            last_seen_at=ca.now(),
        )
        session.add(node)
    node.address, node.last_seen_at = address[:255], ca.now()
    return node


def touch_node(session: Session, peer: TunnelPeer, name: str) -> None:
    """Record that a registered node called in, and the identity it presented (unknown
    names are ignored)."""
    node = session.execute(
        select(TunnelNode).where(
            TunnelNode.group_id == peer.group_id, TunnelNode.name == name[:NODE_NAME_MAX]
        )
    ).scalar_one_or_none()
    if node is not None:
        node.last_seen_at = ca.now()
        if node.identity_thumbprint != peer.thumbprint:
            node.identity_thumbprint = peer.thumbprint


def record_report(
    session: Session, group_id: str, name: str | None, report: dict[str, Any]
) -> TunnelNode:
    """Keep a node's report of its live tunnels (``tunnel.report``) for dry-runs. The node
    is the one the ``Certgate-Node`` header names, as for ``touch_node``; the report must
    name the same one, and the node must be registered."""
    if not name or report.get("node") != name:
        raise BadRequest("a report needs the Certgate-Node header, naming the node it reports")
    node = session.execute(
        select(TunnelNode).where(TunnelNode.group_id == group_id, TunnelNode.name == name)
    ).scalar_one_or_none()
    if node is None:
        raise NotFound(f"no tunnel node {name[:NODE_NAME_MAX]!r} in group {group_id!r}")
    previous = (node.report or {}).get("denials") or {}
    node.report, node.reported_at = report, ca.now()
    node.last_seen_at = node.reported_at
    denials.record(session, node, previous, report.get("denials") or {}, node.reported_at)
    return node


def setup_bundle(
    session: Session,
    pki: ca.InstancePKI,
    group_id: str,
    console_url: str,
    node_name: str,
    address: str,
) -> dict[str, Any]:
    """What a tunnel node receives: the group's pair (same for every node), chain, trust."""
    console_cert, tunnel_cert = group_certificates(session, group_id)
    tunnel_key = pki.unseal(session, tunnel_key_label(group_id))
    _register_node(session, group_id, node_name, address)
    trust = sign_for_group(
        session,
        pki,
        group_id,
        trust_payload(session, pki, group_id, console_url),
        jws.TYP_TRUST,
        TRUST_TTL_S,
    )
    return {
        "group_id": group_id,
        "console_identity": ca.pem(console_cert),
        "tunnel_identity": ca.pem(tunnel_cert),
        "tunnel_key": private_key_pem(tunnel_key).decode(),
        "chain": [ca.pem(c) for c in pki.chain_of(tunnel_cert)],
        "trust": trust,
    }


def create_install_token(
    session: Session, group_id: str, created_by: str, ttl: timedelta
) -> IssuedSecret:
    issued = new_secret(INSTALL_TOKEN_PREFIX)
    session.add(
        OneTimeToken(
            id=issued.id,
            purpose="install",
            group_id=group_id,
            secret_hash=issued.secret_hash,
            owner=None,
            created_by=created_by,
            created_at=ca.now(),
            expires_at=ca.now() + ttl,
            used_at=None,
        )
    )
    return issued


def redeem_install_token(
    session: Session,
    pki: ca.InstancePKI,
    token: str,
    console_url: str,
    node_name: str,
    address: str,
) -> dict[str, Any]:
    row = consume_token(session, token, INSTALL_TOKEN_PREFIX, "install")
    return setup_bundle(session, pki, row.group_id, console_url, node_name, address)


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def download_installer(
    session: Session,
    pki: ca.InstancePKI,
    admin: Admin,
    group_id: str,
    console_url: str,
    actor: str,
    ttl: timedelta,
    **audit_detail: Any,
) -> bytes:
    """An admin's download of the installer (API and web console alike): allowed with
    ``tunnel:setup`` on the group, packaged, and audited with its install token."""
    rbac.require(session, admin, rbac.Permission.TUNNEL_SETUP, group_id)
    data, token_id = installer(session, pki, group_id, console_url, actor, ttl)
    audit.append(
        session,
        actor,
        "tunnel.installer",
        group_id=group_id,
        install_token_id=token_id,
        **audit_detail,
    )
    return data


def installer(
    session: Session,
    pki: ca.InstancePKI,
    group_id: str,
    console_url: str,
    created_by: str,
    ttl: timedelta,
) -> tuple[bytes, str]:
    """A tar.gz packaged now: chain, console identity, signed trust, a one-time install
    token, and a signed manifest with every file's SHA-256. Returns (bytes, token id)."""
    console_cert, _ = group_certificates(session, group_id)
    token = create_install_token(session, group_id, created_by, ttl)
    files = {
        "chain.pem": "".join(ca.pem(c) for c in pki.chain_of(console_cert)).encode(),
        "root.pem": ca.pem(pki.certs[ca.ROOT]).encode(),
        "console-identity.pem": ca.pem(console_cert).encode(),
        "trust.jws": sign_for_group(
            session,
            pki,
            group_id,
            trust_payload(session, pki, group_id, console_url),
            jws.TYP_TRUST,
            TRUST_TTL_S,
        ).encode(),
        "install-token": token.token.encode(),
    }
    manifest = {
        "format": INSTALLER_FORMAT,
        "console_url": console_url,
        "install_token_id": token.id,
        "install_token_expires_in_s": int(ttl.total_seconds()),
        "files": {n: hashlib.sha256(d).hexdigest() for n, d in sorted(files.items())},
    }
    signed = sign_for_group(
        session, pki, group_id, manifest, jws.TYP_INSTALLER, int(ttl.total_seconds())
    )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        _add_file(tar, "manifest.jws", signed.encode())
        for name, data in sorted(files.items()):
            _add_file(tar, name, data, 0o600 if name == "install-token" else 0o644)
    return buffer.getvalue(), token.id


@dataclass(frozen=True, slots=True)
class TunnelPeer:
    """A tunnel node authenticated by its group's tunnel identity."""

    group_id: str
    thumbprint: str  # of the identity it presented (old or new during a rotation)


def accepted_tunnel_serials(session: Session, group_id: str) -> set[str]:
    """The tunnel identities the console accepts from the group's nodes: the current one,
    and while a tunnel-identity rotation runs (prepared or switched), its old and new."""
    pair = session.get(GroupIdentity, group_id)
    accepted = {pair.tunnel_serial} if pair else set()
    running = session.execute(
        select(Rotation.old_serial, Rotation.new_serial).where(
            Rotation.group_id == group_id,
            Rotation.kind == TUNNEL_IDENTITY_ROTATION,
            Rotation.finished_at.is_(None),
        )
    )
    for old, new in running:
        accepted |= {old, new}
    return accepted


def verify_identity_chain(pki: ca.InstancePKI, cert: x509.Certificate) -> None:
    """``cert`` chains to the Root through a Secure Channel Root trusted now (both during a
    rotation of it), which signed it directly: a group identity, never a device's."""
    scrs = pki.secure_channel_roots()
    chain = verify_client_chain(cert, scrs, pki.roots(), at=ca.now())
    if len(chain) < 2 or chain[1] not in scrs:
        raise AuthError("certificate is not issued by a Secure Channel Root")


def tunnel_group_of(session: Session, pki: ca.InstancePKI, peer_der: bytes | None) -> TunnelPeer:
    """Authenticate a tunnel by its identity cert: valid chain, and one the console accepts
    now (``accepted_tunnel_serials``)."""
    if peer_der is None:
        raise AuthError("tunnel identity certificate required (mTLS)")
    cert = x509.load_der_x509_certificate(peer_der)
    # The kind first, so that an admin or device cert gets a plain reason.
    ident = identity.identity_of(cert)
    if ident.kind is not identity.IdentityKind.TUNNEL or ident.group_id is None:
        raise AuthError(f"certificate is not a tunnel identity (it is {ident.kind.value})")
    presented = thumbprint(cert)
    row = session.execute(
        select(Certificate).where(Certificate.thumbprint == presented)
    ).scalar_one_or_none()
    try:
        verify_identity_chain(pki, cert)
    except ChainError as exc:  # one of a retired Secure Channel Root says what to do
        if row is None or row.revoked_at is None:
            raise
        raise AuthError(_refusal(session, ident.group_id, row)) from exc
    accepted = accepted_tunnel_serials(session, ident.group_id)
    if row is None or row.serial not in accepted or row.revoked_at is not None:
        raise AuthError(_refusal(session, ident.group_id, row))
    return TunnelPeer(ident.group_id, presented)


def _refusal(session: Session, group_id: str, row: Certificate | None) -> str:
    """Why a tunnel identity of the group is refused, and what the node's operator does."""
    retired = None
    if row is not None:
        retired = session.execute(
            select(Rotation).where(
                Rotation.old_serial == row.serial, Rotation.finished_at.is_not(None)
            )
        ).scalar_one_or_none()
    if retired is None or retired.finished_at is None:
        return "tunnel identity is not the group's current one"
    return (
        f"tunnel identity was retired by rotation {retired.id} (finished"
        f" {retired.finished_at.isoformat(timespec='seconds')}); this node missed the"
        f" rotation: run 'certgate tunnel setup' for group {group_id} again"
    )


@dataclass(frozen=True, slots=True)
class SignedBatch:
    token: str
    to_seq: int
    count: int


def signed_batch(
    session: Session,
    pki: ca.InstancePKI,
    group_id: str,
    cursor: int,
    version: int = MIN_FEED_VERSION,
) -> SignedBatch | None:
    """The feed after ``cursor`` for a node of contract ``version`` (docs/CONVENTIONS.md).

    While a console-identity rotation is switched and not finished, the feed up to its
    switch step is signed by the old identity (a node behind it pins only that one, and
    learns the new one from those steps); a batch never crosses the switch."""
    events = feed.batch_after(session, group_id, cursor)
    signer = None
    previous = _previous_console(session, pki, group_id)
    if previous is not None and cursor < previous[0]:
        events = [e for e in events if e.seq <= previous[0]]
        signer = previous[1]
    if not events:
        return None
    payload: dict[str, Any] = {
        "from_seq": events[0].seq,
        "to_seq": events[-1].seq,
        "entries": feed.for_version((e.entry for e in events), version),
    }
    if version >= 2:
        payload["version"] = version
    token = sign_for_group(session, pki, group_id, payload, jws.TYP_BATCH, FEED_TTL_S, signer)
    return SignedBatch(token, events[-1].seq, len(events))


def rotation_key_label(rotation_id: int, role: str) -> str:
    """A key a rotation keeps sealed: ``next`` (until switch), ``previous`` (until finish)."""
    return f"rotation:{rotation_id}:{role}"


def _previous_console(
    session: Session, pki: ca.InstancePKI, group_id: str
) -> tuple[int, tuple[x509.Certificate, PrivateKey]] | None:
    """(switch seq, old console identity and key) of a switched, unfinished console
    identity rotation of the group."""
    row = session.execute(
        select(Rotation).where(
            Rotation.group_id == group_id,
            Rotation.kind == CONSOLE_IDENTITY_ROTATION,
            Rotation.switch_seq.is_not(None),
            Rotation.finished_at.is_(None),
        )
    ).scalar_one_or_none()
    if row is None or row.switch_seq is None:
        return None
    old = session.get(Certificate, row.old_serial)
    assert old is not None  # FK-enforced
    cert = x509.load_pem_x509_certificate(old.cert_pem.encode())
    return row.switch_seq, (cert, pki.unseal(session, rotation_key_label(row.id, "previous")))


def signed_snapshot(
    session: Session,
    pki: ca.InstancePKI,
    group_id: str,
    after: str = "",
    limit: int = feed.SNAPSHOT_PAGE,
) -> str:
    """One signed snapshot page: ``{seq, entries, after, next}``; ``next`` None ends it."""
    seq, entries, following = feed.snapshot(session, group_id, after, limit)
    payload = {"seq": seq, "entries": entries, "after": after, "next": following}
    return sign_for_group(session, pki, group_id, payload, jws.TYP_SNAPSHOT, FEED_TTL_S)
