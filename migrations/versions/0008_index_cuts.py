"""The byte ranges cut out of index.json since its spans were recorded

A delete records its cut here instead of shifting the recorded span of every
later entry of `roots` (an UPDATE of the whole table at 100k entries).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "index_cuts",
        sa.Column("at", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("at", name=op.f("pk_index_cuts")),
    )


def downgrade() -> None:
    # The spans in `roots` are only valid with their cuts: fold them in first.
    op.execute(
        "UPDATE roots SET start = start - (SELECT COALESCE(SUM(length), 0) FROM index_cuts "
        'WHERE index_cuts.at < roots.start), "end" = "end" - (SELECT COALESCE(SUM(length), 0) '
        "FROM index_cuts WHERE index_cuts.at < roots.start)"
    )
    op.drop_table("index_cuts")
