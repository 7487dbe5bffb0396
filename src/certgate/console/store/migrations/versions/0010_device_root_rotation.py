"""device root rotation: a status per CA row (current, next, retiring, retired)

A Device Root rotation keeps more than one Device Root: the one that issues
("current"), the prepared one ("next"), the superseded one still trusted during the
overlap ("retiring") and the one finish retired ("retired", kept for its CRL). Labels
never change (``certificates.issuer_label`` names the CA that really signed); a new
Device Root is labelled ``device-root@<rotation id>``.

Revision ID: 0010
Revises: 0006
Create Date: 2026-12-06 18:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ca_certs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("status", sa.String(16), nullable=False, server_default="current")
        )


def downgrade() -> None:
    with op.batch_alter_table("ca_certs", schema=None) as batch_op:
        batch_op.drop_column("status")
