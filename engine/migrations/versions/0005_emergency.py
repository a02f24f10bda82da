"""same-day emergency proposals

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa
import engine.db


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'emergency_requests',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('patient_id', sa.Integer(), nullable=False),
        sa.Column('appointment_type', sa.String(length=32), nullable=False),
        sa.Column('duration_minutes', sa.Integer(), nullable=False),
        sa.Column('earliest', engine.db.UTCDateTime(), nullable=False),
        sa.Column('latest_start', engine.db.UTCDateTime(), nullable=False),
        sa.Column('provider_id', sa.Integer(), nullable=True),
        sa.Column('specialty', sa.String(length=64), nullable=False),
        sa.Column('location_id', sa.Integer(), nullable=True),
        sa.Column('reason', sa.String(length=400), nullable=False),
        sa.Column('notes', sa.Text(), nullable=False),
        sa.Column('placer_id', sa.String(length=100), nullable=True),
        sa.Column('requested_by', sa.String(length=100), nullable=False),
        sa.Column('source', sa.String(length=200), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('appointment_id', sa.Integer(), nullable=True),
        sa.Column('explanation', sa.JSON(), nullable=False),
        sa.Column('created_at', engine.db.UTCDateTime(), nullable=False),
        sa.Column('updated_at', engine.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['appointment_id'], ['appointments.id'],
                                name=op.f('fk_emergency_requests_appointment_id_appointments')),
        sa.ForeignKeyConstraint(['location_id'], ['locations.id'],
                                name=op.f('fk_emergency_requests_location_id_locations')),
        sa.ForeignKeyConstraint(['patient_id'], ['patients.id'],
                                name=op.f('fk_emergency_requests_patient_id_patients')),
        sa.ForeignKeyConstraint(['provider_id'], ['providers.id'],
                                name=op.f('fk_emergency_requests_provider_id_providers')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_emergency_requests')),
    )
    op.create_index(op.f('ix_emergency_requests_patient_id'), 'emergency_requests', ['patient_id'], unique=False)
    op.create_index(op.f('ix_emergency_requests_placer_id'), 'emergency_requests', ['placer_id'], unique=False)
    op.create_index(op.f('ix_emergency_requests_status'), 'emergency_requests', ['status'], unique=False)

    op.create_table(
        'emergency_proposals',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('request_id', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('urgent', sa.JSON(), nullable=False),
        sa.Column('patients_moved', sa.Integer(), nullable=False),
        sa.Column('delays_minutes', sa.JSON(), nullable=False),
        sa.Column('candidates', sa.JSON(), nullable=False),
        sa.Column('explanation', sa.JSON(), nullable=False),
        sa.Column('needs_approval', sa.Boolean(), nullable=False),
        sa.Column('decided_by', sa.String(length=100), nullable=False),
        sa.Column('decided_at', engine.db.UTCDateTime(), nullable=True),
        sa.Column('decision_reason', sa.Text(), nullable=False),
        sa.Column('applied_at', engine.db.UTCDateTime(), nullable=True),
        sa.Column('created_at', engine.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['request_id'], ['emergency_requests.id'],
                                name=op.f('fk_emergency_proposals_request_id_emergency_requests')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_emergency_proposals')),
    )
    op.create_index(op.f('ix_emergency_proposals_request_id'), 'emergency_proposals', ['request_id'], unique=False)
    op.create_index(op.f('ix_emergency_proposals_status'), 'emergency_proposals', ['status'], unique=False)

    op.create_table(
        'emergency_moves',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('proposal_id', sa.Integer(), nullable=False),
        sa.Column('appointment_id', sa.Integer(), nullable=False),
        sa.Column('patient_id', sa.Integer(), nullable=False),
        sa.Column('action', sa.String(length=16), nullable=False),
        sa.Column('from_start', engine.db.UTCDateTime(), nullable=False),
        sa.Column('from_provider_id', sa.Integer(), nullable=True),
        sa.Column('to_start', engine.db.UTCDateTime(), nullable=True),
        sa.Column('to_provider_id', sa.Integer(), nullable=True),
        sa.Column('to_slot_id', sa.Integer(), nullable=True),
        sa.Column('delay_minutes', sa.Float(), nullable=True),
        sa.Column('alternatives', sa.JSON(), nullable=False),
        sa.Column('why', sa.Text(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('applied_at', engine.db.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(['appointment_id'], ['appointments.id'],
                                name=op.f('fk_emergency_moves_appointment_id_appointments')),
        sa.ForeignKeyConstraint(['from_provider_id'], ['providers.id'],
                                name=op.f('fk_emergency_moves_from_provider_id_providers')),
        sa.ForeignKeyConstraint(['patient_id'], ['patients.id'],
                                name=op.f('fk_emergency_moves_patient_id_patients')),
        sa.ForeignKeyConstraint(['proposal_id'], ['emergency_proposals.id'],
                                name=op.f('fk_emergency_moves_proposal_id_emergency_proposals')),
        sa.ForeignKeyConstraint(['to_provider_id'], ['providers.id'],
                                name=op.f('fk_emergency_moves_to_provider_id_providers')),
        sa.ForeignKeyConstraint(['to_slot_id'], ['slots.id'], name=op.f('fk_emergency_moves_to_slot_id_slots')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_emergency_moves')),
    )
    op.create_index(op.f('ix_emergency_moves_appointment_id'), 'emergency_moves', ['appointment_id'], unique=False)
    op.create_index(op.f('ix_emergency_moves_applied_at'), 'emergency_moves', ['applied_at'], unique=False)
    op.create_index(op.f('ix_emergency_moves_patient_id'), 'emergency_moves', ['patient_id'], unique=False)
    op.create_index(op.f('ix_emergency_moves_proposal_id'), 'emergency_moves', ['proposal_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_emergency_moves_proposal_id'), table_name='emergency_moves')
    op.drop_index(op.f('ix_emergency_moves_patient_id'), table_name='emergency_moves')
    op.drop_index(op.f('ix_emergency_moves_applied_at'), table_name='emergency_moves')
    op.drop_index(op.f('ix_emergency_moves_appointment_id'), table_name='emergency_moves')
    op.drop_table('emergency_moves')
    op.drop_index(op.f('ix_emergency_proposals_status'), table_name='emergency_proposals')
    op.drop_index(op.f('ix_emergency_proposals_request_id'), table_name='emergency_proposals')
    op.drop_table('emergency_proposals')
    op.drop_index(op.f('ix_emergency_requests_status'), table_name='emergency_requests')
    op.drop_index(op.f('ix_emergency_requests_placer_id'), table_name='emergency_requests')
    op.drop_index(op.f('ix_emergency_requests_patient_id'), table_name='emergency_requests')
    op.drop_table('emergency_requests')
