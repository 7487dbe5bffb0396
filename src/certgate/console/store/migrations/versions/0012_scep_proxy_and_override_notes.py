"""scep proxy-mode challenges and override notes

A SCEP challenge names the application it issues for (``one_time_tokens.bundle_id``:
null for the Per-App Tunnel device certificate, a bundle id for that app's Proxy-mode
certificate). An admin's compliance override keeps its reason
(``device_posture.override_reason``), and the compliance history records every
override set, cleared or expired (``compliance_history.override``).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 20:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("one_time_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("bundle_id", sa.String(255), nullable=True))
    with op.batch_alter_table("device_posture", schema=None) as batch_op:
        batch_op.add_column(sa.Column("override_reason", sa.String(500), nullable=True))
    with op.batch_alter_table("compliance_history", schema=None) as batch_op:
        batch_op.add_column(sa.Column("override", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("compliance_history", schema=None) as batch_op:
        batch_op.drop_column("override")
    with op.batch_alter_table("device_posture", schema=None) as batch_op:
        batch_op.drop_column("override_reason")
    with op.batch_alter_table("one_time_tokens", schema=None) as batch_op:
        batch_op.drop_column("bundle_id")
