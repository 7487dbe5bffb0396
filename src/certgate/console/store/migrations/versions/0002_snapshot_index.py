"""certificates (group_id, thumbprint) index for the paged snapshot

Each snapshot page asks for a group's certificates with thumbprint > cursor, in thumbprint
order. Without this index SQLite took the one-column ``kind`` index and sorted the whole
group for every page (15 s a page at 1,000,000 devices, bench/results/summary.md).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 05:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.create_index(
            "ix_certificates_group_thumbprint", ["group_id", "thumbprint"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_index("ix_certificates_group_thumbprint")
