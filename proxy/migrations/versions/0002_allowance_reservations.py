"""Trial allowance reservations: tokens held by platform-key requests in flight.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trial_allowance") as batch:
        batch.add_column(sa.Column("reserved", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("trial_allowance") as batch:
        batch.drop_column("reserved")
