"""posture compliance and SCEP: compliance policies, device posture and history; SCEP
transaction ids

Compliance is computed from what devices report (``certgate.posture``): each group may
hold a policy its subgroups inherit; each device keeps its last check-in, its failing
rules and an admin override with an expiry; every change is kept as history.

Revision ID: 0008
Revises: 0004 (on this branch; the lead re-chains it on 0007 when merging)
Create Date: 2026-12-06 17:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "compliance_policies",
        sa.Column("group_id", sa.String(63), sa.ForeignKey("groups.id"), primary_key=True),
        sa.Column("rules", sa.JSON(), nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=False),
    )
    op.create_table(
        "device_posture",
        sa.Column("device_uid", sa.String(32), sa.ForeignKey("devices.uid"), primary_key=True),
        sa.Column("facts", sa.JSON(), nullable=True),
        sa.Column("unavailable", sa.JSON(), nullable=True),
        sa.Column("checked_in_at", UTC_TIME, nullable=True),
        sa.Column("cert_not_before", UTC_TIME, nullable=True),
        sa.Column("failures", sa.JSON(), nullable=False),
        sa.Column("override_status", sa.String(16), nullable=True),
        sa.Column("override_until", UTC_TIME, nullable=True),
        sa.Column("override_by", sa.String(200), nullable=True),
    )
    op.create_table(
        "compliance_history",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("device_uid", sa.String(32), sa.ForeignKey("devices.uid"), nullable=False),
        sa.Column("at", UTC_TIME, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("cause", sa.String(16), nullable=False),
        sa.Column("failures", sa.JSON(), nullable=False),
        sa.Column("facts", sa.JSON(), nullable=False),
    )
    op.create_index("ix_compliance_history_device_uid", "compliance_history", ["device_uid"])
    op.create_table(
        "scep_transactions",
        sa.Column("transaction_id", sa.String(128), primary_key=True),
        sa.Column("signer_thumbprint", sa.String(64), nullable=False),
        sa.Column(
            "cert_serial", sa.String(64), sa.ForeignKey("certificates.serial"), nullable=True
        ),
        sa.Column("created_at", UTC_TIME, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("scep_transactions")
    op.drop_index("ix_compliance_history_device_uid", table_name="compliance_history")
    op.drop_table("compliance_history")
    op.drop_table("device_posture")
    op.drop_table("compliance_policies")
