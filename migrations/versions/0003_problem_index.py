"""A partial index on blobs.problem: every delete and gc asks whether a live manifest is damaged

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("blobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_blobs_problem",
            ["problem"],
            unique=False,
            sqlite_where=sa.text("problem IS NOT NULL"),
            postgresql_where=sa.text("problem IS NOT NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("blobs", schema=None) as batch_op:
        batch_op.drop_index("ix_blobs_problem")
