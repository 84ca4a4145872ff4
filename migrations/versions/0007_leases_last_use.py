"""Leases on blobs a push relies on, and the last use of each tag

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from refcount.db.tables import TZDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("lease", sa.String(length=64), nullable=False),
        sa.Column("digest", sa.String(length=200), nullable=False),
        sa.Column("holder", sa.String(length=1000), nullable=False),
        sa.Column("created", TZDateTime(), nullable=False),
        sa.Column("expires", TZDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("lease", "digest", name=op.f("pk_leases")),
    )
    op.create_index("ix_leases_digest", "leases", ["digest"])
    op.create_index(op.f("ix_leases_expires"), "leases", ["expires"])
    op.create_table(
        "last_used",
        sa.Column("tag", sa.String(length=1000), nullable=False),
        sa.Column("used_at", TZDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tag", name=op.f("pk_last_used")),
    )


def downgrade() -> None:
    op.drop_table("last_used")
    op.drop_index(op.f("ix_leases_expires"), table_name="leases")
    op.drop_index("ix_leases_digest", table_name="leases")
    op.drop_table("leases")
