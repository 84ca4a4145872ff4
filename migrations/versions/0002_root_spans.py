"""Byte spans of index.json entries, so deletes cut entries without parsing the file

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

Existing rows get no span; forgetting the recorded index.json hash makes the next
start re-read index.json once and record every span (the roots themselves are
kept, so the counts are not touched).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("roots", schema=None) as batch_op:
        batch_op.add_column(sa.Column("start", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("end", sa.BigInteger(), nullable=True))
        batch_op.create_index(batch_op.f("ix_roots_start"), ["start"], unique=False)
    op.execute("DELETE FROM meta WHERE key = 'index_hash'")


def downgrade() -> None:
    with op.batch_alter_table("roots", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_roots_start"))
        batch_op.drop_column("end")
        batch_op.drop_column("start")
