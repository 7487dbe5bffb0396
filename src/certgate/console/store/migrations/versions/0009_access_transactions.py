"""Access sign-in transactions shared by every Access node

A sign-in started on one Access node can be finished on another: the transaction and its
authorization code live here, keyed by SHA-256 hashes (Access never sends the handle or
the code themselves), single use by a conditional UPDATE, purged once expired.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 18:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "access_signins",
        sa.Column("handle_hash", sa.String(64), primary_key=True),
        sa.Column("code_hash", sa.String(64), nullable=True, unique=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("grant", sa.JSON(), nullable=True),
        sa.Column("group_id", sa.String(63), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("expires_at", UTC_TIME, nullable=False),
        sa.Column("code_expires_at", UTC_TIME, nullable=True),
        sa.Column("purge_after", UTC_TIME, nullable=False),
    )
    op.create_index("ix_access_signins_purge_after", "access_signins", ["purge_after"])


def downgrade() -> None:
    op.drop_index("ix_access_signins_purge_after", table_name="access_signins")
    op.drop_table("access_signins")
