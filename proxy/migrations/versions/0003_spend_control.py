"""Spend control: policies on tenants and proxy keys, key names and expiry, the usage
ledger and budget spend.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _counter(name: str) -> sa.Column:
    return sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("policy", sa.Text(), nullable=True))
    with op.batch_alter_table("proxy_keys") as batch:
        batch.add_column(sa.Column("name", sa.String(200), nullable=True))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("policy", sa.Text(), nullable=True))
    op.create_table(
        "usage_ledger",
        sa.Column("tenant_id", sa.String(63), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("api_key_id", sa.String(40), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        *(
            _counter(c)
            for c in (
                "requests",
                "prompt_tokens",
                "completion_tokens",
                "cached_tokens",
                "cost_nanos",
                "unpriced",
            )
        ),
        sa.PrimaryKeyConstraint("tenant_id", "day", "api_key_id", "model"),
    )
    op.create_index("ix_usage_ledger_day", "usage_ledger", ["day"])
    op.create_table(
        "budget_spend",
        sa.Column("scope", sa.String(80), nullable=False),
        sa.Column("period", sa.String(5), nullable=False),
        sa.Column("start", sa.Date(), nullable=False),
        _counter("spent_nanos"),
        _counter("reserved_nanos"),
        sa.Column("warned_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("scope", "period", "start"),
    )


def downgrade() -> None:
    op.drop_table("budget_spend")
    op.drop_index("ix_usage_ledger_day", "usage_ledger")
    op.drop_table("usage_ledger")
    with op.batch_alter_table("proxy_keys") as batch:
        for name in ("policy", "last_used_at", "expires_at", "name"):
            batch.drop_column(name)
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("policy")
