"""Protobuf <-> domain for entitlements.v1. Protobuf types stop here: nothing past the servicer sees them."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from entitlements.v1 import entitlements_pb2 as pb
from google.protobuf.struct_pb2 import Value
from google.protobuf.timestamp_pb2 import Timestamp

from service.app.charges import Charge, ChargeRequest, ChargeResult
from service.app.checkouts import CheckoutRequest, CheckoutResult
from service.app.credit_service import ConsumeRequest, ConsumeResult, LedgerPage
from service.app.plan_listing import PricedPlan
from service.app.portal_sessions import PortalSession
from service.app.subscription_lifecycle import Cancellation, Resumption
from service.app.usage import RecordUsageRequest, UsageEventInput, UsageReport
from service.domain import decimals
from service.domain.errors import InvalidField
from service.domain.plan_change_rules import EffectiveAt, PlanChange, PlanChangeResult, ProrationBillingMode
from service.domain.values import AccessReason, Addon, CheckoutItem, FeatureDecision, FeatureKind, SubscriptionView

_REASONS: dict[AccessReason, pb.AccessReason.ValueType] = {
    AccessReason.ACTIVE: pb.ACCESS_REASON_ACTIVE,
    AccessReason.TRIALING: pb.ACCESS_REASON_TRIALING,
    AccessReason.CANCELLATION_SCHEDULED: pb.ACCESS_REASON_CANCELLATION_SCHEDULED,
    AccessReason.GRACE_PERIOD: pb.ACCESS_REASON_GRACE_PERIOD,
    AccessReason.NO_SUBSCRIPTION: pb.ACCESS_REASON_NO_SUBSCRIPTION,
    AccessReason.FEATURE_NOT_IN_PLAN: pb.ACCESS_REASON_FEATURE_NOT_IN_PLAN,
    AccessReason.SUBSCRIPTION_INACTIVE: pb.ACCESS_REASON_SUBSCRIPTION_INACTIVE,
    AccessReason.CREDITS_EXHAUSTED: pb.ACCESS_REASON_CREDITS_EXHAUSTED,
    AccessReason.STORAGE_UNAVAILABLE: pb.ACCESS_REASON_STORAGE_UNAVAILABLE,
}

_KINDS: dict[FeatureKind, pb.FeatureKind.ValueType] = {
    FeatureKind.BOOLEAN: pb.FEATURE_KIND_BOOLEAN,
    FeatureKind.LIMIT: pb.FEATURE_KIND_LIMIT,
    FeatureKind.CREDIT: pb.FEATURE_KIND_CREDIT,
}


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def decimal_text(value: Decimal | None) -> str:
    return "" if value is None else decimals.decimal_text(value)


def check_access_response(decision: FeatureDecision, customer_id: str = "") -> pb.CheckAccessResponse:
    sub = decision.subscription
    return pb.CheckAccessResponse(
        customer_id=customer_id or decision.customer_id,
        allowed=decision.allowed,
        reason=_REASONS[decision.reason],
        status=sub.status if sub is not None else "",
        subscription_id=sub.subscription_id if sub is not None else "",
        product_id=sub.product_id if sub is not None else "",
        access_ends_at=timestamp(decision.access_ends_at),
        limit=decision.limit,
        balance=decimal_text(decision.balance),
        kind=_KINDS[decision.kind],
        stale=decision.stale,
    )


def subscription(view: SubscriptionView) -> pb.Subscription:
    state = view.state
    scheduled = state.scheduled_change
    interval = _interval(state.payment_frequency_count, state.payment_frequency_interval)
    return pb.Subscription(
        subscription_id=state.subscription_id,
        customer_id=state.customer_id,
        customer_email=state.customer_email,
        product_id=state.product_id,
        status=state.status,
        quantity=state.quantity,
        trial_ends_at=timestamp(view.trial_ends_at),
        current_period_start=timestamp(state.previous_billing_date),
        current_period_end=timestamp(state.next_billing_date),
        cancel_at_period_end=state.cancel_at_next_billing_date,
        cancelled_at=timestamp(state.cancelled_at),
        access=pb.AccessDecision(
            allowed=view.access.allowed,
            reason=_REASONS[view.access.reason],
            access_ends_at=timestamp(view.access.access_ends_at),
        ),
        features=list(view.features),
        limits=view.limits,
        credits={key: decimal_text(value) for key, value in view.credits.items()},
        recurring_amount=state.recurring_pre_tax_amount,
        currency=state.currency,
        billing_interval=interval,
        updated_at=timestamp(state.updated_at),
        scheduled_change=None
        if scheduled is None
        else pb.ScheduledChange(
            product_id=scheduled.product_id,
            quantity=scheduled.quantity or state.quantity,
            effective_at=timestamp(scheduled.effective_at),
        ),
        plan_name=view.plan_name,
        customer_ref=view.customer_ref,
    )


def consume_request(request: pb.ConsumeCreditsRequest) -> ConsumeRequest:
    return ConsumeRequest(
        customer_id=request.customer_id,
        credit=request.credit,
        amount=request.amount,
        idempotency_key=request.idempotency_key,
        description=request.description,
        metadata=dict(request.metadata),
        customer_ref=request.customer_ref,
    )


def consume_response(result: ConsumeResult) -> pb.ConsumeCreditsResponse:
    return pb.ConsumeCreditsResponse(
        entry_id=result.entry_id,
        balance_after=decimal_text(result.balance_after),
        overage_after=decimal_text(result.overage_after),
        replayed=result.replayed,
    )


def ledger_page(page: LedgerPage) -> pb.ListCreditLedgerResponse:
    return pb.ListCreditLedgerResponse(
        entries=[
            pb.CreditLedgerEntry(
                entry_id=entry.entry_id,
                customer_id=entry.customer_id,
                credit=entry.credit,
                amount=decimal_text(entry.amount),
                balance_after=decimal_text(entry.balance_after),
                kind=entry.kind,
                source=entry.source,
                description=entry.description,
                metadata=dict(entry.metadata),
                created_at=timestamp(entry.created_at),
            )
            for entry in page.entries
        ],
        next_page_token=page.next_page_token,
    )


_PRORATION: dict[pb.ProrationMode.ValueType, ProrationBillingMode] = {
    pb.PRORATION_MODE_UNSPECIFIED: "prorated_immediately",
    pb.PRORATION_MODE_PRORATED_IMMEDIATELY: "prorated_immediately",
    pb.PRORATION_MODE_FULL_IMMEDIATELY: "full_immediately",
    pb.PRORATION_MODE_DIFFERENCE_IMMEDIATELY: "difference_immediately",
    pb.PRORATION_MODE_DO_NOT_BILL: "do_not_bill",
}

_EFFECTIVE: dict[pb.EffectiveAt.ValueType, EffectiveAt] = {
    pb.EFFECTIVE_AT_UNSPECIFIED: "immediately",
    pb.EFFECTIVE_AT_IMMEDIATELY: "immediately",
    pb.EFFECTIVE_AT_NEXT_BILLING_DATE: "next_billing_date",
}


def plan_change(request: pb.ChangePlanRequest, *, caller: str = "") -> PlanChange:
    proration = _PRORATION.get(request.proration_mode)
    effective_at = _EFFECTIVE.get(request.effective_at)
    if proration is None:
        raise InvalidField("proration_mode", f"unknown proration_mode {request.proration_mode}")
    if effective_at is None:
        raise InvalidField("effective_at", f"unknown effective_at {request.effective_at}")
    return PlanChange(
        subscription_id=request.subscription_id,
        product_id=request.product_id,
        quantity=request.quantity,
        proration=proration,
        effective_at=effective_at,
        idempotency_key=request.idempotency_key,
        preview=request.preview,
        caller=caller,
    )


def plan_change_response(result: PlanChangeResult) -> pb.ChangePlanResponse:
    return pb.ChangePlanResponse(
        subscription=subscription(result.subscription),
        immediate_charge=result.immediate_charge,
        currency=result.currency,
        replayed=result.replayed,
    )


def checkout_request(request: pb.CreateCheckoutRequest, *, caller: str = "") -> CheckoutRequest:
    return CheckoutRequest(
        items=tuple(
            CheckoutItem(
                product_id=item.product_id,
                quantity=item.quantity,
                addons=tuple(Addon(addon.addon_id, addon.quantity) for addon in item.addons),
            )
            for item in request.items
        ),
        idempotency_key=request.idempotency_key,
        customer_id=request.customer_id,
        customer_ref=request.customer_ref,
        email=request.email,
        name=request.name,
        trial_period_days=request.trial_period_days if request.HasField("trial_period_days") else None,
        return_url=request.return_url,
        cancel_url=request.cancel_url,
        discount_code=request.discount_code,
        metadata=dict(request.metadata),
        allow_additional=request.allow_additional,
        caller=caller,
    )


def checkout_response(result: CheckoutResult) -> pb.CreateCheckoutResponse:
    return pb.CreateCheckoutResponse(
        session_id=result.session.session_id,
        checkout_url=result.session.checkout_url,
        expires_at=timestamp(result.session.expires_at),
        replayed=result.replayed,
    )


def portal_response(session: PortalSession) -> pb.CreatePortalSessionResponse:
    return pb.CreatePortalSessionResponse(url=session.url, expires_at=timestamp(session.expires_at))


def cancellation(request: pb.CancelSubscriptionRequest, *, caller: str = "") -> Cancellation:
    return Cancellation(
        subscription_id=request.subscription_id,
        idempotency_key=request.idempotency_key,
        immediately=request.immediately,
        reason=request.reason,
        caller=caller,
    )


def resumption(request: pb.ResumeSubscriptionRequest, *, caller: str = "") -> Resumption:
    return Resumption(subscription_id=request.subscription_id, idempotency_key=request.idempotency_key, caller=caller)


def plans_response(plans: list[PricedPlan]) -> pb.ListPlansResponse:
    listed = []
    for priced in plans:
        plan, price = priced.plan, priced.price
        listed.append(
            pb.Plan(
                product_id=plan.product_id,
                name=plan.name,
                features=sorted(plan.features),
                limits=dict(plan.limits),
                credits={key: decimal_text(amount) for key, amount in plan.credits.items()},
                trial_credits={key: decimal_text(amount) for key, amount in plan.trial_credits.items()},
                grace_period_days=priced.grace_period_days,
                price=price.price if price is not None else 0,
                currency=price.currency if price is not None else "",
                billing_interval=_interval(price.payment_frequency_count, price.payment_frequency_interval)
                if price is not None
                else "",
            )
        )
    return pb.ListPlansResponse(plans=listed)


def _interval(count: int, unit: str) -> str:
    return f"{count} {unit}" if unit else ""


# --- CreateCharge / GetCharge ----------------------------------------------------------------------------------

_CHARGE_STATUSES: dict[str, pb.ChargeStatus.ValueType] = {
    "pending": pb.CHARGE_STATUS_PENDING,
    "succeeded": pb.CHARGE_STATUS_SUCCEEDED,
    "failed": pb.CHARGE_STATUS_FAILED,
    "unknown": pb.CHARGE_STATUS_UNKNOWN,
}


def charge_request(request: pb.CreateChargeRequest, *, caller: str = "") -> ChargeRequest:
    return ChargeRequest(
        subscription_id=request.subscription_id,
        amount=request.amount,
        currency=request.currency,
        description=request.description,
        metadata=dict(request.metadata),
        idempotency_key=request.idempotency_key,
        caller=caller,
    )


def charge(value: Charge) -> pb.Charge:
    return pb.Charge(
        charge_id=value.charge_id,
        subscription_id=value.subscription_id,
        amount=value.amount,
        currency=value.currency,
        status=_CHARGE_STATUSES.get(value.status.value, pb.CHARGE_STATUS_PENDING),
        payment_id=value.payment_id,
        error_code=value.error_code,
        created_at=timestamp(value.created_at),
    )


def charge_response(result: ChargeResult) -> pb.CreateChargeResponse:
    return pb.CreateChargeResponse(charge=charge(result.charge), replayed=result.replayed)


# --- usage (RecordUsage, GetUsage) -----------------------------------------------------------------------------


def _plain(value: Value) -> object:
    """A google.protobuf.Value as a plain value; the use case refuses anything but str, number and bool."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {}
    if kind == "list_value":
        return []
    return None  # null_value, or a Value with nothing set


def record_usage_request(request: pb.RecordUsageRequest) -> RecordUsageRequest:
    return RecordUsageRequest(
        customer_id=request.customer_id,
        customer_ref=request.customer_ref,
        events=[
            UsageEventInput(
                event_id=event.event_id,
                event_name=event.event_name,
                timestamp=event.timestamp.ToDatetime(UTC) if event.HasField("timestamp") else None,
                properties={key: _plain(value) for key, value in event.properties.items()},
            )
            for event in request.events
        ],
    )


def usage_response(report: UsageReport) -> pb.GetUsageResponse:
    return pb.GetUsageResponse(
        count=report.count,
        sums={key: decimal_text(value) for key, value in report.sums.items()},
        delivery=pb.UsageDelivery(
            pending=report.delivery.get("pending", 0),
            delivered=report.delivery.get("delivered", 0),
            rejected=report.delivery.get("rejected", 0),
            expired=report.delivery.get("expired", 0),
        ),
    )
