"""usage_events (the RecordUsage outbox), charges (CreateCharge intents) and credit_mirror_batches (our consumptions
of Dodo-linked credits on their way to Dodo's ledger)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)
_NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "usage_events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("event_name", sa.Text(), nullable=False),
        sa.Column("occurred_at", _TS, nullable=False),
        sa.Column("properties", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("recorded_at", _TS, server_default=_NOW, nullable=False),
        sa.Column("sent_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_events")),
        sa.UniqueConstraint("customer_id", "event_id", name=op.f("uq_usage_events_customer_id")),
    )
    op.create_index(
        "ix_usage_events_pending", "usage_events", ["occurred_at"], postgresql_where=sa.text("status = 'pending'")
    )
    op.create_index("ix_usage_events_customer_name_time", "usage_events", ["customer_id", "event_name", "occurred_at"])
    op.create_table(
        "charges",
        sa.Column("charge_id", sa.Text(), nullable=False),
        sa.Column("caller", sa.Text(), server_default="", nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("subscription_id", sa.Text(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.Text(), server_default="", nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("metadata", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("payment_id", sa.Text(), nullable=True),
        sa.Column("error_code", sa.Text(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("lease_until", _TS, nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", _TS, server_default=_NOW, nullable=False),
        sa.Column("updated_at", _TS, server_default=_NOW, nullable=False),
        sa.PrimaryKeyConstraint("charge_id", name=op.f("pk_charges")),
        sa.UniqueConstraint("caller", "idempotency_key", name=op.f("uq_charges_caller")),
    )
    op.create_index(op.f("ix_charges_subscription_id"), "charges", ["subscription_id"])
    op.create_index(op.f("ix_charges_payment_id"), "charges", ["payment_id"])
    op.create_table(
        "credit_mirror_batches",
        sa.Column("batch_id", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("credit", sa.Text(), nullable=False),
        sa.Column("credit_entitlement_id", sa.Text(), nullable=False),
        sa.Column("amount", sa.Numeric(), server_default="0", nullable=False),
        sa.Column("status", sa.Text(), server_default="open", nullable=False),
        sa.Column("dodo_entry_id", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, server_default=_NOW, nullable=False),
        sa.Column("closed_at", _TS, nullable=True),
        sa.Column("sent_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("batch_id", name=op.f("pk_credit_mirror_batches")),
        sa.UniqueConstraint("dodo_entry_id", name=op.f("uq_credit_mirror_batches_dodo_entry_id")),
    )
    op.create_index(
        "uq_credit_mirror_batches_open",
        "credit_mirror_batches",
        ["customer_id", "credit"],
        unique=True,
        postgresql_where=sa.text("status = 'open'"),
    )


def downgrade() -> None:
    op.drop_index("uq_credit_mirror_batches_open", table_name="credit_mirror_batches")
    op.drop_table("credit_mirror_batches")
    op.drop_index(op.f("ix_charges_payment_id"), table_name="charges")
    op.drop_index(op.f("ix_charges_subscription_id"), table_name="charges")
    op.drop_table("charges")
    op.drop_index("ix_usage_events_customer_name_time", table_name="usage_events")
    op.drop_index("ix_usage_events_pending", table_name="usage_events")
    op.drop_table("usage_events")
