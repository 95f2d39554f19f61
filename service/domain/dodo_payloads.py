"""Reading Dodo's JSON (webhook `data`, API responses) into domain values.

Dodo adds fields over time and has sent numbers where the spec says decimal strings, so reading is tolerant of
extra and loosely typed fields and strict only about what the rules cannot do without.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from service.domain.errors import MalformedPayload
from service.domain.values import Addon, CartCredit, ScheduledChange, SubscriptionState


def parse_time(value: Any, field: str) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise MalformedPayload(f"{field} must be an ISO-8601 timestamp")


def optional_time(value: Any, field: str) -> datetime | None:
    return None if value is None else parse_time(value, field)


def parse_decimal(value: Any, field: str) -> Decimal:
    """Dodo sends decimal strings, and sometimes numbers: accept both, never through float arithmetic."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise MalformedPayload(f"{field} must be a decimal")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise MalformedPayload(f"{field} must be a decimal") from None
    if not amount.is_finite():
        raise MalformedPayload(f"{field} must be a finite decimal")
    return amount


def _str(data: Mapping[str, Any], key: str, *, required: bool = False) -> str:
    value = data.get(key)
    if isinstance(value, str) and value:
        return value
    if required:
        raise MalformedPayload(f"data.{key} is required")
    return ""


def _int(data: Mapping[str, Any], key: str, default: int = 0, *, limit: int = 2**31 - 1) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        return default
    if not -limit <= value <= limit:
        raise MalformedPayload(f"data.{key} is out of range")
    return value


def _cart(items: Any) -> tuple[CartCredit, ...]:
    cart: list[CartCredit] = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, Mapping) or not isinstance(item.get("credit_entitlement_id"), str):
            continue
        limit = item.get("overage_limit")
        cart.append(
            CartCredit(
                credit_entitlement_id=item["credit_entitlement_id"],
                overage_enabled=item.get("overage_enabled") is True,
                overage_limit=None if limit is None else parse_decimal(limit, "overage_limit"),
            )
        )
    return tuple(cart)


def _addons(items: Any) -> tuple[Addon, ...]:
    return tuple(
        Addon(str(item["addon_id"]), _int(item, "quantity", 1))
        for item in (items if isinstance(items, list) else [])
        if isinstance(item, Mapping) and item.get("addon_id")
    )


def _scheduled(value: Any) -> ScheduledChange | None:
    if not isinstance(value, Mapping) or not value.get("product_id"):
        return None
    return ScheduledChange(
        product_id=str(value["product_id"]),
        quantity=_int(value, "quantity") if isinstance(value.get("quantity"), int) else None,
        effective_at=optional_time(value.get("effective_at"), "scheduled_change.effective_at"),
    )


@dataclass(frozen=True, slots=True)
class DodoSubscription:
    """A Dodo Subscription object read once: the snapshot the rules use, and the raw JSON stored beside it."""

    state: SubscriptionState
    payload: dict[str, Any]


def read_subscription(data: dict[str, Any]) -> DodoSubscription:
    return DodoSubscription(parse_subscription(data), data)


def parse_subscription(data: Mapping[str, Any]) -> SubscriptionState:
    """A Dodo Subscription object (webhook `data` or GET /subscriptions/{id}) as a domain snapshot."""
    customer = data.get("customer")
    if not isinstance(customer, Mapping):
        raise MalformedPayload("data.customer is required")
    customer_id = _str(customer, "customer_id", required=True)
    return SubscriptionState(
        subscription_id=_str(data, "subscription_id", required=True),
        customer_id=customer_id,
        product_id=_str(data, "product_id", required=True),
        status=_str(data, "status", required=True),
        quantity=_int(data, "quantity", 1),
        created_at=parse_time(data.get("created_at"), "data.created_at"),
        # Bounded so that created_at + trial stays a representable date.
        trial_period_days=_int(data, "trial_period_days", limit=100_000),
        previous_billing_date=optional_time(data.get("previous_billing_date"), "data.previous_billing_date"),
        next_billing_date=optional_time(data.get("next_billing_date"), "data.next_billing_date"),
        cancel_at_next_billing_date=data.get("cancel_at_next_billing_date") is True,
        cancelled_at=optional_time(data.get("cancelled_at"), "data.cancelled_at"),
        expires_at=optional_time(data.get("expires_at"), "data.expires_at"),
        past_due_ends_at=optional_time(data.get("past_due_ends_at"), "data.past_due_ends_at"),
        customer_email=_str(customer, "email"),
        customer_name=_str(customer, "name"),
        currency=_str(data, "currency"),
        recurring_pre_tax_amount=_int(data, "recurring_pre_tax_amount", limit=2**63 - 1),
        payment_frequency_count=_int(data, "payment_frequency_count"),
        payment_frequency_interval=_str(data, "payment_frequency_interval"),
        scheduled_change=_scheduled(data.get("scheduled_change")),
        credit_cart=_cart(data.get("credit_entitlement_cart")),
        addons=_addons(data.get("addons")),
    )
