"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22 03:56:17.709438
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "admins",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("username", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("username"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("group_id", sa.String(length=63), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_group_id"), ["group_id"], unique=False)

    op.create_table(
        "groups",
        sa.Column("id", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("parent_id", sa.String(length=63), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("feed_seq", sa.BigInteger(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["groups.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_groups_parent_id"), ["parent_id"], unique=False)

    op.create_table(
        "instance",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_algorithm", sa.String(length=16), nullable=False),
        sa.Column("public_url", sa.String(length=255), nullable=False),
        sa.Column("crl_number", sa.BigInteger(), nullable=False),
        sa.Column("audit_head", sa.String(length=64), nullable=False),
        sa.Column("audit_count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "sealed_keys",
        sa.Column("label", sa.String(length=128), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("label"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("admin_id", sa.String(length=32), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["admin_id"],
            ["admins.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_admin_id"), ["admin_id"], unique=False)

    op.create_table(
        "ca_certs",
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("key_label", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_label"],
            ["sealed_keys.label"],
        ),
        sa.PrimaryKeyConstraint("label"),
    )
    op.create_table(
        "certificates",
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("thumbprint", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("issuer_label", sa.String(length=64), nullable=False),
        sa.Column("group_id", sa.String(length=63), nullable=True),
        sa.Column("device_uid", sa.String(length=32), nullable=True),
        sa.Column("bundle_id", sa.String(length=255), nullable=True),
        sa.Column("admin_id", sa.String(length=32), nullable=True),
        sa.Column("subject", sa.String(length=512), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revocation_reason", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(
            ["admin_id"],
            ["admins.id"],
        ),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
        ),
        sa.PrimaryKeyConstraint("serial"),
        sa.UniqueConstraint("thumbprint"),
    )
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_certificates_admin_id"), ["admin_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_certificates_device_uid"), ["device_uid"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_certificates_group_id"), ["group_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_certificates_kind"), ["kind"], unique=False)

    op.create_table(
        "devices",
        sa.Column("uid", sa.String(length=32), nullable=False),
        sa.Column("group_id", sa.String(length=63), nullable=False),
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("enrollment_status", sa.String(length=16), nullable=False),
        sa.Column("compliance_status", sa.String(length=16), nullable=False),
        sa.Column("blocked", sa.Boolean(), nullable=False),
        sa.Column("credential_hash", sa.String(length=64), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("profile_version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
        ),
        sa.PrimaryKeyConstraint("uid"),
        sa.UniqueConstraint("credential_hash"),
    )
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_devices_group_id"), ["group_id"], unique=False)

    op.create_table(
        "enrollment_users",
        sa.Column("username", sa.String(length=128), nullable=False),
        sa.Column("group_id", sa.String(length=63), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
        ),
        sa.PrimaryKeyConstraint("username"),
    )
    op.create_table(
        "feed_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("group_id", sa.String(length=63), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("entry", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("group_id", "seq"),
    )
    op.create_table(
        "one_time_tokens",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("group_id", sa.String(length=63), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "role_bindings",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("admin_id", sa.String(length=32), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("group_id", sa.String(length=63), nullable=False),
        sa.ForeignKeyConstraint(
            ["admin_id"],
            ["admins.id"],
        ),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("admin_id", "role", "group_id"),
    )
    with op.batch_alter_table("role_bindings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_role_bindings_admin_id"), ["admin_id"], unique=False)

    op.create_table(
        "tunnel_nodes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("group_id", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("address", sa.String(length=255), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("group_id", "name"),
    )
    with op.batch_alter_table("tunnel_nodes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tunnel_nodes_group_id"), ["group_id"], unique=False)

    op.create_table(
        "group_identities",
        sa.Column("group_id", sa.String(length=63), nullable=False),
        sa.Column("console_serial", sa.String(length=64), nullable=False),
        sa.Column("tunnel_serial", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["console_serial"],
            ["certificates.serial"],
        ),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
        ),
        sa.ForeignKeyConstraint(
            ["tunnel_serial"],
            ["certificates.serial"],
        ),
        sa.PrimaryKeyConstraint("group_id"),
    )
    op.create_table(
        "profile_deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_uid", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("cert_serial", sa.String(length=64), nullable=False),
        sa.Column("rules", sa.JSON(), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["cert_serial"],
            ["certificates.serial"],
        ),
        sa.ForeignKeyConstraint(
            ["device_uid"],
            ["devices.uid"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_uid", "version"),
    )
    with op.batch_alter_table("profile_deliveries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_profile_deliveries_device_uid"), ["device_uid"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("profile_deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_profile_deliveries_device_uid"))

    op.drop_table("profile_deliveries")
    op.drop_table("group_identities")
    with op.batch_alter_table("tunnel_nodes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tunnel_nodes_group_id"))

    op.drop_table("tunnel_nodes")
    with op.batch_alter_table("role_bindings", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_role_bindings_admin_id"))

    op.drop_table("role_bindings")
    op.drop_table("one_time_tokens")
    op.drop_table("feed_events")
    op.drop_table("enrollment_users")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_devices_group_id"))

    op.drop_table("devices")
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_certificates_kind"))
        batch_op.drop_index(batch_op.f("ix_certificates_group_id"))
        batch_op.drop_index(batch_op.f("ix_certificates_device_uid"))
        batch_op.drop_index(batch_op.f("ix_certificates_admin_id"))

    op.drop_table("certificates")
    op.drop_table("ca_certs")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_admin_id"))

    op.drop_table("api_keys")
    op.drop_table("sealed_keys")
    op.drop_table("instance")
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_groups_parent_id"))

    op.drop_table("groups")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_group_id"))

    op.drop_table("audit_log")
    op.drop_table("admins")
