"""SQLAlchemy 2 models of the console. Portable SQL only (SQLite and PostgreSQL).

No secret is stored in clear: private keys are sealed blobs (``pki.keystore``), API keys,
device credentials, enrollment and installer tokens are SHA-256 hashes of high-entropy
values, enrollment passwords are scrypt hashes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite would hand back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use UTC-aware values")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        datetime: UTCDateTime(),
    }


class Instance(Base):
    """The single row describing this console instance; also the audit chain's lock row."""

    __tablename__ = "instance"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime]
    key_algorithm: Mapped[str] = mapped_column(String(16))
    public_url: Mapped[str] = mapped_column(String(255))
    crl_number: Mapped[int] = mapped_column(BigInteger, default=0)
    audit_head: Mapped[str] = mapped_column(String(64))
    audit_count: Mapped[int] = mapped_column(BigInteger, default=0)
    # Entries 1..audit_keyed_from carry the unkeyed SHA-256 chain of releases before 0005.
    audit_keyed_from: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class SealedKey(Base):
    __tablename__ = "sealed_keys"
    label: Mapped[str] = mapped_column(String(128), primary_key=True)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]


class CACert(Base):
    """The instance CAs: root, secure-channel-root, device-root, admin-ca; a rotated Device
    Root is labelled ``device-root@<rotation id>`` (``services.ca.role_of``)."""

    __tablename__ = "ca_certs"
    label: Mapped[str] = mapped_column(String(64), primary_key=True)
    cert_pem: Mapped[str] = mapped_column(Text)
    key_label: Mapped[str] = mapped_column(ForeignKey("sealed_keys.label"))
    # current (issues for its role), next, retiring (trusted until finish), retired or
    # offered (the root-cross a finished Root rotation still serves, ca.OFFERED)
    status: Mapped[str] = mapped_column(String(16), default="current", server_default="current")


class Group(Base):
    __tablename__ = "groups"
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("groups.id"), index=True)
    created_at: Mapped[datetime]
    feed_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Bumped by every change of what nodes and devices apply (feed ``policy`` operations).
    policy_version: Mapped[int] = mapped_column(BigInteger, default=1)


class GroupIdentity(Base):
    """The group's unique identity pair: one console cert, one tunnel cert (spec §2)."""

    __tablename__ = "group_identities"
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id"), primary_key=True)
    console_serial: Mapped[str] = mapped_column(ForeignKey("certificates.serial"))
    tunnel_serial: Mapped[str] = mapped_column(ForeignKey("certificates.serial"))


class Admin(Base):
    __tablename__ = "admins"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    username: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime]
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


class RoleBinding(Base):
    __tablename__ = "role_bindings"
    __table_args__ = (UniqueConstraint("admin_id", "role", "group_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    admin_id: Mapped[str] = mapped_column(ForeignKey("admins.id"), index=True)
    role: Mapped[str] = mapped_column(String(32))
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id"))


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    admin_id: Mapped[str] = mapped_column(ForeignKey("admins.id"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class Certificate(Base):
    __tablename__ = "certificates"
    # Snapshot pages walk one group's certificates (feed.snapshot_rows): format 1 in
    # thumbprint order, format 2 in (device_uid, thumbprint) order on an index holding
    # every column the page reads (migrations 0002, 0003).
    __table_args__ = (
        Index("ix_certificates_group_thumbprint", "group_id", "thumbprint"),
        Index(
            "ix_certificates_snapshot",
            "group_id",
            "device_uid",
            "thumbprint",
            "kind",
            "revoked_at",
            "bundle_id",
            "not_after",
        ),
    )
    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    thumbprint: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    issuer_label: Mapped[str] = mapped_column(String(64))
    group_id: Mapped[str | None] = mapped_column(ForeignKey("groups.id"), index=True)
    device_uid: Mapped[str | None] = mapped_column(String(32), index=True)
    bundle_id: Mapped[str | None] = mapped_column(String(255))
    admin_id: Mapped[str | None] = mapped_column(ForeignKey("admins.id"), index=True)
    subject: Mapped[str] = mapped_column(String(512))
    not_before: Mapped[datetime]
    not_after: Mapped[datetime]
    issued_at: Mapped[datetime]
    cert_pem: Mapped[str] = mapped_column(Text)
    revoked_at: Mapped[datetime | None]
    revocation_reason: Mapped[str | None] = mapped_column(String(32))


class Device(Base):
    __tablename__ = "devices"
    # What a snapshot entry reads of its device, by uid, without visiting the row.
    __table_args__ = (
        Index(
            "ix_devices_snapshot",
            "uid",
            "group_id",
            "enrollment_status",
            "compliance_status",
            "blocked",
        ),
        # Keyset pages of the web console and the API (migration 0007): uid or owner
        # order, in one group or across all, optionally by compliance.
        Index("ix_devices_group_uid", "group_id", "uid"),
        Index("ix_devices_group_owner", "group_id", "owner", "uid"),
        Index("ix_devices_group_compliance", "group_id", "compliance_status", "uid"),
        Index("ix_devices_owner", "owner", "uid"),
        Index("ix_devices_compliance", "compliance_status", "uid"),
    )
    uid: Mapped[str] = mapped_column(String(32), primary_key=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id"), index=True)
    platform: Mapped[str] = mapped_column(String(32))
    owner: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(128), default="")
    enrollment_status: Mapped[str] = mapped_column(String(16))
    compliance_status: Mapped[str] = mapped_column(String(16))
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    credential_hash: Mapped[str] = mapped_column(String(64), unique=True)
    enrolled_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    profile_version: Mapped[int] = mapped_column(Integer, default=0)


class EnrollmentUser(Base):
    __tablename__ = "enrollment_users"
    username: Mapped[str] = mapped_column(String(128), primary_key=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id"))
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime]
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


class OneTimeToken(Base):
    """Single-use, expiring secrets: enrollment tokens, tunnel installer tokens, SCEP
    challenges (whose ``bundle_id`` names the app of a Proxy-mode certificate)."""

    __tablename__ = "one_time_tokens"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(16))
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id"))
    secret_hash: Mapped[str] = mapped_column(String(64))
    owner: Mapped[str | None] = mapped_column(String(128))
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    bundle_id: Mapped[str | None] = mapped_column(String(255))


class ProfileDelivery(Base):
    __tablename__ = "profile_deliveries"
    __table_args__ = (UniqueConstraint("device_uid", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_uid: Mapped[str] = mapped_column(ForeignKey("devices.uid"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    cert_serial: Mapped[str] = mapped_column(ForeignKey("certificates.serial"))
    rules: Mapped[dict[str, Any]]
    delivered_at: Mapped[datetime]


class TunnelNode(Base):
    __tablename__ = "tunnel_nodes"
    __table_args__ = (UniqueConstraint("group_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    address: Mapped[str] = mapped_column(String(255))
    registered_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    # The node's own report (tunnel.report): its live tunnels and sync state, for dry-runs.
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    reported_at: Mapped[datetime | None]
    # The tunnel identity the node presented on its last call (rotation status).
    identity_thumbprint: Mapped[str | None] = mapped_column(String(64), nullable=True)


class DenialCount(Base):
    """Requests a tunnel node denied, by reason, in one time bucket (``services.denials``):
    the differences of the totals its reports carry. A node writes only its own rows."""

    __tablename__ = "denial_counts"
    node_id: Mapped[int] = mapped_column(ForeignKey("tunnel_nodes.id"), primary_key=True)
    bucket: Mapped[datetime] = mapped_column(primary_key=True, index=True)
    reason: Mapped[str] = mapped_column(String(64), primary_key=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id"), index=True)
    count: Mapped[int] = mapped_column(BigInteger)


class Rotation(Base):
    """One rotation (``services.rotation``): prepare -> switch -> finish of ``kind``.

    At most one unfinished rotation of a kind per group; ``*_seq`` are the group feed seqs
    of the trust operations that announced each step (a node past ``prepare_seq`` holds
    the new one)."""

    __tablename__ = "rotations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    group_id: Mapped[str | None] = mapped_column(ForeignKey("groups.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    phase: Mapped[str] = mapped_column(String(16))
    old_serial: Mapped[str] = mapped_column(ForeignKey("certificates.serial"))
    new_serial: Mapped[str] = mapped_column(ForeignKey("certificates.serial"))
    overlap_s: Mapped[int] = mapped_column(BigInteger)
    started_by: Mapped[str] = mapped_column(String(200))
    prepared_at: Mapped[datetime]
    switched_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    prepare_seq: Mapped[int | None] = mapped_column(BigInteger)
    switch_seq: Mapped[int | None] = mapped_column(BigInteger)
    forced: Mapped[bool] = mapped_column(Boolean, default=False)


class FeedEvent(Base):
    __tablename__ = "feed_events"
    __table_args__ = (UniqueConstraint("group_id", "seq"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id"))
    seq: Mapped[int] = mapped_column(BigInteger)
    entry: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class AuditEntry(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    ts: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(200))
    group_id: Mapped[str | None] = mapped_column(String(63), index=True)
    action: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[dict[str, Any]]
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AdminSignIn(Base):
    """An admin's web sign-in factors: a scrypt password hash and a sealed TOTP secret
    (``ui.signin``); ``totp_last_step`` refuses a code's reuse (RFC 6238 section 5.2)."""

    __tablename__ = "admin_signins"
    admin_id: Mapped[str] = mapped_column(ForeignKey("admins.id"), primary_key=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    totp_sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    totp_last_step: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime]


class WebSession(Base):
    """A signed-in browser. The cookie holds ``cgs_<id>_<secret>``; only the secret's
    SHA-256 is stored. Deleted at sign-out and when found expired."""

    __tablename__ = "web_sessions"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    admin_id: Mapped[str] = mapped_column(ForeignKey("admins.id"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    client: Mapped[str] = mapped_column(String(64), default="")


class CompliancePolicy(Base):
    """A group's compliance rules (``certgate.posture``); subgroups inherit them."""

    __tablename__ = "compliance_policies"
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id"), primary_key=True)
    rules: Mapped[list[Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime]
    updated_by: Mapped[str] = mapped_column(String(200))


class DevicePosture(Base):
    """A device's last check-in, its current failing rules and an admin override."""

    __tablename__ = "device_posture"
    device_uid: Mapped[str] = mapped_column(ForeignKey("devices.uid"), primary_key=True)
    facts: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    unavailable: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    checked_in_at: Mapped[datetime | None]
    cert_not_before: Mapped[datetime | None]
    failures: Mapped[list[Any]] = mapped_column(JSON, default=list)
    override_status: Mapped[str | None] = mapped_column(String(16))
    override_until: Mapped[datetime | None]
    override_by: Mapped[str | None] = mapped_column(String(200))
    override_reason: Mapped[str | None] = mapped_column(String(500))


class ComplianceEvent(Base):
    """Compliance history: each change of a device's status or failing rules, and why;
    and each override set, cleared or expired (``override``: what the admin decided)."""

    __tablename__ = "compliance_history"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_uid: Mapped[str] = mapped_column(ForeignKey("devices.uid"), index=True)
    at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16))
    cause: Mapped[str] = mapped_column(String(16))
    failures: Mapped[list[Any]] = mapped_column(JSON)
    facts: Mapped[dict[str, Any]] = mapped_column(JSON)
    override: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class ScepTransaction(Base):
    """SCEP transaction ids seen (a replayed one is refused) and, once issued, the
    certificate a GetCertInitial for it answers with."""

    __tablename__ = "scep_transactions"
    transaction_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    signer_thumbprint: Mapped[str] = mapped_column(String(64))
    cert_serial: Mapped[str | None] = mapped_column(ForeignKey("certificates.serial"))
    created_at: Mapped[datetime]


class AccessSignIn(Base):
    """An Access sign-in transaction (``services.access_signins``), shared by every Access
    node. Keyed by the SHA-256 of its handle and of its code: Access sends only the hashes,
    so neither secret is ever in the console. ``request`` and ``grant`` are the
    authorization request and the admitted device, as Access describes them."""

    __tablename__ = "access_signins"
    handle_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    code_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    grant: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    group_id: Mapped[str | None] = mapped_column(String(63))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    code_expires_at: Mapped[datetime | None]
    purge_after: Mapped[datetime] = mapped_column(index=True)
