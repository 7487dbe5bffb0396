"""web console: admin sign-in factors, server-side sessions, device owner index

Admins sign in to the web console with a password (scrypt) and a TOTP code; the TOTP
secret is sealed with the master key. Sessions live server-side; the cookie carries an id
and a secret whose SHA-256 only is stored. The device list searches by owner, which
needs an index at a million devices.

Revision ID: 0007
Revises: 0006 (chained on 0004 on the webui branch until 0005/0006 are merged)
Create Date: 2026-12-06 17:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0004"
branch_labels = None
depends_on = None


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
    op.create_index("ix_devices_owner", "devices", ["owner", "uid"])


def downgrade() -> None:
    op.drop_index("ix_devices_owner", table_name="devices")
    op.drop_index("ix_web_sessions_admin_id", table_name="web_sessions")
    op.drop_table("web_sessions")
    op.drop_table("admin_signins")
