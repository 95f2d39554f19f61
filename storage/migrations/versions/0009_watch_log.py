"""the watch log (WatchEntitlements): watch_pending filled by triggers in every changing transaction, watch_events
numbered in commit order by the sequencer, watch_head

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)

# The triggers record each change in the transaction that makes it, whatever code path writes (a webhook, an RPC,
# the reconcile CLI, a later migration): the log cannot miss a committed change, nor hold one that rolled back.
_TRIGGERS = """
CREATE FUNCTION watch_subscription_state(s subscriptions) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT (to_jsonb(s) - 'payload' - 'metadata')
        || jsonb_build_object('customer_email', s.payload->'customer'->>'email',
                              'customer_name', s.payload->'customer'->>'name')
$$;

CREATE FUNCTION watch_subscription_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO watch_pending (subject, customer_id, subscription_id, old_state, new_state)
    VALUES ('subscription', NEW.customer_id, NEW.subscription_id,
            CASE WHEN TG_OP = 'UPDATE' THEN watch_subscription_state(OLD) END, watch_subscription_state(NEW));
    RETURN NULL;
END
$$;

CREATE TRIGGER watch_subscriptions AFTER INSERT OR UPDATE ON subscriptions
FOR EACH ROW EXECUTE FUNCTION watch_subscription_changed();

CREATE FUNCTION watch_balance_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO watch_pending (subject, customer_id, credit, old_balance, new_balance)
    VALUES ('credit', NEW.customer_id, NEW.credit, CASE WHEN TG_OP = 'UPDATE' THEN OLD.balance END, NEW.balance);
    RETURN NULL;
END
$$;

CREATE TRIGGER watch_balances_insert AFTER INSERT ON credit_balances
FOR EACH ROW EXECUTE FUNCTION watch_balance_changed();

CREATE TRIGGER watch_balances_update AFTER UPDATE ON credit_balances
FOR EACH ROW WHEN (OLD.balance IS DISTINCT FROM NEW.balance) EXECUTE FUNCTION watch_balance_changed();

CREATE FUNCTION watch_link_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO watch_pending (subject, customer_id, customer_ref) VALUES ('link', NEW.customer_id, NEW.customer_ref);
    RETURN NULL;
END
$$;

CREATE TRIGGER watch_links_insert AFTER INSERT ON customer_refs
FOR EACH ROW EXECUTE FUNCTION watch_link_changed();

CREATE TRIGGER watch_links_update AFTER UPDATE ON customer_refs
FOR EACH ROW WHEN (OLD.customer_id IS DISTINCT FROM NEW.customer_id) EXECUTE FUNCTION watch_link_changed();
"""

_DROP_TRIGGERS = """
DROP TRIGGER watch_links_update ON customer_refs;

DROP TRIGGER watch_links_insert ON customer_refs;

DROP FUNCTION watch_link_changed();

DROP TRIGGER watch_balances_update ON credit_balances;

DROP TRIGGER watch_balances_insert ON credit_balances;

DROP FUNCTION watch_balance_changed();

DROP TRIGGER watch_subscriptions ON subscriptions;

DROP FUNCTION watch_subscription_changed();

DROP FUNCTION watch_subscription_state(subscriptions);
"""


def _statements(script: str) -> list[str]:
    """One statement per execute (the driver prepares each); statements are separated by a blank line."""
    return [part.strip() for part in script.split("\n\n") if part.strip()]


def upgrade() -> None:
    op.create_table(
        "watch_pending",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("subscription_id", sa.Text(), nullable=True),
        sa.Column("credit", sa.Text(), nullable=True),
        sa.Column("customer_ref", sa.Text(), nullable=True),
        sa.Column("old_balance", sa.Numeric(), nullable=True),
        sa.Column("new_balance", sa.Numeric(), nullable=True),
        sa.Column("old_state", postgresql.JSONB(), nullable=True),
        sa.Column("new_state", postgresql.JSONB(), nullable=True),
        sa.Column("occurred_at", _TS, server_default=sa.text("clock_timestamp()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_watch_pending")),
    )
    op.create_table(
        "watch_events",
        sa.Column("position", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("customer_ref", sa.Text(), nullable=True),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("subscription", postgresql.JSONB(), nullable=True),
        sa.Column("credit", sa.Text(), nullable=True),
        sa.Column("balance", sa.Numeric(), nullable=True),
        sa.Column("threshold", sa.Numeric(), nullable=True),
        sa.Column("occurred_at", _TS, nullable=False),
        sa.Column("sequenced_at", _TS, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("position", name=op.f("pk_watch_events")),
    )
    op.create_index("ix_watch_events_customer", "watch_events", ["customer_id", "position"])
    op.create_index("ix_watch_events_sequenced_at", "watch_events", ["sequenced_at"])
    op.create_table(
        "watch_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("epoch", sa.Text(), nullable=False),
        sa.Column("position", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pruned_through", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("clock_through", _TS, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_watch_head")),
    )
    op.execute("INSERT INTO watch_head (id, epoch) VALUES (1, substr(md5(random()::text || clock_timestamp()), 1, 12))")
    op.create_index(
        "ix_credit_ledger_grants",
        "credit_ledger",
        ["customer_id", "credit", "id"],
        postgresql_where=sa.text("amount > 0"),
    )
    for statement in _statements(_TRIGGERS):
        op.execute(statement)


def downgrade() -> None:
    for statement in _statements(_DROP_TRIGGERS):
        op.execute(statement)
    op.drop_index("ix_credit_ledger_grants", table_name="credit_ledger")
    op.drop_table("watch_head")
    op.drop_index("ix_watch_events_sequenced_at", table_name="watch_events")
    op.drop_index("ix_watch_events_customer", table_name="watch_events")
    op.drop_table("watch_events")
    op.drop_table("watch_pending")
