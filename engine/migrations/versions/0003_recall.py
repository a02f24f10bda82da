"""recall tickets; patient flags; deceased patients

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa
import engine.db


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deceased', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('deceased_at', engine.db.UTCDateTime(), nullable=True))

    op.create_table(
        'patient_flags',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('patient_id', sa.Integer(), nullable=False),
        sa.Column('flag', sa.String(length=64), nullable=False),
        sa.Column('source', sa.String(length=64), nullable=False),
        sa.Column('recorded_at', engine.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], name=op.f('fk_patient_flags_patient_id_patients')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_patient_flags')),
        sa.UniqueConstraint('patient_id', 'flag', name=op.f('uq_patient_flags_patient_id_flag')),
    )
    op.create_index(op.f('ix_patient_flags_patient_id'), 'patient_flags', ['patient_id'], unique=False)

    op.create_table(
        'recall_tickets',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('patient_id', sa.Integer(), nullable=False),
        sa.Column('rule', sa.String(length=64), nullable=False),
        sa.Column('dedupe_key', sa.String(length=200), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('anchor_appointment_id', sa.Integer(), nullable=True),
        sa.Column('due_date', sa.Date(), nullable=False),
        sa.Column('window_start', sa.Date(), nullable=False),
        sa.Column('window_end', sa.Date(), nullable=False),
        sa.Column('step', sa.Integer(), nullable=False),
        sa.Column('contacts', sa.Integer(), nullable=False),
        sa.Column('channels_used', sa.JSON(), nullable=False),
        sa.Column('next_action_at', engine.db.UTCDateTime(), nullable=True),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('closed_by_appointment_id', sa.Integer(), nullable=True),
        sa.Column('history', sa.JSON(), nullable=False),
        sa.Column('created_at', engine.db.UTCDateTime(), nullable=False),
        sa.Column('updated_at', engine.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['anchor_appointment_id'], ['appointments.id'],
                                name=op.f('fk_recall_tickets_anchor_appointment_id_appointments')),
        sa.ForeignKeyConstraint(['closed_by_appointment_id'], ['appointments.id'],
                                name=op.f('fk_recall_tickets_closed_by_appointment_id_appointments')),
        sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], name=op.f('fk_recall_tickets_patient_id_patients')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_recall_tickets')),
        sa.UniqueConstraint('dedupe_key', name=op.f('uq_recall_tickets_dedupe_key')),
    )
    op.create_index(op.f('ix_recall_tickets_patient_id'), 'recall_tickets', ['patient_id'], unique=False)
    op.create_index(op.f('ix_recall_tickets_closed_by_appointment_id'), 'recall_tickets',
                    ['closed_by_appointment_id'], unique=False)
    op.create_index('ix_recall_tickets_status_next_action', 'recall_tickets', ['status', 'next_action_at'],
                    unique=False)
    op.create_index('ix_recall_tickets_patient_rule', 'recall_tickets', ['patient_id', 'rule'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_recall_tickets_patient_rule', table_name='recall_tickets')
    op.drop_index('ix_recall_tickets_status_next_action', table_name='recall_tickets')
    op.drop_index(op.f('ix_recall_tickets_closed_by_appointment_id'), table_name='recall_tickets')
    op.drop_index(op.f('ix_recall_tickets_patient_id'), table_name='recall_tickets')
    op.drop_table('recall_tickets')
    op.drop_index(op.f('ix_patient_flags_patient_id'), table_name='patient_flags')
    op.drop_table('patient_flags')
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.drop_column('deceased_at')
        batch_op.drop_column('deceased')
