"""customer_refs (the company's own customer ids) and checkout_sessions (CreateCheckout idempotency)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "customer_refs",
        sa.Column("customer_ref", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("linked_by", sa.Text(), nullable=False),
        sa.Column("created_at", _TS, server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", _TS, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("customer_ref", name=op.f("pk_customer_refs")),
    )
    op.create_index(op.f("ix_customer_refs_customer_id"), "customer_refs", ["customer_id"])
    op.create_table(
        "checkout_sessions",
        sa.Column("caller", sa.Text(), server_default="", nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("lease_until", _TS, nullable=True),
        sa.Column("session_id", sa.Text(), nullable=True),
        sa.Column("checkout_url", sa.Text(), nullable=True),
        sa.Column("expires_at", _TS, nullable=True),
        sa.Column("customer_ref", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", _TS, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("caller", "idempotency_key", name=op.f("pk_checkout_sessions")),
    )


def downgrade() -> None:
    op.drop_table("checkout_sessions")
    op.drop_index(op.f("ix_customer_refs_customer_id"), table_name="customer_refs")
    op.drop_table("customer_refs")
