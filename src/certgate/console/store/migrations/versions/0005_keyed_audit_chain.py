"""keyed audit chain: the cut-over from the unkeyed SHA-256 chain to HMAC-SHA256

Entries written before this revision keep their unkeyed hashes; ``instance.
audit_keyed_from`` records how many there are (the chain's count at upgrade time; 0 on a
new database). Every keyed entry's MAC covers that number and so does every signed
checkpoint (``console.services.checkpoints``), so a database writer cannot move the cut-over
to pass keyed entries off as unkeyed ones. No key is needed here: nothing is rehashed.
Until the first checkpoint after the upgrade (written when the console starts), nothing
outside the database vouches for the cut-over: start the console soon after upgrading.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 17:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("audit_keyed_from", sa.BigInteger(), nullable=False, server_default="0")
        )
    op.execute("UPDATE instance SET audit_keyed_from = audit_count")


def downgrade() -> None:
    # Entries appended since the upgrade carry MACs that the older release cannot check.
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_column("audit_keyed_from")
