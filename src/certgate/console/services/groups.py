"""Organization groups and each group's unique identity pair (console cert, tunnel cert)."""

from __future__ import annotations

from typing import Any

from cryptography import x509
from pydantic import ValidationError
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from certgate.console.services import ca, feed
from certgate.console.services.rbac import ancestors
from certgate.console.services.settings import SettingsIn
from certgate.console.store.models import Certificate, Group, GroupIdentity
from certgate.errors import BadRequest, Conflict, NotFound
from certgate.pki import identity
from certgate.pki.authority import Names
from certgate.pki.keys import PrivateKey, generate_key
from certgate.pki.profiles import CONSOLE_IDENTITY, TUNNEL_IDENTITY

DEFAULT_SETTINGS: dict[str, Any] = {
    "tunnel": {
        "hostnames": ["localhost"],
        "ip_addresses": ["127.0.0.1"],
        "proxy_port": 2020,
        "per_app_port": 8443,
    },
    "feed": {"long_poll_s": 25, "max_staleness_s": 300},
    "device_rules": {"default": "block", "rules": []},
    "server_rules": {"default": "deny", "rules": []},
    "initial_compliance": "unknown",
    # Standard enrollment protocols, off unless a group turns them on.
    "enrollment": {"est": False, "scep": False},
}


def console_key_label(group_id: str) -> str:
    return f"group:{group_id}:console"


def tunnel_key_label(group_id: str) -> str:
    return f"group:{group_id}:tunnel"


def get_group(session: Session, group_id: str) -> Group:
    group = session.get(Group, group_id)
    if group is None:
        raise NotFound(f"group {group_id!r} not found")
    return group


def create_group(
    session: Session,
    pki: ca.InstancePKI,
    group_id: str,
    name: str,
    parent_id: str | None,
    settings: dict[str, Any] | None = None,
) -> Group:
    if not identity.GROUP_ID_RE.fullmatch(group_id):
        raise BadRequest(f"invalid group id {group_id!r}: use [a-z0-9][a-z0-9-]{{0,62}}")
    if session.get(Group, group_id) is not None:
        raise Conflict(f"group {group_id!r} exists")
    if parent_id is not None:
        ancestors(session, parent_id)
    merged = {**DEFAULT_SETTINGS}
    for key, value in (settings or {}).items():
        if key not in SETTINGS_KEYS:
            raise BadRequest(f"unknown setting {key!r}")
        # .get: "kerberos" has no default (absent: no realm is served).
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    validate_settings(merged)
    group = Group(
        id=group_id,
        name=name[:200] or group_id,
        parent_id=parent_id,
        created_at=ca.now(),
        feed_seq=0,
        settings=merged,
        policy_version=1,
    )
    session.add(group)
    session.flush()
    issue_identity_pair(session, pki, group)
    return group


def protocol_enabled(group: Group, protocol: str) -> bool:
    """Whether the group accepts enrollment by ``protocol`` (est, scep): off by default."""
    return bool(group.settings.get("enrollment", {}).get(protocol, False))


def issue_identity_pair(session: Session, pki: ca.InstancePKI, group: Group) -> GroupIdentity:
    """One console identity (signs the group's messages) and one tunnel identity, shared by
    every tunnel node of the group. Console identities are always P-256 (JWS ES256)."""
    tunnel_conf = group.settings["tunnel"]
    console_key, tunnel_key = generate_key(), generate_key()
    _, console_row = pki.issue(
        session,
        ca.SECURE_CHANNEL_ROOT,
        CONSOLE_IDENTITY,
        Names(f"console {group.id}"[:64], identity.console(group.id)),
        console_key.public_key(),
        ca.Record(kind="console-identity", group_id=group.id),
    )
    _, tunnel_row = pki.issue(
        session,
        ca.SECURE_CHANNEL_ROOT,
        TUNNEL_IDENTITY,
        Names(
            f"tunnel {group.id}"[:64],
            identity.tunnel(group.id),
            dns_names=tuple(tunnel_conf["hostnames"]),
            ip_addresses=tuple(tunnel_conf["ip_addresses"]),
        ),
        tunnel_key.public_key(),
        ca.Record(kind="tunnel-identity", group_id=group.id),
    )
    ca.seal_key(session, pki.master, console_key_label(group.id), console_key)
    ca.seal_key(session, pki.master, tunnel_key_label(group.id), tunnel_key)
    existing = session.get(GroupIdentity, group.id)
    if existing is not None:
        for serial in (existing.console_serial, existing.tunnel_serial):
            ca.revoke(session, serial, "superseded")
        existing.console_serial, existing.tunnel_serial = console_row.serial, tunnel_row.serial
        return existing
    pair = GroupIdentity(
        group_id=group.id, console_serial=console_row.serial, tunnel_serial=tunnel_row.serial
    )
    session.add(pair)
    return pair


def group_certificates(
    session: Session, group_id: str
) -> tuple[x509.Certificate, x509.Certificate]:
    """(console identity cert, tunnel identity cert) of a group; no key is unsealed."""
    pair = session.get(GroupIdentity, group_id)
    if pair is None:
        raise NotFound(f"group {group_id!r} has no identity pair")
    console_row = session.get(Certificate, pair.console_serial)
    tunnel_row = session.get(Certificate, pair.tunnel_serial)
    assert console_row is not None and tunnel_row is not None  # FK-enforced
    return (
        x509.load_pem_x509_certificate(console_row.cert_pem.encode()),
        x509.load_pem_x509_certificate(tunnel_row.cert_pem.encode()),
    )


_DELIVERY_FACTS = (
    select(Group.policy_version, Group.settings, Certificate.thumbprint)
    .join(GroupIdentity, GroupIdentity.group_id == Group.id)
    .join(Certificate, Certificate.serial == GroupIdentity.tunnel_serial)
    .where(Group.id == bindparam("group_id"))
)


def delivery_facts(session: Session, group_id: str) -> tuple[int, dict[str, Any], str]:
    """A group's policy version, its settings and its tunnel identity's CertThumbprint, in
    one Core query (what a profile delivery needs; ``group_certificates`` parses two PEMs):
    the version and the settings of one row read at once always match. Reads what the
    transaction has flushed."""
    row = session.connection().execute(_DELIVERY_FACTS, {"group_id": group_id})
    found = row.one_or_none()
    if found is None:
        raise NotFound(f"group {group_id!r} not found or without an identity pair")
    return found[0], found[1], found[2]


def identity_pair(
    session: Session, pki: ca.InstancePKI, group_id: str
) -> tuple[x509.Certificate, PrivateKey, x509.Certificate, PrivateKey]:
    """(console cert, console key, tunnel cert, tunnel key) of a group."""
    console_cert, tunnel_cert = group_certificates(session, group_id)
    return (
        console_cert,
        pki.unseal(session, console_key_label(group_id)),
        tunnel_cert,
        pki.unseal(session, tunnel_key_label(group_id)),
    )


SETTINGS_KEYS = (
    "tunnel",
    "feed",
    "device_rules",
    "server_rules",
    "initial_compliance",
    "enrollment",
    "kerberos",
)
# Settings that nodes or devices apply: a change publishes a new policy version.
POLICY_KEYS = ("tunnel", "feed", "device_rules", "server_rules", "kerberos")


def update_settings(
    session: Session, pki: ca.InstancePKI, group_id: str, changes: dict[str, Any]
) -> Group:
    """Merge ``changes`` into the group's settings. New tunnel names rotate the group's
    tunnel identity (``rotation.names_changed``); a
    change of what nodes or devices apply publishes the next policy version in the feed,
    in this transaction, so running nodes and agents apply it without a new setup."""
    group = get_group(session, group_id)
    unknown = set(changes) - set(SETTINGS_KEYS)
    if unknown:
        raise BadRequest(f"unknown settings {sorted(unknown)}")
    merged = {**group.settings}
    for key, value in changes.items():
        # .get: a group made before a settings key existed has no value for it yet.
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    validate_settings(merged)
    old_tunnel, old_settings = group.settings["tunnel"], group.settings
    group.settings = merged
    if (merged["tunnel"]["hostnames"], merged["tunnel"]["ip_addresses"]) != (
        old_tunnel["hostnames"],
        old_tunnel["ip_addresses"],
    ):
        # A rotation, not an instant swap: nodes keep the old identity until they hold
        # the new one, and the console accepts both until the rotation is finished.
        from certgate.console.services import rotation  # it builds on this module

        rotation.names_changed(session, pki, group, "group.settings")
    # .get: "kerberos" is optional (absent: no realm is served).
    if any(merged.get(key) != old_settings.get(key) for key in POLICY_KEYS):
        group.policy_version += 1
        feed.emit_policy(session, group)
    return group


def validate_settings(settings: dict[str, Any]) -> None:
    """Settings as they will be stored (a change merged into the stored ones): each key's
    shape by its schema (``settings.SettingsIn``, as the API checks a request), then what
    only the merged whole can break, then the rule parsers the nodes and agents use."""
    from certgate.device.rules import DeviceRules
    from certgate.tunnel.rules import RuleSet

    try:
        SettingsIn.model_validate(settings)
    except ValidationError as exc:
        raise BadRequest(f"settings: {problems(exc)}") from exc
    tunnel = settings["tunnel"]
    if not tunnel.get("hostnames") and not tunnel.get("ip_addresses"):
        raise BadRequest("tunnel needs at least one hostname or IP address")
    feed = settings["feed"]
    if 2 * feed["long_poll_s"] > feed["max_staleness_s"]:
        # An idle long-poll only answers after long_poll_s; it must fit the budget twice.
        raise BadRequest("feed.long_poll_s must be at most half of feed.max_staleness_s")
    try:
        DeviceRules.from_dict(settings["device_rules"])
        RuleSet.from_dict(settings["server_rules"])
    except (ValueError, TypeError, KeyError) as exc:
        raise BadRequest(f"invalid rules: {exc}") from exc


def problems(exc: ValidationError) -> str:
    """A validation error in one line: each field's path and what is wrong with it."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
