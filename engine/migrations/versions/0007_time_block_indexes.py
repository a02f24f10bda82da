"""time blocks indexed by calendar and start

Revision ID: 0007
Revises: 0006
"""
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('time_blocks', schema=None) as batch_op:
        batch_op.create_index('ix_time_blocks_provider_start', ['provider_id', 'start'], unique=False)
        batch_op.create_index('ix_time_blocks_resource_start', ['resource_id', 'start'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('time_blocks', schema=None) as batch_op:
        batch_op.drop_index('ix_time_blocks_resource_start')
        batch_op.drop_index('ix_time_blocks_provider_start')
