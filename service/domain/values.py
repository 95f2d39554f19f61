"""Domain values shared by the gRPC service, the webhook receiver and storage.

Plain frozen dataclasses: no protobuf, no ORM. Storage maps rows to these, the servicer maps these to protobuf.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Protocol


class AccessReason(enum.StrEnum):
    ACTIVE = "ACTIVE"
    TRIALING = "TRIALING"
    CANCELLATION_SCHEDULED = "CANCELLATION_SCHEDULED"
    GRACE_PERIOD = "GRACE_PERIOD"
    NO_SUBSCRIPTION = "NO_SUBSCRIPTION"
    FEATURE_NOT_IN_PLAN = "FEATURE_NOT_IN_PLAN"
    SUBSCRIPTION_INACTIVE = "SUBSCRIPTION_INACTIVE"
    CREDITS_EXHAUSTED = "CREDITS_EXHAUSTED"
    STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"

    @property
    def grants(self) -> bool:
        return self in _GRANTING

    @property
    def code(self) -> str:
        """The contract's enum name (ACCESS_REASON_…), used as google.rpc.ErrorInfo reason."""
        return f"ACCESS_REASON_{self.value}"


_GRANTING = frozenset(
    {
        AccessReason.ACTIVE,
        AccessReason.TRIALING,
        AccessReason.CANCELLATION_SCHEDULED,
        AccessReason.GRACE_PERIOD,
    }
)


class FeatureKind(enum.StrEnum):
    BOOLEAN = "boolean"
    LIMIT = "limit"
    CREDIT = "credit"


@dataclass(frozen=True, slots=True)
class ScheduledChange:
    product_id: str
    quantity: int | None  # None when Dodo left it out (then it is the current quantity)
    effective_at: datetime | None


@dataclass(frozen=True, slots=True)
class CartCredit:
    """One row of a subscription's `credit_entitlement_cart`: which Dodo credit entitlements it carries."""

    credit_entitlement_id: str
    overage_enabled: bool
    overage_limit: Decimal | None


@dataclass(frozen=True, slots=True)
class Addon:
    addon_id: str
    quantity: int


class SubscriptionFacts(Protocol):
    """What the access and credit rules read of a subscription: a full `SubscriptionState` or the cache's lean
    `CachedSubscription` alike."""

    @property
    def subscription_id(self) -> str: ...
    @property
    def product_id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def trial_period_days(self) -> int: ...
    @property
    def next_billing_date(self) -> datetime | None: ...
    @property
    def cancel_at_next_billing_date(self) -> bool: ...
    @property
    def past_due_ends_at(self) -> datetime | None: ...
    @property
    def on_hold_since(self) -> datetime | None: ...
    @property
    def last_event_at(self) -> datetime | None: ...
    @property
    def credit_cart(self) -> tuple[CartCredit, ...]: ...


@dataclass(frozen=True, slots=True)
class CachedSubscription:
    """A subscription as the CheckAccess cache keeps it: only the fields of `SubscriptionFacts` (100k customers
    must fit in a few hundred MB)."""

    subscription_id: str
    product_id: str
    status: str
    created_at: datetime
    trial_period_days: int = 0
    next_billing_date: datetime | None = None
    cancel_at_next_billing_date: bool = False
    past_due_ends_at: datetime | None = None
    on_hold_since: datetime | None = None
    last_event_at: datetime | None = None
    credit_cart: tuple[CartCredit, ...] = ()


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    """The stored Dodo snapshot of one subscription, as far as the rules need it."""

    subscription_id: str
    customer_id: str
    product_id: str
    status: str
    quantity: int
    created_at: datetime
    trial_period_days: int = 0
    previous_billing_date: datetime | None = None
    next_billing_date: datetime | None = None
    cancel_at_next_billing_date: bool = False
    cancelled_at: datetime | None = None
    expires_at: datetime | None = None
    past_due_ends_at: datetime | None = None
    on_hold_since: datetime | None = None
    hold_cleared_at: datetime | None = None
    customer_email: str = ""
    customer_name: str = ""
    currency: str = ""
    recurring_pre_tax_amount: int = 0
    payment_frequency_count: int = 0
    payment_frequency_interval: str = ""
    scheduled_change: ScheduledChange | None = None
    credit_cart: tuple[CartCredit, ...] = ()
    addons: tuple[Addon, ...] = ()
    last_event_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """A part of a credit balance with its own expiry: burned soonest-expiring first."""

    grant_id: str
    remaining: Decimal
    expires_at: datetime | None
    source: str


@dataclass(frozen=True, slots=True)
class Account:
    """One credit of one customer: the balance (the sum of its ledger) and the grants that make it up."""

    customer_id: str
    credit: str
    balance: Decimal = Decimal(0)
    grants: tuple[Grant, ...] = ()


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A credit ledger row: immutable once written. `kind` is consumption, plan_grant, grant_expiry or
    dodo_<transaction_type> (a mirrored Dodo ledger entry)."""

    entry_id: str
    customer_id: str
    credit: str
    amount: Decimal
    balance_after: Decimal
    kind: str
    source: str
    idempotency_key: str | None = None
    fingerprint: str | None = None
    dodo_entry_id: str | None = None
    description: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CustomerEntitlements:
    """Everything a decision about one customer reads: what CheckAccess caches per customer. Its accounts carry
    only the grants that expire (the others cannot change an effective balance)."""

    customer_id: str
    subscriptions: tuple[CachedSubscription, ...] = ()
    accounts: dict[str, Account] = field(default_factory=dict)
    # False once a credit change made the cached balances stale while the subscriptions still hold.
    accounts_loaded: bool = True


@dataclass(frozen=True, slots=True)
class AccessDecision:
    """The decision for one subscription as a whole."""

    allowed: bool
    reason: AccessReason
    access_ends_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class FeatureDecision:
    """The decision for one customer and one feature, with the subscription that decided it."""

    allowed: bool
    reason: AccessReason
    kind: FeatureKind
    subscription: SubscriptionFacts | None = None
    access_ends_at: datetime | None = None
    limit: int = 0
    balance: Decimal | None = None
    # Decided from the last-known state while Postgres is unreachable (degraded mode).
    stale: bool = False
    # Set when the customer was named by customer_ref: the Dodo customer it resolved to.
    customer_id: str = ""


@dataclass(frozen=True, slots=True)
class SubscriptionView:
    """A subscription with everything GetSubscription shows: its decision, plan contents and balances."""

    state: SubscriptionState
    access: AccessDecision
    plan_name: str = ""
    features: tuple[str, ...] = ()
    limits: dict[str, int] = field(default_factory=dict)
    credits: dict[str, Decimal] = field(default_factory=dict)
    trial_ends_at: datetime | None = None
    customer_ref: str = ""


@dataclass(frozen=True, slots=True)
class CheckoutItem:
    """One product of a checkout cart (a catalog product), with its add-ons."""

    product_id: str
    quantity: int = 1
    addons: tuple[Addon, ...] = ()


@dataclass(frozen=True, slots=True)
class CheckoutCustomer:
    """Who a checkout is for: an existing Dodo customer, or a new one by e-mail (and name)."""

    customer_id: str = ""
    email: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class CheckoutSession:
    session_id: str
    checkout_url: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class DodoProduct:
    """A Dodo product's price as the pricing page shows it (minor units of `currency`)."""

    product_id: str
    name: str
    price: int
    currency: str
    payment_frequency_count: int = 0
    payment_frequency_interval: str = ""
