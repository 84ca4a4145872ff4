"""Record outside changes of index.json that freed a large part of the store at once

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from refcount.db.tables import TZDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mass_frees",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", TZDateTime(), nullable=False),
        sa.Column("held_until", TZDateTime(), nullable=False),
        sa.Column("roots_before", sa.Integer(), nullable=False),
        sa.Column("roots_removed", sa.Integer(), nullable=False),
        sa.Column("blobs", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("live_bytes", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mass_frees")),
    )


def downgrade() -> None:
    op.drop_table("mass_frees")
