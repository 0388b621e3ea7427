"""Replicas: each running serving process, the master key ids it can decrypt, and when
it was last seen (`rotate-keys` refuses while a live one lacks the new key).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(120), primary_key=True),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("key_ids", sa.Text(), nullable=False),
        sa.Column("primary_key_id", sa.String(8), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_replicas_last_seen", "replicas", ["last_seen"])


def downgrade() -> None:
    op.drop_index("ix_replicas_last_seen", "replicas")
    op.drop_table("replicas")
