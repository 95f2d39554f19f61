"""plan_change_requests.caller: ChangePlan idempotency keys are scoped per caller

The primary key becomes (caller, idempotency_key). Rows written before keep caller '' (the caller name when auth
is off). Downgrading fails, rather than dropping rows, when two callers have used the same key.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("plan_change_requests", sa.Column("caller", sa.Text(), server_default="", nullable=False))
    op.drop_constraint(op.f("pk_plan_change_requests"), "plan_change_requests", type_="primary")
    op.create_primary_key(op.f("pk_plan_change_requests"), "plan_change_requests", ["caller", "idempotency_key"])


def downgrade() -> None:
    op.drop_constraint(op.f("pk_plan_change_requests"), "plan_change_requests", type_="primary")
    op.create_primary_key(op.f("pk_plan_change_requests"), "plan_change_requests", ["idempotency_key"])
    op.drop_column("plan_change_requests", "caller")
