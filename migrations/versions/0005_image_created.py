"""Cache when each root manifest's image was made, for retention (prune)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from refcount.db.tables import TZDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "image_created",
        sa.Column("digest", sa.String(200), nullable=False),
        sa.Column("created", TZDateTime(), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_image_created")),
    )


def downgrade() -> None:
    op.drop_table("image_created")
