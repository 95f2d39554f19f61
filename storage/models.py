"""Table definitions. Migrations under storage/migrations are written from these and checked against them."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Timestamp = DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Customer(Base):
    __tablename__ = "customers"

    customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    email: Mapped[str] = mapped_column(Text, default="", server_default="")
    name: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class Subscription(Base):
    """The latest applied Dodo snapshot of a subscription, plus what we derive from the event stream."""

    __tablename__ = "subscriptions"

    subscription_id: Mapped[str] = mapped_column(Text, primary_key=True)
    customer_id: Mapped[str] = mapped_column(Text, ForeignKey("customers.customer_id"), index=True)
    product_id: Mapped[str] = mapped_column(Text)
    # Stored as received: an unknown future status is kept and denies access.
    status: Mapped[str] = mapped_column(Text)
    quantity: Mapped[int] = mapped_column(Integer, default=1)
    currency: Mapped[str] = mapped_column(Text, default="", server_default="")
    recurring_pre_tax_amount: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    payment_frequency_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    payment_frequency_interval: Mapped[str] = mapped_column(Text, default="", server_default="")
    trial_period_days: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    dodo_created_at: Mapped[datetime] = mapped_column(Timestamp)
    previous_billing_date: Mapped[datetime | None] = mapped_column(Timestamp)
    next_billing_date: Mapped[datetime | None] = mapped_column(Timestamp)
    cancel_at_next_billing_date: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    cancelled_at: Mapped[datetime | None] = mapped_column(Timestamp)
    expires_at: Mapped[datetime | None] = mapped_column(Timestamp)
    past_due_ends_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # Envelope time of the first event that showed the current on_hold/past_due episode.
    on_hold_since: Mapped[datetime | None] = mapped_column(Timestamp)
    # Envelope time of the newest applied event that showed the subscription out of payment trouble: an older
    # on_hold event delivered late may move on_hold_since back, but never across this.
    hold_cleared_at: Mapped[datetime | None] = mapped_column(Timestamp)
    scheduled_change: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    credit_entitlement_cart: Mapped[list[Any]] = mapped_column(JSONB, default=list, server_default="[]")
    addons: Mapped[list[Any]] = mapped_column(JSONB, default=list, server_default="[]")
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, default=dict, server_default="{}")
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    # Envelope time of the newest applied event; older events are kept in the inbox but never regress state.
    last_event_at: Mapped[datetime] = mapped_column(Timestamp)
    # When a snapshot fetched from Dodo itself (ChangePlan, reconciliation) was last applied.
    refreshed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())

    __table_args__ = (Index("ix_subscriptions_status_next_billing_date", "status", "next_billing_date"),)


class WebhookInbox(Base):
    """Every verified delivery, once per webhook-id; the row and its state change commit together."""

    __tablename__ = "webhook_inbox"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    webhook_id: Mapped[str] = mapped_column(Text, unique=True)
    event_type: Mapped[str] = mapped_column(Text)
    event_timestamp: Mapped[datetime] = mapped_column(Timestamp)
    business_id: Mapped[str] = mapped_column(Text, default="", server_default="")
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    # applied | stale | recorded | ignored | duplicate_entry | mirror_echo (service/app/webhook_ingest.py: Outcome)
    status: Mapped[str] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    subject_id: Mapped[str | None] = mapped_column(Text, index=True)
    received_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    processed_at: Mapped[datetime | None] = mapped_column(Timestamp)


class CreditBalance(Base):
    """One credit of one customer: the balance (sum of its ledger) and the grants that make it up (burn order)."""

    __tablename__ = "credit_balances"

    customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    credit: Mapped[str] = mapped_column(Text, primary_key=True)
    balance: Mapped[Decimal] = mapped_column(Numeric, default=Decimal(0), server_default="0")
    # [{grant_id, remaining, expires_at, source}]: small, and read under the same row lock as the balance.
    grants: Mapped[list[Any]] = mapped_column(JSONB, default=list, server_default="[]")
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class CreditLedgerEntry(Base):
    """Immutable: every change of a balance, with where it came from."""

    __tablename__ = "credit_ledger"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    entry_id: Mapped[str] = mapped_column(Text, unique=True)
    customer_id: Mapped[str] = mapped_column(Text)
    credit: Mapped[str] = mapped_column(Text)
    amount: Mapped[Decimal] = mapped_column(Numeric)
    balance_after: Mapped[Decimal] = mapped_column(Numeric)
    # consumption | plan_grant | grant_expiry | dodo_<transaction_type> (a mirrored Dodo entry, e.g. dodo_credit_added)
    kind: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text, default="", server_default="")
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    fingerprint: Mapped[str | None] = mapped_column(Text)
    dodo_entry_id: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, default="", server_default="")
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, default=dict, server_default="{}")
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())

    __table_args__ = (
        Index(
            "uq_credit_ledger_idempotency",
            "customer_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
        Index(
            "uq_credit_ledger_dodo_entry_id",
            "dodo_entry_id",
            unique=True,
            postgresql_where=text("dodo_entry_id IS NOT NULL"),
        ),
        Index("ix_credit_ledger_account", "customer_id", "credit", "id"),
        # The newest grant of an account, for a low-balance threshold given as a share of it.
        Index("ix_credit_ledger_grants", "customer_id", "credit", "id", postgresql_where=text("amount > 0")),
    )


class CreditPeriodGrant(Base):
    """Marks a plan's per-period grant as given, so each (subscription, credit, period) is granted once."""

    __tablename__ = "credit_period_grants"

    subscription_id: Mapped[str] = mapped_column(Text, primary_key=True)
    credit: Mapped[str] = mapped_column(Text, primary_key=True)
    period_start: Mapped[datetime] = mapped_column(Timestamp, primary_key=True)
    customer_id: Mapped[str] = mapped_column(Text)
    amount: Mapped[Decimal] = mapped_column(Numeric)
    granted_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class PlanChangeRequest(Base):
    """One ChangePlan idempotency key of one caller: made durable before Dodo is called, so a retry after a lost
    answer checks Dodo's state instead of sending the change a second time. Its rows for one subscription also
    tell whether another mutation of it is in flight (storage/repositories/plan_changes.py)."""

    __tablename__ = "plan_change_requests"

    # Keys are scoped per caller (the ENTITLEMENTS_CALLERS name; '' with auth off): two callers never collide.
    caller: Mapped[str] = mapped_column(Text, primary_key=True, server_default="")
    idempotency_key: Mapped[str] = mapped_column(Text, primary_key=True)
    subscription_id: Mapped[str] = mapped_column(Text, index=True)
    fingerprint: Mapped[str] = mapped_column(Text)
    # new | sending (an attempt is under way or died) | unknown (Dodo's answer was lost) | completed
    # (storage/repositories/plan_changes.py: PlanChangeStatus)
    status: Mapped[str] = mapped_column(Text)
    lease_until: Mapped[datetime | None] = mapped_column(Timestamp)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class CustomerRef(Base):
    """The company's own id for a customer, linked to a Dodo customer by a checkout's metadata, a webhook's metadata
    or LinkCustomer. A ref already linked moves only through LinkCustomer."""

    __tablename__ = "customer_refs"

    customer_ref: Mapped[str] = mapped_column(Text, primary_key=True)
    customer_id: Mapped[str] = mapped_column(Text, index=True)
    # checkout | webhook | link: what linked it last
    linked_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class CheckoutSessionRecord(Base):
    """One CreateCheckout idempotency key of one caller and the session Dodo opened for it (replayed on retry)."""

    __tablename__ = "checkout_sessions"

    caller: Mapped[str] = mapped_column(Text, primary_key=True, server_default="")
    idempotency_key: Mapped[str] = mapped_column(Text, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(Text)
    # sending (an attempt holds the lease, or died holding it) | created
    status: Mapped[str] = mapped_column(Text)
    lease_until: Mapped[datetime | None] = mapped_column(Timestamp)
    session_id: Mapped[str | None] = mapped_column(Text)
    checkout_url: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime | None] = mapped_column(Timestamp)
    customer_ref: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class UsageEvent(Base):
    """The usage outbox (RecordUsage): durable before the caller's answer, unique per (customer, event id), sent to
    Dodo's /events/ingest by the usage sender. `status`: pending | delivered | rejected (Dodo said no: 400/422) |
    expired (not deliverable within Dodo's 1 h window)."""

    __tablename__ = "usage_events"
    __table_args__ = (
        Index("ix_usage_events_pending", "occurred_at", postgresql_where=text("status = 'pending'")),
        Index("ix_usage_events_customer_name_time", "customer_id", "event_name", "occurred_at"),
        UniqueConstraint("customer_id", "event_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(Text)
    event_id: Mapped[str] = mapped_column(Text)
    event_name: Mapped[str] = mapped_column(Text)
    occurred_at: Mapped[datetime] = mapped_column(Timestamp)
    properties: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict, server_default=text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(Text, default="pending", server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    recorded_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    sent_at: Mapped[datetime | None] = mapped_column(Timestamp)


class ChargeRecord(Base):
    """One on-demand charge (CreateCharge): the intent row is written before Dodo is asked, so a lost answer is
    resolved from Dodo's payments (matching our charge_id in their metadata) before anything is sent again.
    `status`: sending | pending | succeeded | failed | unknown."""

    __tablename__ = "charges"
    __table_args__ = (UniqueConstraint("caller", "idempotency_key"),)

    charge_id: Mapped[str] = mapped_column(Text, primary_key=True)
    caller: Mapped[str] = mapped_column(Text, server_default="")
    idempotency_key: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(Text)
    subscription_id: Mapped[str] = mapped_column(Text, index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(Text, server_default="")
    description: Mapped[str] = mapped_column(Text, server_default="")
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, default=dict, server_default=text("'{}'::jsonb")
    )
    status: Mapped[str] = mapped_column(Text)
    payment_id: Mapped[str | None] = mapped_column(Text, index=True)
    error_code: Mapped[str | None] = mapped_column(Text)
    error_message: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime | None] = mapped_column(Timestamp)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class CreditMirrorBatch(Base):
    """Our consumptions of a Dodo-linked credit, summed per (customer, credit) into batches that are sent to
    Dodo's ledger as one debit each (the batch id as idempotency key). `status`: open (consumptions still add
    to it) | sending | sent (Dodo's entry id known) | unknown (answer lost: resolved from Dodo's ledger) | debt
    (Dodo refused it: retried after the next credit)."""

    __tablename__ = "credit_mirror_batches"
    __table_args__ = (
        Index(
            "uq_credit_mirror_batches_open",
            "customer_id",
            "credit",
            unique=True,
            postgresql_where=text("status = 'open'"),
        ),
    )

    batch_id: Mapped[str] = mapped_column(Text, primary_key=True)
    customer_id: Mapped[str] = mapped_column(Text)
    credit: Mapped[str] = mapped_column(Text)
    credit_entitlement_id: Mapped[str] = mapped_column(Text)
    amount: Mapped[Decimal] = mapped_column(Numeric, default=Decimal(0), server_default="0")
    status: Mapped[str] = mapped_column(Text, default="open", server_default="open")
    dodo_entry_id: Mapped[str | None] = mapped_column(Text, unique=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    closed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    sent_at: Mapped[datetime | None] = mapped_column(Timestamp)


class EntitlementChange(Base):
    """The change feed (see storage/repositories/changes.py). Unlogged: after a Postgres crash it is empty, but
    every replica's listener was cut too, and a cut listener clears its cache."""

    __tablename__ = "entitlement_changes"
    __table_args__ = {"prefixes": ["UNLOGGED"]}  # noqa: RUF012

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(Text)
    # all | credits | ref (a customer_ref's link changed; customer_id holds the ref) (storage/repositories/changes.py)
    scope: Mapped[str] = mapped_column(Text, default="all", server_default="all")
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class WatchPending(Base):
    """A change not yet placed in the watch log. Written by triggers on subscriptions, credit_balances and
    customer_refs in the changing transaction itself (storage/migrations/versions/0009_watch_log.py); the sequencer
    (service/app/watch_log.py) moves committed rows into watch_events in commit order."""

    __tablename__ = "watch_pending"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # subscription | credit | link
    subject: Mapped[str] = mapped_column(Text)
    customer_id: Mapped[str] = mapped_column(Text)
    subscription_id: Mapped[str | None] = mapped_column(Text)
    credit: Mapped[str | None] = mapped_column(Text)
    customer_ref: Mapped[str | None] = mapped_column(Text)
    old_balance: Mapped[Decimal | None] = mapped_column(Numeric)
    new_balance: Mapped[Decimal | None] = mapped_column(Numeric)
    old_state: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    new_state: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    occurred_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("clock_timestamp()"))


class WatchEvent(Base):
    """The watch log: every entitlement change, numbered gaplessly in commit order (WatchEntitlements)."""

    __tablename__ = "watch_events"
    __table_args__ = (
        Index("ix_watch_events_customer", "customer_id", "position"),
        Index("ix_watch_events_sequenced_at", "sequenced_at"),
    )

    position: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    customer_id: Mapped[str] = mapped_column(Text)
    customer_ref: Mapped[str | None] = mapped_column(Text)
    # SUBSCRIPTION_CHANGED | ACCESS_CHANGED | CREDITS_CHANGED | CREDITS_LOW | CREDITS_EXHAUSTED | CUSTOMER_LINKED
    kind: Mapped[str] = mapped_column(Text)
    subscription: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    credit: Mapped[str | None] = mapped_column(Text)
    balance: Mapped[Decimal | None] = mapped_column(Numeric)
    threshold: Mapped[Decimal | None] = mapped_column(Numeric)
    occurred_at: Mapped[datetime] = mapped_column(Timestamp)
    sequenced_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class WatchHead(Base):
    """One row: the last position given out, the lock that serializes the sequencers of every replica, how far
    the log has been pruned and how far time-driven changes have been emitted."""

    __tablename__ = "watch_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    # Names this log: a cursor from another database (or a reset one) is refused rather than misread.
    epoch: Mapped[str] = mapped_column(Text)
    position: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    pruned_through: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    clock_through: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
