"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-24

Blobs with their counts and states, the edges of live parents, the roots of
index.json, the journal of pending file actions, and small facts (meta).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import refcount.db.tables

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('blobs',
    sa.Column('digest', sa.String(length=200), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=True),
    sa.Column('media_type', sa.String(length=255), nullable=True),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('expanded', sa.Boolean(), nullable=False),
    sa.Column('subject', sa.String(length=200), nullable=True),
    sa.Column('problem', sa.String(length=1000), nullable=True),
    sa.Column('first_seen', refcount.db.tables.TZDateTime(), nullable=False),
    sa.Column('freed_at', refcount.db.tables.TZDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('digest', name=op.f('pk_blobs'))
    )
    with op.batch_alter_table('blobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_blobs_subject'), ['subject'], unique=False)

    op.create_table('edges',
    sa.Column('parent', sa.String(length=200), nullable=False),
    sa.Column('child', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.PrimaryKeyConstraint('parent', 'child', name=op.f('pk_edges'))
    )
    with op.batch_alter_table('edges', schema=None) as batch_op:
        batch_op.create_index('ix_edges_child', ['child'], unique=False)

    op.create_table('meta',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=200), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_meta'))
    )
    op.create_table('pending_actions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('digest', sa.String(length=200), nullable=False),
    sa.Column('created', refcount.db.tables.TZDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pending_actions'))
    )
    op.create_table('roots',
    sa.Column('position', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('digest', sa.String(length=200), nullable=False),
    sa.Column('tag', sa.String(length=1000), nullable=True),
    sa.Column('media_type', sa.String(length=255), nullable=True),
    sa.Column('size', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('position', name=op.f('pk_roots'))
    )
    with op.batch_alter_table('roots', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_roots_digest'), ['digest'], unique=False)
        batch_op.create_index(batch_op.f('ix_roots_tag'), ['tag'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('roots', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_roots_tag'))
        batch_op.drop_index(batch_op.f('ix_roots_digest'))

    op.drop_table('roots')
    op.drop_table('pending_actions')
    op.drop_table('meta')
    with op.batch_alter_table('edges', schema=None) as batch_op:
        batch_op.drop_index('ix_edges_child')

    op.drop_table('edges')
    with op.batch_alter_table('blobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_blobs_subject'))

    op.drop_table('blobs')
