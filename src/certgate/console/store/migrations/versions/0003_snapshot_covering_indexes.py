"""covering indexes for format 2 snapshot pages

A snapshot page joins each of a group's certificates to its device. With 0002's
(group_id, thumbprint) index, pages walked certificates in thumbprint order: every entry
cost a read of its certificate row, then of the device's uid index and row, all random
B-tree reads (rows sit in issuance order, uids are random), and SQLite's fetch was half
of a page's 0.75 s at 1,000,000 devices (bench/FINDINGS.md, "Bootstrap").

Format 2 pages walk (device_uid, thumbprint) order instead, on an index holding every
certificate column a page reads, and read each device from an index holding the device
columns it needs: both are walks in uid order, 0.075 s of CPU a page. 0002's index stays
for format 1 pages (thumbprint order), served to nodes that predate format 2.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 15:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

CERTIFICATE_COLUMNS = [
    "group_id",
    "device_uid",
    "thumbprint",
    "kind",
    "revoked_at",
    "bundle_id",
    "not_after",
]
DEVICE_COLUMNS = ["uid", "group_id", "enrollment_status", "compliance_status", "blocked"]


def upgrade() -> None:
    op.create_index("ix_certificates_snapshot", "certificates", CERTIFICATE_COLUMNS)
    op.create_index("ix_devices_snapshot", "devices", DEVICE_COLUMNS)


def downgrade() -> None:
    op.drop_index("ix_devices_snapshot", table_name="devices")
    op.drop_index("ix_certificates_snapshot", table_name="certificates")
