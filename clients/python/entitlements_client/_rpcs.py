"""The RPCs of entitlements.v1 as data: the method path, how to read its answer, and whether a request may be sent
again after UNAVAILABLE. Both clients and the CLI work from this table, so adding an RPC is one `Rpc` here, a
request builder below, one method per client and one CLI subcommand (tests fail until all exist)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from entitlements.v1 import entitlements_pb2 as pb
from entitlements_client import models
from entitlements_client.models import CheckoutItem, EffectiveAt, ProrationMode, UsageEvent

SERVICE = pb.DESCRIPTOR.services_by_name["EntitlementService"]

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class Rpc(Generic[RequestT, ResponseT, ResultT]):
    name: str
    response_type: type[ResponseT]
    convert: Callable[[ResponseT], ResultT]
    # True when repeating the request cannot do anything twice: a read, or a write carrying an idempotency key.
    retry_safe: Callable[[RequestT], bool]

    @property
    def path(self) -> str:
        return f"/{SERVICE.full_name}/{self.name}"

    def serialize(self, request: RequestT) -> bytes:
        return request.SerializeToString()

    def deserialize(self, data: bytes) -> ResponseT:
        return self.response_type.FromString(data)


def _read(_: Message) -> bool:
    return True


def _change_plan_safe(request: pb.ChangePlanRequest) -> bool:
    # A preview changes nothing; a change is deduplicated by its key (the server refuses one without a key).
    return request.preview or bool(request.idempotency_key)


def _keyed(
    request: pb.ConsumeCreditsRequest
    | pb.CreateCheckoutRequest
    | pb.CancelSubscriptionRequest
    | pb.ResumeSubscriptionRequest,
) -> bool:
    # A write deduplicated by its key. The server refuses one without a key, so that is sent once and refused once.
    return bool(request.idempotency_key)


def _never(_: Message) -> bool:
    # CreatePortalSession has no idempotency key, and with `send_email` a repeat would mail the customer twice.
    return False


def _charge_keyed(request: pb.CreateChargeRequest) -> bool:
    # The server charges once per key, resolving a lost answer before it sends again; without a key it refuses.
    return bool(request.idempotency_key)


def _usage_safe(_: pb.RecordUsageRequest) -> bool:
    # Every event is deduplicated by its event_id per customer: a repeat records and sends nothing twice (the
    # retried answer counts what the first attempt recorded as duplicates).
    return True


def _link_safe(_: pb.LinkCustomerRequest) -> bool:
    # Linking a ref to the customer it is already linked to changes nothing: idempotent by nature.
    return True


CHECK_ACCESS: Rpc[pb.CheckAccessRequest, pb.CheckAccessResponse, models.CheckAccessResult] = Rpc(
    "CheckAccess", pb.CheckAccessResponse, models.check_access_result, _read
)
GET_SUBSCRIPTION: Rpc[pb.GetSubscriptionRequest, pb.GetSubscriptionResponse, models.Subscription] = Rpc(
    "GetSubscription", pb.GetSubscriptionResponse, models.get_subscription_result, _read
)
CHANGE_PLAN: Rpc[pb.ChangePlanRequest, pb.ChangePlanResponse, models.ChangePlanResult] = Rpc(
    "ChangePlan", pb.ChangePlanResponse, models.change_plan_result, _change_plan_safe
)
CONSUME_CREDITS: Rpc[pb.ConsumeCreditsRequest, pb.ConsumeCreditsResponse, models.ConsumeCreditsResult] = Rpc(
    "ConsumeCredits", pb.ConsumeCreditsResponse, models.consume_credits_result, _keyed
)
LIST_CREDIT_LEDGER: Rpc[pb.ListCreditLedgerRequest, pb.ListCreditLedgerResponse, models.CreditLedgerPage] = Rpc(
    "ListCreditLedger", pb.ListCreditLedgerResponse, models.credit_ledger_page, _read
)

CREATE_CHECKOUT: Rpc[pb.CreateCheckoutRequest, pb.CreateCheckoutResponse, models.CheckoutSession] = Rpc(
    "CreateCheckout", pb.CreateCheckoutResponse, models.checkout_session, _keyed
)
CREATE_PORTAL_SESSION: Rpc[pb.CreatePortalSessionRequest, pb.CreatePortalSessionResponse, models.PortalSession] = Rpc(
    "CreatePortalSession", pb.CreatePortalSessionResponse, models.portal_session, _never
)
CANCEL_SUBSCRIPTION: Rpc[
    pb.CancelSubscriptionRequest, pb.CancelSubscriptionResponse, models.CancelSubscriptionResult
] = Rpc("CancelSubscription", pb.CancelSubscriptionResponse, models.cancel_subscription_result, _keyed)
RESUME_SUBSCRIPTION: Rpc[
    pb.ResumeSubscriptionRequest, pb.ResumeSubscriptionResponse, models.ResumeSubscriptionResult
] = Rpc("ResumeSubscription", pb.ResumeSubscriptionResponse, models.resume_subscription_result, _keyed)
LIST_PLANS: Rpc[pb.ListPlansRequest, pb.ListPlansResponse, tuple[models.Plan, ...]] = Rpc(
    "ListPlans", pb.ListPlansResponse, models.plans, _read
)
LINK_CUSTOMER: Rpc[pb.LinkCustomerRequest, pb.LinkCustomerResponse, models.CustomerLink] = Rpc(
    "LinkCustomer", pb.LinkCustomerResponse, models.customer_link, _link_safe
)

CREATE_CHARGE: Rpc[pb.CreateChargeRequest, pb.CreateChargeResponse, models.ChargeResult] = Rpc(
    "CreateCharge", pb.CreateChargeResponse, models.charge_result, _charge_keyed
)
GET_CHARGE: Rpc[pb.GetChargeRequest, pb.GetChargeResponse, models.Charge] = Rpc(
    "GetCharge", pb.GetChargeResponse, models.get_charge_result, _read
)

RECORD_USAGE: Rpc[pb.RecordUsageRequest, pb.RecordUsageResponse, models.RecordUsageResult] = Rpc(
    "RecordUsage", pb.RecordUsageResponse, models.record_usage_result, _usage_safe
)
GET_USAGE: Rpc[pb.GetUsageRequest, pb.GetUsageResponse, models.Usage] = Rpc(
    "GetUsage", pb.GetUsageResponse, models.usage, _read
)

# A server stream: `convert` reads each message; it is resumed from its last cursor rather than retried (the
# clients' `watch`), so `retry_safe` only records that reading it again changes nothing.
WATCH_ENTITLEMENTS: Rpc[pb.WatchEntitlementsRequest, pb.EntitlementEvent, models.EntitlementEvent] = Rpc(
    "WatchEntitlements", pb.EntitlementEvent, models.entitlement_event, _read
)

RPCS: Mapping[str, Rpc[Any, Any, Any]] = {
    rpc.name: rpc
    for rpc in (
        CHECK_ACCESS,
        GET_SUBSCRIPTION,
        CHANGE_PLAN,
        CONSUME_CREDITS,
        LIST_CREDIT_LEDGER,
        CREATE_CHECKOUT,
        CREATE_PORTAL_SESSION,
        CANCEL_SUBSCRIPTION,
        RESUME_SUBSCRIPTION,
        LIST_PLANS,
        LINK_CUSTOMER,
        RECORD_USAGE,
        GET_USAGE,
        CREATE_CHARGE,
        GET_CHARGE,
        WATCH_ENTITLEMENTS,
    )
}


# --- requests from plain values ------------------------------------------------------------------------------------


def one_customer(customer_id: str | None, customer_ref: str | None) -> tuple[str, str]:
    """(customer_id, customer_ref) with exactly one of the two named ("" or None is not naming it)."""
    if bool(customer_id) == bool(customer_ref):
        raise ValueError("name exactly one of customer_id and customer_ref")
    return customer_id or "", customer_ref or ""


def _required(value: object, name: str) -> None:
    # The customer arguments are optional so a call may name a ref instead; the others are not.
    if value is None:
        raise TypeError(f"missing required argument: {name!r}")


def check_access_request(
    customer_id: str | None, customer_ref: str | None, feature: str | None
) -> pb.CheckAccessRequest:
    customer_id, customer_ref = one_customer(customer_id, customer_ref)
    _required(feature, "feature")
    return pb.CheckAccessRequest(customer_id=customer_id, customer_ref=customer_ref, feature=feature or "")


def get_subscription_request(
    subscription_id: str | None, customer_id: str | None, customer_ref: str | None = None
) -> pb.GetSubscriptionRequest:
    if sum(map(bool, (subscription_id, customer_id, customer_ref))) != 1:
        raise ValueError("name exactly one of subscription_id, customer_id and customer_ref")
    if subscription_id:
        return pb.GetSubscriptionRequest(subscription_id=subscription_id)
    if customer_ref:
        return pb.GetSubscriptionRequest(customer_ref=customer_ref)
    return pb.GetSubscriptionRequest(customer_id=customer_id or "")


def change_plan_request(
    subscription_id: str,
    product_id: str,
    *,
    quantity: int,
    proration_mode: ProrationMode | int,
    effective_at: EffectiveAt | int,
    idempotency_key: str,
    preview: bool,
) -> pb.ChangePlanRequest:
    return pb.ChangePlanRequest(
        subscription_id=subscription_id,
        product_id=product_id,
        quantity=quantity,
        proration_mode=pb.ProrationMode.ValueType(int(proration_mode)),
        effective_at=pb.EffectiveAt.ValueType(int(effective_at)),
        idempotency_key=idempotency_key,
        preview=preview,
    )


def amount_text(amount: str | Decimal | int) -> str:
    """An exact decimal string; floats are refused, since they cannot say 0.1 exactly."""
    if isinstance(amount, bool) or not isinstance(amount, str | Decimal | int):
        raise TypeError(f"amount must be a str, Decimal or int, not {type(amount).__name__}")
    if isinstance(amount, Decimal):
        return format(amount, "f")
    return str(amount)


def consume_credits_request(
    customer_id: str | None,
    customer_ref: str | None,
    credit: str | None,
    amount: str | Decimal | int | None,
    idempotency_key: str | None,
    *,
    description: str,
    metadata: Mapping[str, str] | None,
) -> pb.ConsumeCreditsRequest:
    customer_id, customer_ref = one_customer(customer_id, customer_ref)
    for value, name in ((credit, "credit"), (amount, "amount"), (idempotency_key, "idempotency_key")):
        _required(value, name)
    assert amount is not None
    return pb.ConsumeCreditsRequest(
        customer_id=customer_id,
        customer_ref=customer_ref,
        credit=credit or "",
        amount=amount_text(amount),
        idempotency_key=idempotency_key or "",
        description=description,
        metadata=dict(metadata or {}),
    )


def list_credit_ledger_request(
    customer_id: str | None, customer_ref: str | None, credit: str | None, *, page_size: int, page_token: str
) -> pb.ListCreditLedgerRequest:
    customer_id, customer_ref = one_customer(customer_id, customer_ref)
    _required(credit, "credit")
    return pb.ListCreditLedgerRequest(
        customer_id=customer_id,
        customer_ref=customer_ref,
        credit=credit or "",
        page_size=page_size,
        page_token=page_token,
    )


def checkout_items(items: Iterable[CheckoutItem | str]) -> list[pb.CheckoutItem]:
    """The cart: `CheckoutItem`s, or product ids for one of each without add-ons."""
    if isinstance(items, str | CheckoutItem):
        raise TypeError("items must be a sequence of CheckoutItem or product ids, not a single one")
    cart: list[pb.CheckoutItem] = []
    for item in items:
        if isinstance(item, str):
            item = CheckoutItem(item)
        if not isinstance(item, CheckoutItem):
            raise TypeError(f"a checkout item must be a CheckoutItem or a product id, not {type(item).__name__}")
        cart.append(item.to_proto())
    return cart


def create_checkout_request(
    items: Iterable[CheckoutItem | str],
    *,
    idempotency_key: str,
    customer_id: str | None,
    customer_ref: str | None,
    email: str,
    name: str,
    trial_period_days: int | None,
    return_url: str,
    cancel_url: str,
    discount_code: str,
    metadata: Mapping[str, str] | None,
    allow_additional: bool,
) -> pb.CreateCheckoutRequest:
    # Neither is fine here (a new customer, named by `email`); both is not.
    if customer_id and customer_ref:
        raise ValueError("name at most one of customer_id and customer_ref")
    if isinstance(trial_period_days, bool) or not isinstance(trial_period_days, int | None):
        raise TypeError("trial_period_days must be an int (0 = no trial) or None (the product's trial)")
    return pb.CreateCheckoutRequest(
        customer_id=customer_id or "",
        customer_ref=customer_ref or "",
        email=email,
        name=name,
        items=checkout_items(items),
        # Unset (None) keeps the product's trial; 0 is an explicit "no trial".
        trial_period_days=trial_period_days,
        return_url=return_url,
        cancel_url=cancel_url,
        discount_code=discount_code,
        metadata=dict(metadata or {}),
        allow_additional=allow_additional,
        idempotency_key=idempotency_key,
    )


def create_portal_session_request(
    customer_id: str | None, customer_ref: str | None, *, return_url: str, send_email: bool
) -> pb.CreatePortalSessionRequest:
    customer_id, customer_ref = one_customer(customer_id, customer_ref)
    return pb.CreatePortalSessionRequest(
        customer_id=customer_id, customer_ref=customer_ref, return_url=return_url, send_email=send_email
    )


def cancel_subscription_request(
    subscription_id: str, *, idempotency_key: str, immediately: bool, reason: str
) -> pb.CancelSubscriptionRequest:
    return pb.CancelSubscriptionRequest(
        subscription_id=subscription_id, immediately=immediately, reason=reason, idempotency_key=idempotency_key
    )


def resume_subscription_request(subscription_id: str, *, idempotency_key: str) -> pb.ResumeSubscriptionRequest:
    return pb.ResumeSubscriptionRequest(subscription_id=subscription_id, idempotency_key=idempotency_key)


def link_customer_request(customer_ref: str, customer_id: str) -> pb.LinkCustomerRequest:
    return pb.LinkCustomerRequest(customer_ref=customer_ref, customer_id=customer_id)


def create_charge_request(
    subscription_id: str,
    amount: int,
    *,
    idempotency_key: str,
    currency: str,
    description: str,
    metadata: Mapping[str, str] | None,
) -> pb.CreateChargeRequest:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError("amount must be an int (minor units of the currency)")
    return pb.CreateChargeRequest(
        subscription_id=subscription_id,
        amount=amount,
        currency=currency,
        description=description,
        metadata=dict(metadata or {}),
        idempotency_key=idempotency_key,
    )


def get_charge_request(charge_id: str | None, idempotency_key: str | None) -> pb.GetChargeRequest:
    if bool(charge_id) == bool(idempotency_key):
        raise ValueError("name exactly one of charge_id and idempotency_key")
    if charge_id:
        return pb.GetChargeRequest(charge_id=charge_id)
    return pb.GetChargeRequest(idempotency_key=idempotency_key or "")


def record_usage_request(
    customer_id: str | None, customer_ref: str | None, events: Iterable[UsageEvent]
) -> pb.RecordUsageRequest:
    customer_id, customer_ref = one_customer(customer_id, customer_ref)
    if isinstance(events, UsageEvent):
        raise TypeError("events must be a sequence of UsageEvent, not a single one")
    batch: list[pb.UsageEvent] = []
    for item in events:
        if not isinstance(item, UsageEvent):
            raise TypeError(f"a usage event must be a UsageEvent, not {type(item).__name__}")
        batch.append(item.to_proto())
    return pb.RecordUsageRequest(customer_id=customer_id, customer_ref=customer_ref, events=batch)


def get_usage_request(
    customer_id: str | None,
    customer_ref: str | None,
    event_name: str | None,
    *,
    start: datetime | None,
    end: datetime | None,
) -> pb.GetUsageRequest:
    customer_id, customer_ref = one_customer(customer_id, customer_ref)
    _required(event_name, "event_name")
    request = pb.GetUsageRequest(customer_id=customer_id, customer_ref=customer_ref, event_name=event_name or "")
    if start is not None:
        request.start.FromDatetime(start)
    if end is not None:
        request.end.FromDatetime(end)
    return request


def watch_entitlements_request(customer_ids: Iterable[str], after_cursor: str) -> pb.WatchEntitlementsRequest:
    if isinstance(customer_ids, str):
        raise TypeError("customer_ids must be a sequence of customer ids, not a single one")
    return pb.WatchEntitlementsRequest(customer_ids=list(customer_ids), after_cursor=after_cursor)


# --- deadlines -----------------------------------------------------------------------------------------------------


class Deadline:
    """One call's time budget across all its attempts and the sleeps between them (None: no deadline)."""

    def __init__(self, seconds: float | None) -> None:
        if seconds is not None and seconds <= 0:
            raise ValueError("timeout must be positive (or None for no deadline)")
        self._at = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        return None if self._at is None else max(self._at - time.monotonic(), 0.0)

    def allows_sleep(self, seconds: float) -> bool:
        """Whether sleeping `seconds` still leaves time for another attempt."""
        return self._at is None or time.monotonic() + seconds < self._at
