"""denial counts: tunnel-side denials by reason over time (the dashboard's chart)

A tunnel node's report carries its denial totals by reason since it started; the console
keeps their differences in time buckets, one row per node, bucket and reason.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 20:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "denial_counts",
        sa.Column("node_id", sa.Integer(), sa.ForeignKey("tunnel_nodes.id"), primary_key=True),
        sa.Column("bucket", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("reason", sa.String(64), primary_key=True),
        sa.Column("group_id", sa.String(63), sa.ForeignKey("groups.id"), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_denial_counts_bucket", "denial_counts", ["bucket"])
    op.create_index("ix_denial_counts_group_id", "denial_counts", ["group_id"])


def downgrade() -> None:
    op.drop_index("ix_denial_counts_group_id", table_name="denial_counts")
    op.drop_index("ix_denial_counts_bucket", table_name="denial_counts")
    op.drop_table("denial_counts")
