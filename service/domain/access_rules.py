"""Access rules (DESIGN §5): pure functions of stored subscription snapshots, the catalog and an instant.

Time is derived, never scheduled: "access ends at period end" is a comparison made here at check time, so no job has
to fire for access to end on time, and a cached snapshot stays correct as the clock moves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TypeVar

from service.domain.catalog import Catalog
from service.domain.decimals import MATH
from service.domain.values import AccessDecision, AccessReason, FeatureDecision, FeatureKind, SubscriptionFacts

S = TypeVar("S", bound=SubscriptionFacts)

_INACTIVE = AccessDecision(False, AccessReason.SUBSCRIPTION_INACTIVE)
# Payment trouble: access continues through a grace period measured from the first event that showed it.
HOLD_STATUSES = frozenset({"on_hold", "past_due"})


def trial_ends_at(sub: SubscriptionFacts) -> datetime | None:
    if sub.trial_period_days > 0:
        return sub.created_at + timedelta(days=sub.trial_period_days)
    return None


def subscription_access(sub: SubscriptionFacts, grace_period_days: int, now: datetime) -> AccessDecision:
    """The decision for one subscription as a whole, as of `now`."""
    status = sub.status
    if status in ("active", "cancelled") and sub.cancel_at_next_billing_date:
        end = sub.next_billing_date
        if end is not None and now >= end:
            return _INACTIVE
        if status == "active" and _in_trial(sub, now):
            return AccessDecision(True, AccessReason.TRIALING, end)
        return AccessDecision(True, AccessReason.CANCELLATION_SCHEDULED, end)
    if status == "active":
        if _in_trial(sub, now):
            return AccessDecision(True, AccessReason.TRIALING)
        # A late renewal webhook never revokes a paying customer; reconciliation repairs staleness.
        return AccessDecision(True, AccessReason.ACTIVE)
    if status == "past_due" and sub.past_due_ends_at is not None:
        return _grace_until(sub.past_due_ends_at, now)
    if status in HOLD_STATUSES:
        if grace_period_days <= 0:
            return _INACTIVE
        since = sub.on_hold_since or sub.last_event_at or sub.created_at
        return _grace_until(since + timedelta(days=grace_period_days), now)
    return _INACTIVE


def _in_trial(sub: SubscriptionFacts, now: datetime) -> bool:
    end = trial_ends_at(sub)
    return end is not None and now < end


def _grace_until(end: datetime, now: datetime) -> AccessDecision:
    if now < end:
        return AccessDecision(True, AccessReason.GRACE_PERIOD, end)
    return _INACTIVE


def decide(sub: SubscriptionFacts, catalog: Catalog, now: datetime) -> AccessDecision:
    return subscription_access(sub, catalog.grace_days(sub.product_id), now)


def _rank(decision: AccessDecision, sub: SubscriptionFacts) -> tuple[bool, bool, datetime, datetime]:
    """Sort key: granting first; among granting, open-ended, then the latest end; ties go to the newest."""
    open_ended = decision.allowed and decision.access_ends_at is None
    end = decision.access_ends_at or datetime.min.replace(tzinfo=sub.created_at.tzinfo)
    return (decision.allowed, open_ended, end, sub.created_at)


def best(subs: Iterable[S], catalog: Catalog, now: datetime) -> tuple[S, AccessDecision] | None:
    ranked = [(sub, decide(sub, catalog, now)) for sub in subs]
    if not ranked:
        return None
    return max(ranked, key=lambda pair: _rank(pair[1], pair[0]))


def most_relevant(subs: Sequence[S], catalog: Catalog, now: datetime) -> S | None:
    """GetSubscription by customer: one that grants access first, then the newest."""
    ranked = sorted(subs, key=lambda s: (decide(s, catalog, now).allowed, s.created_at), reverse=True)
    return ranked[0] if ranked else None


def carries_feature(sub: SubscriptionFacts, catalog: Catalog, feature: str) -> bool:
    """Whether this subscription's plan (or, for a Dodo-linked credit, its credit cart) includes the feature."""
    plan = catalog.plan(sub.product_id)
    if plan is not None and plan.includes(feature):
        return True
    credit = catalog.credits.get(feature)
    if credit is not None and credit.dodo_credit_entitlement_id is not None:
        return any(c.credit_entitlement_id == credit.dodo_credit_entitlement_id for c in sub.credit_cart)
    return False


def feature_access(
    subs: Sequence[SubscriptionFacts],
    catalog: Catalog,
    feature: str,
    now: datetime,
    *,
    balance: Decimal | None = None,
    overage_headroom: Decimal = Decimal(0),
) -> FeatureDecision:
    """The decision for one customer and one feature (the feature must be a catalog key).

    For a credit feature, `balance` is the customer's balance and `overage_headroom` how far below zero it may go;
    access then also needs `balance + overage_headroom > 0`. With `balance` None only the subscriptions decide.
    """
    kind = catalog.kind_of(feature) or FeatureKind.BOOLEAN
    carrying = [s for s in subs if carries_feature(s, catalog, feature)]
    chosen = best(carrying, catalog, now)
    if chosen is None:
        overall = best(subs, catalog, now)
        if overall is None:
            return FeatureDecision(False, AccessReason.NO_SUBSCRIPTION, kind, balance=balance)
        sub, decision = overall
        reason = AccessReason.FEATURE_NOT_IN_PLAN if decision.allowed else AccessReason.SUBSCRIPTION_INACTIVE
        return FeatureDecision(False, reason, kind, sub, balance=balance)
    sub, decision = chosen
    limit = 0
    if kind is FeatureKind.LIMIT:
        plan = catalog.plan(sub.product_id)
        limit = plan.limits.get(feature, 0) if plan is not None else 0
    if not decision.allowed:
        return FeatureDecision(False, decision.reason, kind, sub, limit=limit, balance=balance)
    if kind is FeatureKind.CREDIT and balance is not None and MATH.add(balance, overage_headroom) <= 0:
        return FeatureDecision(
            False, AccessReason.CREDITS_EXHAUSTED, kind, sub, decision.access_ends_at, balance=balance
        )
    return FeatureDecision(True, decision.reason, kind, sub, decision.access_ends_at, limit, balance)
