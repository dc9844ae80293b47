"""flagged clips: the audio of alerts' ranges, kept with --keep-flagged-audio

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('flagged_clips',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('call', sa.String(length=64), nullable=False),
    sa.Column('speaker', sa.String(length=64), nullable=False),
    sa.Column('alert_start', sa.Float(), nullable=False),
    sa.Column('start', sa.Float(), nullable=False),
    sa.Column('end', sa.Float(), nullable=False),
    sa.Column('sample_rate', sa.Integer(), nullable=False),
    sa.Column('wav', sa.LargeBinary(), nullable=False),
    sa.Column('kept_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['call'], ['calls.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('call', 'speaker', 'alert_start')
    )
    with op.batch_alter_table('flagged_clips', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_flagged_clips_call'), ['call'], unique=False)
        batch_op.create_index(batch_op.f('ix_flagged_clips_kept_at'), ['kept_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('flagged_clips', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_flagged_clips_kept_at'))
        batch_op.drop_index(batch_op.f('ix_flagged_clips_call'))
    op.drop_table('flagged_clips')
