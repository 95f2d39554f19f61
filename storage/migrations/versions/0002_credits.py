"""credits

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "credit_balances",
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("credit", sa.Text(), nullable=False),
        sa.Column("balance", sa.Numeric(), server_default="0", nullable=False),
        sa.Column("grants", postgresql.JSONB(astext_type=sa.Text()), server_default="[]", nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("customer_id", "credit", name=op.f("pk_credit_balances")),
    )
    op.create_table(
        "credit_ledger",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("entry_id", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("credit", sa.Text(), nullable=False),
        sa.Column("amount", sa.Numeric(), nullable=False),
        sa.Column("balance_after", sa.Numeric(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), server_default="", nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("fingerprint", sa.Text(), nullable=True),
        sa.Column("dodo_entry_id", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("metadata", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_ledger")),
        sa.UniqueConstraint("entry_id", name=op.f("uq_credit_ledger_entry_id")),
    )
    op.create_index("ix_credit_ledger_account", "credit_ledger", ["customer_id", "credit", "id"], unique=False)
    op.create_index(
        "uq_credit_ledger_dodo_entry_id",
        "credit_ledger",
        ["dodo_entry_id"],
        unique=True,
        postgresql_where=sa.text("dodo_entry_id IS NOT NULL"),
    )
    op.create_index(
        "uq_credit_ledger_idempotency",
        "credit_ledger",
        ["customer_id", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_table(
        "credit_period_grants",
        sa.Column("subscription_id", sa.Text(), nullable=False),
        sa.Column("credit", sa.Text(), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("amount", sa.Numeric(), nullable=False),
        sa.Column("granted_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("subscription_id", "credit", "period_start", name=op.f("pk_credit_period_grants")),
    )


def downgrade() -> None:

    op.drop_table("credit_period_grants")
    op.drop_index(
        "uq_credit_ledger_idempotency",
        table_name="credit_ledger",
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.drop_index(
        "uq_credit_ledger_dodo_entry_id",
        table_name="credit_ledger",
        postgresql_where=sa.text("dodo_entry_id IS NOT NULL"),
    )
    op.drop_index("ix_credit_ledger_account", table_name="credit_ledger")
    op.drop_table("credit_ledger")
    op.drop_table("credit_balances")
