"""What the client returns: plain frozen dataclasses (snake_case fields, `Decimal` amounts, aware UTC datetimes,
`IntEnum`s that mirror the proto enums), converted once from the generated messages, and their JSON form. Also the
two values a caller builds for a checkout cart (`CheckoutItem`, `CheckoutAddon`).

The enums are `IntEnum`s with the proto numbers, so they still compare equal to the generated constants
(`result.reason == pb.ACCESS_REASON_ACTIVE`); a value this client does not know yet (a newer server) reads as
`UNSPECIFIED` rather than failing the call.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, TypeVar, cast

from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Value
from google.protobuf.timestamp_pb2 import Timestamp

from entitlements.v1 import entitlements_pb2 as pb

__all__ = [
    "AccessDecision",
    "AccessReason",
    "CancelSubscriptionResult",
    "ChangePlanResult",
    "Charge",
    "ChargeResult",
    "ChargeStatus",
    "CheckAccessResult",
    "CheckoutAddon",
    "CheckoutItem",
    "CheckoutSession",
    "ConsumeCreditsResult",
    "CreditLedgerEntry",
    "CreditLedgerPage",
    "CustomerLink",
    "EffectiveAt",
    "EntitlementEvent",
    "EntitlementEventKind",
    "FeatureKind",
    "Plan",
    "PortalSession",
    "ProrationMode",
    "RecordUsageResult",
    "ResumeSubscriptionResult",
    "ScheduledChange",
    "Subscription",
    "Usage",
    "UsageDelivery",
    "UsageEvent",
    "to_jsonable",
]

_E = TypeVar("_E", bound="ProtoEnum")


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


class ProtoEnum(enum.IntEnum):
    """An enum of entitlements.v1: members are the proto values without the enum's prefix (buf style)."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        return cls(0)

    @property
    def proto_name(self) -> str:
        """The name the proto (and protobuf JSON) uses, e.g. `ACCESS_REASON_ACTIVE`."""
        return f"{_upper_snake(type(self).__name__)}_{self.name}"

    @classmethod
    def parse(cls: type[_E], text: str) -> _E:
        """A member from its short name, its proto name or a CLI spelling (`next-billing-date`), any case."""
        wanted = text.strip().upper().replace("-", "_")
        wanted = wanted.removeprefix(f"{_upper_snake(cls.__name__)}_")
        try:
            return cls[wanted]
        except KeyError:
            known = ", ".join(member.name.lower().replace("_", "-") for member in cls)
            raise ValueError(f"unknown {cls.__name__} {text[:64]!r} (one of: {known})") from None


class AccessReason(ProtoEnum):
    UNSPECIFIED = 0
    ACTIVE = 1
    TRIALING = 2
    CANCELLATION_SCHEDULED = 3
    GRACE_PERIOD = 4
    NO_SUBSCRIPTION = 5
    FEATURE_NOT_IN_PLAN = 6
    SUBSCRIPTION_INACTIVE = 7
    CREDITS_EXHAUSTED = 8
    STORAGE_UNAVAILABLE = 9


class FeatureKind(ProtoEnum):
    UNSPECIFIED = 0
    BOOLEAN = 1
    LIMIT = 2
    CREDIT = 3


class ProrationMode(ProtoEnum):
    UNSPECIFIED = 0
    PRORATED_IMMEDIATELY = 1
    FULL_IMMEDIATELY = 2
    DIFFERENCE_IMMEDIATELY = 3
    DO_NOT_BILL = 4


class EffectiveAt(ProtoEnum):
    UNSPECIFIED = 0
    IMMEDIATELY = 1
    NEXT_BILLING_DATE = 2


class ChargeStatus(ProtoEnum):
    UNSPECIFIED = 0
    PENDING = 1
    SUCCEEDED = 2
    FAILED = 3
    UNKNOWN = 4


class EntitlementEventKind(ProtoEnum):
    UNSPECIFIED = 0
    SUBSCRIPTION_CHANGED = 1
    ACCESS_CHANGED = 2
    CREDITS_CHANGED = 3
    CREDITS_LOW = 4
    CREDITS_EXHAUSTED = 5
    CUSTOMER_LINKED = 6
    HEARTBEAT = 7


class _Result:
    """JSON form shared by every result: `to_dict()` is what the CLI prints."""

    def to_dict(self) -> dict[str, Any]:
        converted = to_jsonable(self)
        assert isinstance(converted, dict)
        return converted


def to_jsonable(value: object) -> Any:
    """Results as JSON values: decimals as exact strings, datetimes as ISO 8601 UTC (`Z`), enums by proto name."""
    if isinstance(value, ProtoEnum):
        return value.proto_name
    if isinstance(value, bool | int | str | float) or value is None:
        return value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: to_jsonable(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    raise TypeError(f"cannot express {type(value).__name__} as JSON")


@dataclasses.dataclass(frozen=True)
class CheckAccessResult(_Result):
    allowed: bool
    reason: AccessReason
    # Dodo status of the deciding subscription; "" when there is none.
    status: str
    subscription_id: str
    product_id: str
    # None: open-ended.
    access_ends_at: datetime | None
    # The plan's limit, for limit features (0 otherwise).
    limit: int
    # The balance, for credit features (None otherwise).
    balance: Decimal | None
    kind: FeatureKind
    # True when the server answered from its last-known state while Postgres was unreachable.
    stale: bool
    # The Dodo customer the answer is about (the resolved one when asked by `customer_ref`; "" when unlinked).
    customer_id: str = ""


@dataclasses.dataclass(frozen=True)
class AccessDecision(_Result):
    allowed: bool
    reason: AccessReason
    access_ends_at: datetime | None


@dataclasses.dataclass(frozen=True)
class ScheduledChange(_Result):
    product_id: str
    quantity: int
    effective_at: datetime | None


@dataclasses.dataclass(frozen=True)
class Subscription(_Result):
    subscription_id: str
    customer_id: str
    # The company's own id for the customer when one is linked, else "".
    customer_ref: str
    customer_email: str
    product_id: str
    plan_name: str
    # Dodo's status string as received.
    status: str
    quantity: int
    trial_ends_at: datetime | None
    current_period_start: datetime | None
    current_period_end: datetime | None
    cancel_at_period_end: bool
    cancelled_at: datetime | None
    access: AccessDecision
    features: tuple[str, ...]
    limits: Mapping[str, int]
    credits: Mapping[str, Decimal]
    # Minor units of `currency`.
    recurring_amount: int
    currency: str
    billing_interval: str
    updated_at: datetime | None
    scheduled_change: ScheduledChange | None


@dataclasses.dataclass(frozen=True)
class ChangePlanResult(_Result):
    # The state after the change as far as known (when previewing: as it would become).
    subscription: Subscription | None
    # Minor units of `currency`; set when previewing.
    immediate_charge: int
    currency: str
    replayed: bool


@dataclasses.dataclass(frozen=True)
class ConsumeCreditsResult(_Result):
    entry_id: str
    # Negative when overage is in use.
    balance_after: Decimal
    overage_after: Decimal
    replayed: bool


@dataclasses.dataclass(frozen=True)
class CreditLedgerEntry(_Result):
    entry_id: str
    customer_id: str
    credit: str
    # Positive for grants, negative for consumption.
    amount: Decimal
    balance_after: Decimal
    kind: str
    source: str
    description: str
    metadata: Mapping[str, str]
    created_at: datetime | None


@dataclasses.dataclass(frozen=True)
class CreditLedgerPage(_Result):
    # Newest first.
    entries: tuple[CreditLedgerEntry, ...]
    # "" on the last page.
    next_page_token: str


@dataclasses.dataclass(frozen=True)
class CheckoutSession(_Result):
    session_id: str
    # Where to send the buyer.
    checkout_url: str
    expires_at: datetime | None
    # True when the idempotency key was seen before and the stored session is returned.
    replayed: bool


@dataclasses.dataclass(frozen=True)
class PortalSession(_Result):
    # Dodo's customer portal, signed in as the customer.
    url: str
    expires_at: datetime | None


@dataclasses.dataclass(frozen=True)
class CancelSubscriptionResult(_Result):
    # The state after the cancellation as far as known (read back from Dodo).
    subscription: Subscription | None
    replayed: bool


@dataclasses.dataclass(frozen=True)
class ResumeSubscriptionResult(_Result):
    subscription: Subscription | None
    replayed: bool


@dataclasses.dataclass(frozen=True)
class Plan(_Result):
    product_id: str
    name: str
    features: tuple[str, ...]
    limits: Mapping[str, int]
    # Credit key to the amount granted each period.
    credits: Mapping[str, Decimal]
    trial_credits: Mapping[str, Decimal]
    grace_period_days: int
    # Minor units of `currency`; None when Dodo's price is not known (the server has no API access).
    price: int | None
    # "" when the price is not known.
    currency: str
    # Billing cycle, e.g. "1 Month".
    billing_interval: str


@dataclasses.dataclass(frozen=True)
class CustomerLink(_Result):
    customer_ref: str
    customer_id: str


@dataclasses.dataclass(frozen=True)
class Charge(_Result):
    """One on-demand charge of a subscription."""

    charge_id: str
    subscription_id: str
    # Minor units of `currency`.
    amount: int
    currency: str
    # UNKNOWN: Dodo's answer was lost; the server resolves it before anything is sent again.
    status: ChargeStatus
    payment_id: str
    # Dodo's error code for a declined or refused charge ("" otherwise).
    error_code: str
    created_at: datetime | None


@dataclasses.dataclass(frozen=True)
class ChargeResult(_Result):
    charge: Charge | None
    # True when the idempotency key was seen before and the stored charge is returned.
    replayed: bool


@dataclasses.dataclass(frozen=True)
class EntitlementEvent(_Result):
    """One change from `watch()`, in commit order (or, with `kind` HEARTBEAT, only a `cursor` to resume from)."""

    # Opaque: pass it back as `after_cursor` to resume right after this event.
    cursor: str
    kind: EntitlementEventKind
    customer_id: str
    # The company's own id for the customer when one is linked, else "".
    customer_ref: str
    # For SUBSCRIPTION_CHANGED and ACCESS_CHANGED: the subscription as of `occurred_at` (`credits` empty); its
    # `access` is the decision from then on.
    subscription: Subscription | None
    # For CREDITS_*: the credit key and its balance after the change.
    credit: str
    balance: Decimal | None
    # For CREDITS_LOW: the threshold crossed.
    threshold: Decimal | None
    occurred_at: datetime | None

    @property
    def is_heartbeat(self) -> bool:
        return self.kind is EntitlementEventKind.HEARTBEAT


# --- what the caller sends -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckoutAddon:
    """An add-on of a checkout item."""

    addon_id: str
    quantity: int = 1


@dataclasses.dataclass(frozen=True)
class CheckoutItem:
    """One product of a checkout cart (a product of the plan catalog), with its add-ons."""

    product_id: str
    quantity: int = 1
    addons: tuple[CheckoutAddon, ...] = ()

    def to_proto(self) -> pb.CheckoutItem:
        return pb.CheckoutItem(
            product_id=self.product_id,
            quantity=self.quantity,
            addons=[pb.CheckoutAddon(addon_id=addon.addon_id, quantity=addon.quantity) for addon in self.addons],
        )


# --- from the generated messages ---------------------------------------------------------------------------------


def _time(message: Message, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    stamp = cast(Timestamp, getattr(message, name))
    return stamp.ToDatetime(tzinfo=timezone.utc)


def _decimal(text: str) -> Decimal:
    return Decimal(text) if text else Decimal(0)


def check_access_result(message: pb.CheckAccessResponse) -> CheckAccessResult:
    return CheckAccessResult(
        allowed=message.allowed,
        reason=AccessReason(message.reason),
        status=message.status,
        subscription_id=message.subscription_id,
        product_id=message.product_id,
        access_ends_at=_time(message, "access_ends_at"),
        limit=message.limit,
        balance=Decimal(message.balance) if message.balance else None,
        kind=FeatureKind(message.kind),
        stale=message.stale,
        customer_id=message.customer_id,
    )


def entitlement_event(message: pb.EntitlementEvent) -> EntitlementEvent:
    return EntitlementEvent(
        cursor=message.cursor,
        kind=EntitlementEventKind(message.kind),
        customer_id=message.customer_id,
        customer_ref=message.customer_ref,
        subscription=subscription(message.subscription) if message.HasField("subscription") else None,
        credit=message.credit,
        balance=Decimal(message.balance) if message.balance else None,
        threshold=Decimal(message.threshold) if message.threshold else None,
        occurred_at=_time(message, "occurred_at"),
    )


def access_decision(message: pb.AccessDecision) -> AccessDecision:
    return AccessDecision(
        allowed=message.allowed,
        reason=AccessReason(message.reason),
        access_ends_at=_time(message, "access_ends_at"),
    )


def subscription(message: pb.Subscription) -> Subscription:
    scheduled = message.scheduled_change
    return Subscription(
        subscription_id=message.subscription_id,
        customer_id=message.customer_id,
        customer_ref=message.customer_ref,
        customer_email=message.customer_email,
        product_id=message.product_id,
        plan_name=message.plan_name,
        status=message.status,
        quantity=message.quantity,
        trial_ends_at=_time(message, "trial_ends_at"),
        current_period_start=_time(message, "current_period_start"),
        current_period_end=_time(message, "current_period_end"),
        cancel_at_period_end=message.cancel_at_period_end,
        cancelled_at=_time(message, "cancelled_at"),
        access=access_decision(message.access),
        features=tuple(message.features),
        limits=dict(sorted(message.limits.items())),
        credits={key: _decimal(value) for key, value in sorted(message.credits.items())},
        recurring_amount=message.recurring_amount,
        currency=message.currency,
        billing_interval=message.billing_interval,
        updated_at=_time(message, "updated_at"),
        scheduled_change=(
            ScheduledChange(
                product_id=scheduled.product_id,
                quantity=scheduled.quantity,
                effective_at=_time(scheduled, "effective_at"),
            )
            if message.HasField("scheduled_change")
            else None
        ),
    )


def get_subscription_result(message: pb.GetSubscriptionResponse) -> Subscription:
    return subscription(message.subscription)


def change_plan_result(message: pb.ChangePlanResponse) -> ChangePlanResult:
    return ChangePlanResult(
        subscription=subscription(message.subscription) if message.HasField("subscription") else None,
        immediate_charge=message.immediate_charge,
        currency=message.currency,
        replayed=message.replayed,
    )


def consume_credits_result(message: pb.ConsumeCreditsResponse) -> ConsumeCreditsResult:
    return ConsumeCreditsResult(
        entry_id=message.entry_id,
        balance_after=_decimal(message.balance_after),
        overage_after=_decimal(message.overage_after),
        replayed=message.replayed,
    )


def credit_ledger_entry(message: pb.CreditLedgerEntry) -> CreditLedgerEntry:
    return CreditLedgerEntry(
        entry_id=message.entry_id,
        customer_id=message.customer_id,
        credit=message.credit,
        amount=_decimal(message.amount),
        balance_after=_decimal(message.balance_after),
        kind=message.kind,
        source=message.source,
        description=message.description,
        metadata=dict(sorted(message.metadata.items())),
        created_at=_time(message, "created_at"),
    )


def credit_ledger_page(message: pb.ListCreditLedgerResponse) -> CreditLedgerPage:
    return CreditLedgerPage(
        entries=tuple(credit_ledger_entry(entry) for entry in message.entries),
        next_page_token=message.next_page_token,
    )


def checkout_session(message: pb.CreateCheckoutResponse) -> CheckoutSession:
    return CheckoutSession(
        session_id=message.session_id,
        checkout_url=message.checkout_url,
        expires_at=_time(message, "expires_at"),
        replayed=message.replayed,
    )


def portal_session(message: pb.CreatePortalSessionResponse) -> PortalSession:
    return PortalSession(url=message.url, expires_at=_time(message, "expires_at"))


def cancel_subscription_result(message: pb.CancelSubscriptionResponse) -> CancelSubscriptionResult:
    return CancelSubscriptionResult(
        subscription=subscription(message.subscription) if message.HasField("subscription") else None,
        replayed=message.replayed,
    )


def resume_subscription_result(message: pb.ResumeSubscriptionResponse) -> ResumeSubscriptionResult:
    return ResumeSubscriptionResult(
        subscription=subscription(message.subscription) if message.HasField("subscription") else None,
        replayed=message.replayed,
    )


def plan(message: pb.Plan) -> Plan:
    return Plan(
        product_id=message.product_id,
        name=message.name,
        features=tuple(message.features),
        limits=dict(sorted(message.limits.items())),
        credits={key: _decimal(value) for key, value in sorted(message.credits.items())},
        trial_credits={key: _decimal(value) for key, value in sorted(message.trial_credits.items())},
        grace_period_days=message.grace_period_days,
        price=message.price if message.currency else None,
        currency=message.currency,
        billing_interval=message.billing_interval,
    )


def plans(message: pb.ListPlansResponse) -> tuple[Plan, ...]:
    return tuple(plan(item) for item in message.plans)


def customer_link(message: pb.LinkCustomerResponse) -> CustomerLink:
    return CustomerLink(customer_ref=message.customer_ref, customer_id=message.customer_id)


def charge(message: pb.Charge) -> Charge:
    return Charge(
        charge_id=message.charge_id,
        subscription_id=message.subscription_id,
        amount=message.amount,
        currency=message.currency,
        status=ChargeStatus(message.status),
        payment_id=message.payment_id,
        error_code=message.error_code,
        created_at=_time(message, "created_at"),
    )


def charge_result(message: pb.CreateChargeResponse) -> ChargeResult:
    return ChargeResult(
        charge=charge(message.charge) if message.HasField("charge") else None, replayed=message.replayed
    )


def get_charge_result(message: pb.GetChargeResponse) -> Charge:
    return charge(message.charge)


# --- usage (RecordUsage, GetUsage) -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UsageEvent:
    """One metered thing a customer did, for `record_usage`. `event_id` is unique per customer: recording it again
    (a retry) is counted as a duplicate, never twice. `timestamp` None means now (at most 1 h old, 5 min ahead);
    `properties` values are str, int, float or bool (numbers reach Dodo's meters as JSON numbers)."""

    event_id: str
    event_name: str
    timestamp: datetime | None = None
    properties: Mapping[str, str | int | float | bool] = dataclasses.field(default_factory=dict)

    def to_proto(self) -> pb.UsageEvent:
        values: dict[str, Value] = {}
        for key, value in self.properties.items():
            if isinstance(value, bool):
                values[key] = Value(bool_value=value)
            elif isinstance(value, int | float):
                values[key] = Value(number_value=value)
            elif isinstance(value, str):
                values[key] = Value(string_value=value)
            else:
                raise TypeError(f"property {key!r} must be a str, int, float or bool, not {type(value).__name__}")
        stamp = None
        if self.timestamp is not None:
            stamp = Timestamp()
            stamp.FromDatetime(self.timestamp)
        return pb.UsageEvent(event_id=self.event_id, event_name=self.event_name, timestamp=stamp, properties=values)


@dataclasses.dataclass(frozen=True)
class RecordUsageResult(_Result):
    # Newly recorded (durable before the answer).
    accepted: int
    # Recorded before (by an earlier call or a retried one): not recorded or sent again.
    duplicates: int


@dataclasses.dataclass(frozen=True)
class UsageDelivery(_Result):
    pending: int
    delivered: int
    rejected: int
    expired: int


@dataclasses.dataclass(frozen=True)
class Usage(_Result):
    count: int
    # Numeric property to its exact sum.
    sums: Mapping[str, Decimal]
    delivery: UsageDelivery


def record_usage_result(message: pb.RecordUsageResponse) -> RecordUsageResult:
    return RecordUsageResult(accepted=message.accepted, duplicates=message.duplicates)


def usage(message: pb.GetUsageResponse) -> Usage:
    delivery = message.delivery
    return Usage(
        count=message.count,
        sums={key: _decimal(value) for key, value in sorted(message.sums.items())},
        delivery=UsageDelivery(
            pending=delivery.pending,
            delivered=delivery.delivered,
            rejected=delivery.rejected,
            expired=delivery.expired,
        ),
    )
