"""rotation: one table of rotations (prepare -> switch -> finish), the identity a node presents

A rotation replaces something the system trusts or presents without an outage
(``services.rotation``). Nodes are recorded with the tunnel identity they presented on
their last call, so that the rotation status can say who still depends on the old one.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 17:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
# Chained after 0005 (the audit log migration) at merge; "0004" until then.
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rotations",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("group_id", sa.String(63), sa.ForeignKey("groups.id"), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column(
            "old_serial", sa.String(64), sa.ForeignKey("certificates.serial"), nullable=False
        ),
        sa.Column(
            "new_serial", sa.String(64), sa.ForeignKey("certificates.serial"), nullable=False
        ),
        sa.Column("overlap_s", sa.BigInteger(), nullable=False),
        sa.Column("started_by", sa.String(200), nullable=False),
        sa.Column("prepared_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("switched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("prepare_seq", sa.BigInteger(), nullable=True),
        sa.Column("switch_seq", sa.BigInteger(), nullable=True),
        sa.Column("forced", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_rotations_group_id", "rotations", ["group_id"])
    with op.batch_alter_table("tunnel_nodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("identity_thumbprint", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tunnel_nodes", schema=None) as batch_op:
        batch_op.drop_column("identity_thumbprint")
    op.drop_index("ix_rotations_group_id", table_name="rotations")
    op.drop_table("rotations")
