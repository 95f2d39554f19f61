"""ChangePlan decisions (DESIGN §4, §8): pure functions of the requested change and Dodo's current snapshot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from service.domain import fingerprints
from service.domain.errors import PlanChangeAlreadyScheduled, PlanUnchanged, SubscriptionNotActive
from service.domain.values import SubscriptionState, SubscriptionView

ProrationBillingMode = Literal[
    "prorated_immediately",
    "full_immediately",
    "difference_immediately",
    "do_not_bill",
    "prorated_immediately_keep_cycle",
]
EffectiveAt = Literal["immediately", "next_billing_date"]


@dataclass(frozen=True, slots=True)
class PlanChange:
    subscription_id: str
    product_id: str
    quantity: int  # 0 keeps the current quantity
    proration: ProrationBillingMode
    effective_at: EffectiveAt
    idempotency_key: str
    preview: bool = False
    # Who asks (the authenticated caller's name, '' with auth off): idempotency keys are scoped per caller. Not
    # part of the fingerprint: the key's scope, not a parameter of the change.
    caller: str = ""


@dataclass(frozen=True, slots=True)
class PlanChangeResult:
    subscription: SubscriptionView
    immediate_charge: int = 0
    currency: str = ""
    replayed: bool = False


def fingerprint(change: PlanChange) -> str:
    """What "the same plan change" means for an idempotency key."""
    return fingerprints.fingerprint(
        [change.subscription_id, change.product_id, change.quantity, change.proration, change.effective_at]
    )


def target_quantity(change: PlanChange, current: SubscriptionState) -> int:
    return change.quantity or current.quantity or 1


def took_effect(current: SubscriptionState, change: PlanChange) -> bool:
    """Whether Dodo's current state already shows this change (applied now, or scheduled for the next period)."""
    quantity = target_quantity(change, current)
    if change.effective_at == "next_billing_date":
        scheduled = current.scheduled_change
        return (
            scheduled is not None
            and scheduled.product_id == change.product_id
            and scheduled.quantity in (quantity, None)
        )
    return current.product_id == change.product_id and current.quantity == quantity


def check_changeable(current: SubscriptionState, change: PlanChange) -> None:
    """Refuse, before calling Dodo, a change Dodo would refuse or that would change nothing."""
    if current.status != "active":
        raise SubscriptionNotActive(current.status)
    if current.scheduled_change is not None:
        raise PlanChangeAlreadyScheduled()
    if current.product_id == change.product_id and current.quantity == target_quantity(change, current):
        raise PlanUnchanged()
