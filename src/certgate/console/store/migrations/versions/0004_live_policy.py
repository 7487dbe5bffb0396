"""live policy: a policy version per group, node reports of live tunnels

Group policy (server and device traffic rules, feed timings, ports) is feed content with
its own version (``groups.policy_version``, bumped with every change of it), so running
nodes and devices apply it without a new setup. Nodes report their live tunnels and sync
state (``tunnel_nodes.report``) so that a dry-run can say which would be closed.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 22:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("policy_version", sa.BigInteger(), nullable=False, server_default="1")
        )
    with op.batch_alter_table("tunnel_nodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("report", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("reported_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tunnel_nodes", schema=None) as batch_op:
        batch_op.drop_column("reported_at")
        batch_op.drop_column("report")
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.drop_column("policy_version")
