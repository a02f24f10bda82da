"""requests sent to the EHR in mirror mode, awaiting its SIU

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa
import engine.db


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
