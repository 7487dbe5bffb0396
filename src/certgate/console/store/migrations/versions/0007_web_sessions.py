"""web console: admin sign-in factors, server-side sessions, device owner index

Admins sign in to the web console with a password (scrypt) and a TOTP code; the TOTP
secret is sealed with the master key. Sessions live server-side; the cookie carries an id
and a secret whose SHA-256 only is stored. The device list pages by uid or owner, in a
group or across groups, filtered by compliance: one index per order, so that every page is
a range scan at a million devices.

Revision ID: 0007
Revises: 0006 (chained on 0004 on the webui branch until 0005/0006 are merged)
Create Date: 2026-12-06 17:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Keyset pages of devices (web console, API) in uid or owner order, in one group or all,
# optionally by compliance: each page is an index range scan at any fleet size.
DEVICE_INDEXES = {
    "ix_devices_group_uid": ["group_id", "uid"],
    "ix_devices_group_owner": ["group_id", "owner", "uid"],
    "ix_devices_group_compliance": ["group_id", "compliance_status", "uid"],
    "ix_devices_owner": ["owner", "uid"],
    "ix_devices_compliance": ["compliance_status", "uid"],
}


def upgrade() -> None:
    op.create_table(
        "admin_signins",
        sa.Column("admin_id", sa.String(32), sa.ForeignKey("admins.id"), primary_key=True),
        sa.Column("password_hash", sa.String(255), nullable=True),
        sa.Column("totp_sealed", sa.LargeBinary(), nullable=True),
        sa.Column("totp_last_step", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("admin_id", sa.String(32), sa.ForeignKey("admins.id"), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("client", sa.String(64), nullable=False, server_default=""),
    )
    op.create_index("ix_web_sessions_admin_id", "web_sessions", ["admin_id"])
    for name, columns in DEVICE_INDEXES.items():
        op.create_index(name, "devices", columns)


def downgrade() -> None:
    for name in DEVICE_INDEXES:
        op.drop_index(name, table_name="devices")
    op.drop_index("ix_web_sessions_admin_id", table_name="web_sessions")
    op.drop_table("web_sessions")
    op.drop_table("admin_signins")
