"""Record every verify and what it found; the deep lap's cursor lives in `meta`

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from refcount.db.tables import DIGEST, TZDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "verify_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", TZDateTime(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("deep", sa.Boolean(), nullable=False),
        sa.Column("sliced", sa.Boolean(), nullable=False),
        sa.Column("checked", sa.Integer(), nullable=False),
        sa.Column("after", DIGEST, nullable=True),
        sa.Column("through", DIGEST, nullable=True),
        sa.Column("lap_started", TZDateTime(), nullable=True),
        sa.Column("lap_done", sa.Integer(), nullable=True),
        sa.Column("lap_total", sa.Integer(), nullable=True),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("drift", sa.Integer(), nullable=False),
        sa.Column("missing", sa.Integer(), nullable=False),
        sa.Column("corrupt", sa.Integer(), nullable=False),
        sa.Column("orphans", sa.Integer(), nullable=False),
        sa.Column("problems", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verify_runs")),
    )
    op.create_index("ix_verify_runs_deep_id", "verify_runs", ["deep", "id"])
    op.create_table(
        "verify_findings",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("digest", DIGEST, nullable=True),
        sa.Column("detail", sa.String(1000), nullable=False),
        sa.Column("tags", sa.String(1000), nullable=False),
        sa.ForeignKeyConstraint(
            ["run"],
            ["verify_runs.id"],
            name=op.f("fk_verify_findings_run_verify_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verify_findings")),
    )
    op.create_index(op.f("ix_verify_findings_run"), "verify_findings", ["run"])


def downgrade() -> None:
    op.drop_table("verify_findings")
    op.drop_table("verify_runs")
