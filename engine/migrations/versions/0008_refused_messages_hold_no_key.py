"""a refused message holds no key: (sender, control id) unique among accepted messages

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

_ACCEPTED = sa.text("status != 'refused'")


def upgrade() -> None:
    with op.batch_alter_table('inbound_messages', schema=None) as batch_op:
        batch_op.drop_constraint('uq_inbound_messages_sender_control_id', type_='unique')
        batch_op.create_index('ix_inbound_messages_sender_control_id', ['sender', 'control_id'], unique=False)
        batch_op.create_index('uq_inbound_messages_accepted_key', ['sender', 'control_id'], unique=True,
                              sqlite_where=_ACCEPTED, postgresql_where=_ACCEPTED)


def downgrade() -> None:
    # the key unique again: a refused message gives way to the accepted one, or the earliest refused one
    op.execute("DELETE FROM inbound_messages WHERE status = 'refused' AND EXISTS (SELECT 1 FROM inbound_messages "
               "AS other WHERE other.sender = inbound_messages.sender AND other.control_id = inbound_messages.control_id "
               "AND (other.status != 'refused' OR other.id < inbound_messages.id))")
    with op.batch_alter_table('inbound_messages', schema=None) as batch_op:
        batch_op.drop_index('uq_inbound_messages_accepted_key')
        batch_op.drop_index('ix_inbound_messages_sender_control_id')
        batch_op.create_unique_constraint('uq_inbound_messages_sender_control_id', ['sender', 'control_id'])
