"""show probability, overbooking and patient flow

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa
import engine.db


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    _upgrade_flow()
    _upgrade_noshow()


def downgrade() -> None:
    _downgrade_noshow()
    _downgrade_flow()


# --- patient flow (plugins/flow.py): running-late decisions, their notices, and the
# index arrival smoothing counts arrivals with -------------------------------------------


def _upgrade_flow() -> None:
    op.create_table(
        'flow_delays',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('provider_id', sa.Integer(), nullable=False),
        sa.Column('location_id', sa.Integer(), nullable=True),
        sa.Column('local_day', sa.Date(), nullable=False),
        sa.Column('trigger', sa.String(length=16), nullable=False),
        sa.Column('trigger_appointment_id', sa.Integer(), nullable=True),
        sa.Column('observed_minutes', sa.Integer(), nullable=False),
        sa.Column('actor', sa.String(length=100), nullable=False),
        sa.Column('explanation', sa.Text(), nullable=False),
        sa.Column('estimates', sa.JSON(), nullable=False),
        sa.Column('created_at', engine.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['location_id'], ['locations.id'], name=op.f('fk_flow_delays_location_id_locations')),
        sa.ForeignKeyConstraint(['provider_id'], ['providers.id'], name=op.f('fk_flow_delays_provider_id_providers')),
        sa.ForeignKeyConstraint(['trigger_appointment_id'], ['appointments.id'],
                                name=op.f('fk_flow_delays_trigger_appointment_id_appointments')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_flow_delays')),
    )
    op.create_index('ix_flow_delays_provider_day', 'flow_delays', ['provider_id', 'local_day'], unique=False)

    op.create_table(
        'flow_notices',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('delay_id', sa.Integer(), nullable=False),
        sa.Column('appointment_id', sa.Integer(), nullable=False),
        sa.Column('patient_id', sa.Integer(), nullable=True),
        sa.Column('scheduled_start', engine.db.UTCDateTime(), nullable=False),
        sa.Column('estimated_start', engine.db.UTCDateTime(), nullable=False),
        sa.Column('suggested_arrival', engine.db.UTCDateTime(), nullable=False),
        sa.Column('delay_minutes', sa.Integer(), nullable=False),
        sa.Column('channel', sa.String(length=16), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('offer_slot_id', sa.Integer(), nullable=True),
        sa.Column('offer_start', engine.db.UTCDateTime(), nullable=True),
        sa.Column('offer_end', engine.db.UTCDateTime(), nullable=True),
        sa.Column('offer_status', sa.String(length=16), nullable=False),
        sa.Column('responded_at', engine.db.UTCDateTime(), nullable=True),
        sa.Column('created_at', engine.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['appointment_id'], ['appointments.id'],
                                name=op.f('fk_flow_notices_appointment_id_appointments')),
        sa.ForeignKeyConstraint(['delay_id'], ['flow_delays.id'], name=op.f('fk_flow_notices_delay_id_flow_delays')),
        sa.ForeignKeyConstraint(['offer_slot_id'], ['slots.id'], name=op.f('fk_flow_notices_offer_slot_id_slots')),
        sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], name=op.f('fk_flow_notices_patient_id_patients')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_flow_notices')),
    )
    op.create_index(op.f('ix_flow_notices_appointment_id'), 'flow_notices', ['appointment_id'], unique=False)
    op.create_index(op.f('ix_flow_notices_delay_id'), 'flow_notices', ['delay_id'], unique=False)

    op.create_index('ix_appointments_location_start', 'appointments', ['location_id', 'start'], unique=False)


def _downgrade_flow() -> None:
    op.drop_index('ix_appointments_location_start', table_name='appointments')
    op.drop_index(op.f('ix_flow_notices_delay_id'), table_name='flow_notices')
    op.drop_index(op.f('ix_flow_notices_appointment_id'), table_name='flow_notices')
    op.drop_table('flow_notices')
    op.drop_index('ix_flow_delays_provider_day', table_name='flow_delays')
    op.drop_table('flow_delays')


# --- no-show-aware overbooking (plugins/noshow.py): model fits, each appointment's
# show estimate, and overbooking decisions ---------------------------------------------


def _upgrade_noshow() -> None:
    op.create_table(
        'show_models',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('fitted_at', engine.db.UTCDateTime(), nullable=False),
        sa.Column('history_from', engine.db.UTCDateTime(), nullable=False),
        sa.Column('history_to', engine.db.UTCDateTime(), nullable=False),
        sa.Column('sample_size', sa.Integer(), nullable=False),
        sa.Column('no_shows', sa.Integer(), nullable=False),
        sa.Column('coefficients', sa.JSON(), nullable=False),
        sa.Column('standard_errors', sa.JSON(), nullable=False),
        sa.Column('prior', sa.JSON(), nullable=False),
        sa.Column('prior_weight', sa.Float(), nullable=False),
        sa.Column('iterations', sa.Integer(), nullable=False),
        sa.Column('converged', sa.Boolean(), nullable=False),
        sa.Column('log_loss', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_show_models')),
    )
    op.create_table(
        'show_estimates',
        sa.Column('appointment_id', sa.Integer(), nullable=False),
        sa.Column('probability', sa.Float(), nullable=False),
        sa.Column('reasons', sa.JSON(), nullable=False),
        sa.Column('features', sa.JSON(), nullable=False),
        sa.Column('model_id', sa.Integer(), nullable=True),
        sa.Column('estimated_at', engine.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['appointment_id'], ['appointments.id'],
                                name=op.f('fk_show_estimates_appointment_id_appointments')),
        sa.ForeignKeyConstraint(['model_id'], ['show_models.id'], name=op.f('fk_show_estimates_model_id_show_models')),
        sa.PrimaryKeyConstraint('appointment_id', name=op.f('pk_show_estimates')),
    )
    op.create_table(
        'overbook_decisions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('appointment_id', sa.Integer(), nullable=False),
        sa.Column('slot_id', sa.Integer(), nullable=False),
        sa.Column('provider_id', sa.Integer(), nullable=True),
        sa.Column('block_start', engine.db.UTCDateTime(), nullable=False),
        sa.Column('block_end', engine.db.UTCDateTime(), nullable=False),
        sa.Column('expected_present', sa.Float(), nullable=False),
        sa.Column('expected_overtime_minutes', sa.Float(), nullable=False),
        sa.Column('decision', sa.JSON(), nullable=False),
        sa.Column('decided_at', engine.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['appointment_id'], ['appointments.id'],
                                name=op.f('fk_overbook_decisions_appointment_id_appointments')),
        sa.ForeignKeyConstraint(['provider_id'], ['providers.id'], name=op.f('fk_overbook_decisions_provider_id_providers')),
        sa.ForeignKeyConstraint(['slot_id'], ['slots.id'], name=op.f('fk_overbook_decisions_slot_id_slots')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_overbook_decisions')),
    )
    op.create_index(op.f('ix_overbook_decisions_appointment_id'), 'overbook_decisions', ['appointment_id'], unique=False)


def _downgrade_noshow() -> None:
    op.drop_index(op.f('ix_overbook_decisions_appointment_id'), table_name='overbook_decisions')
    op.drop_table('overbook_decisions')
    op.drop_table('show_estimates')
    op.drop_table('show_models')
