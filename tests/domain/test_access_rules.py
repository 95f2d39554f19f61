"""Unit tests for the access rules of DESIGN §5: one test per table row and per customer/feature rule.

Pure functions of snapshots, a catalog and an instant: no I/O, no clock.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from service.domain.access_rules import (
    best,
    carries_feature,
    decide,
    feature_access,
    most_relevant,
    subscription_access,
    trial_ends_at,
)
from service.domain.catalog import Catalog, parse_catalog
from service.domain.values import AccessDecision, AccessReason, CartCredit, FeatureKind, SubscriptionState

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)

PRO = "pdt_pro"  # plan grace 3 days
STARTER = "pdt_starter"  # no plan grace: the catalog default (7) applies
NO_GRACE = "pdt_no_grace"  # plan grace 0
LINKED_ENTITLEMENT = "cent_api_calls"

CATALOG: Catalog = parse_catalog(
    {
        "grace_period_days": 7,
        "credits": {
            "ai_tokens": {},
            "api_calls": {"dodo_credit_entitlement_id": LINKED_ENTITLEMENT, "overage_limit": "100"},
        },
        "plans": {
            PRO: {
                "name": "Pro",
                "features": ["dashboard", "pro"],
                "limits": {"projects": 50},
                "credits": {"ai_tokens": "10000"},
                "grace_period_days": 3,
            },
            STARTER: {"name": "Starter", "features": ["dashboard"], "limits": {"projects": 3}},
            NO_GRACE: {"name": "No grace", "features": ["dashboard"], "grace_period_days": 0},
        },
    },
    source="test-catalog",
)

_counter = 0


def sub(status: str = "active", **overrides: Any) -> SubscriptionState:
    """A snapshot created 60 days before NOW, mid-period, with no trial, unless overridden."""
    global _counter
    _counter += 1
    fields: dict[str, Any] = {
        "subscription_id": f"sub_{_counter}",
        "customer_id": "cus_1",
        "product_id": PRO,
        "status": status,
        "quantity": 1,
        "created_at": NOW - 60 * DAY,
        "previous_billing_date": NOW - 5 * DAY,
        "next_billing_date": NOW + 25 * DAY,
    }
    fields.update(overrides)
    return SubscriptionState(**fields)


def granted(reason: AccessReason, ends: datetime | None = None) -> AccessDecision:
    return AccessDecision(True, reason, ends)


DENIED = AccessDecision(False, AccessReason.SUBSCRIPTION_INACTIVE)


# --- Per subscription: trialing


def test_trialing_active_subscription_grants_trialing_with_no_end_when_not_cancelling() -> None:
    s = sub(created_at=NOW - 2 * DAY, trial_period_days=14, next_billing_date=NOW + 12 * DAY)
    assert decide(s, CATALOG, NOW) == granted(AccessReason.TRIALING)


def test_trialing_with_cancel_at_next_billing_date_ends_at_next_billing_date() -> None:
    s = sub(
        created_at=NOW - 2 * DAY,
        trial_period_days=14,
        next_billing_date=NOW + 12 * DAY,
        cancel_at_next_billing_date=True,
    )
    assert decide(s, CATALOG, NOW) == granted(AccessReason.TRIALING, NOW + 12 * DAY)


def test_trialing_with_cancellation_denies_once_next_billing_date_passes() -> None:
    s = sub(
        created_at=NOW - 20 * DAY,
        trial_period_days=14,
        next_billing_date=NOW - 6 * DAY,
        cancel_at_next_billing_date=True,
    )
    assert decide(s, CATALOG, NOW) == DENIED


def test_trial_ends_exactly_at_created_at_plus_trial_period_days_then_active() -> None:
    s = sub(created_at=NOW - 14 * DAY, trial_period_days=14)
    assert trial_ends_at(s) == NOW
    assert decide(s, CATALOG, NOW - timedelta(microseconds=1)).reason is AccessReason.TRIALING
    assert decide(s, CATALOG, NOW) == granted(AccessReason.ACTIVE)


def test_trial_ends_at_is_none_without_trial_days() -> None:
    assert trial_ends_at(sub(trial_period_days=0)) is None


def test_trial_only_applies_to_active_status() -> None:
    s = sub("paused", created_at=NOW - DAY, trial_period_days=14)
    assert decide(s, CATALOG, NOW) == DENIED


# --- Per subscription: active


def test_active_without_cancellation_grants_open_ended_access() -> None:
    assert decide(sub("active"), CATALOG, NOW) == granted(AccessReason.ACTIVE)


def test_active_after_next_billing_date_still_grants_because_late_renewal_never_revokes() -> None:
    s = sub("active", next_billing_date=NOW - 3 * DAY)
    assert decide(s, CATALOG, NOW) == granted(AccessReason.ACTIVE)


# --- Per subscription: cancellation scheduled at next_billing_date


@pytest.mark.parametrize("status", ["active", "cancelled"])
def test_cancellation_scheduled_grants_until_next_billing_date_before_it(status: str) -> None:
    s = sub(status, cancel_at_next_billing_date=True, next_billing_date=NOW + DAY)
    assert decide(s, CATALOG, NOW) == granted(AccessReason.CANCELLATION_SCHEDULED, NOW + DAY)


@pytest.mark.parametrize("status", ["active", "cancelled"])
def test_cancellation_scheduled_denies_exactly_at_next_billing_date(status: str) -> None:
    s = sub(status, cancel_at_next_billing_date=True, next_billing_date=NOW)
    assert decide(s, CATALOG, NOW) == DENIED
    assert decide(s, CATALOG, NOW - timedelta(microseconds=1)) == granted(AccessReason.CANCELLATION_SCHEDULED, NOW)


@pytest.mark.parametrize("status", ["active", "cancelled"])
def test_cancellation_scheduled_denies_after_next_billing_date(status: str) -> None:
    s = sub(status, cancel_at_next_billing_date=True, next_billing_date=NOW - DAY)
    assert decide(s, CATALOG, NOW) == DENIED


# --- Per subscription: past_due


def test_past_due_grants_grace_until_past_due_ends_at() -> None:
    s = sub("past_due", past_due_ends_at=NOW + 2 * DAY)
    assert decide(s, CATALOG, NOW) == granted(AccessReason.GRACE_PERIOD, NOW + 2 * DAY)


def test_past_due_ends_at_wins_over_plan_grace() -> None:
    # Plan grace is 3 days, but Dodo's own past_due_ends_at is later: Dodo's date decides.
    s = sub("past_due", on_hold_since=NOW - 10 * DAY, past_due_ends_at=NOW + 10 * DAY)
    assert decide(s, CATALOG, NOW) == granted(AccessReason.GRACE_PERIOD, NOW + 10 * DAY)


def test_past_due_denies_at_and_after_past_due_ends_at() -> None:
    at = sub("past_due", past_due_ends_at=NOW)
    after = sub("past_due", past_due_ends_at=NOW - DAY)
    assert decide(at, CATALOG, NOW) == DENIED
    assert decide(after, CATALOG, NOW) == DENIED


def test_past_due_without_past_due_ends_at_behaves_like_on_hold() -> None:
    since = NOW - DAY
    past_due = sub("past_due", on_hold_since=since, past_due_ends_at=None)
    on_hold = sub("on_hold", on_hold_since=since)
    expected = granted(AccessReason.GRACE_PERIOD, since + 3 * DAY)
    assert decide(past_due, CATALOG, NOW) == expected
    assert decide(on_hold, CATALOG, NOW) == expected
    later = since + 3 * DAY
    assert decide(past_due, CATALOG, later) == decide(on_hold, CATALOG, later) == DENIED


# --- Per subscription: on_hold


def test_on_hold_grants_grace_until_on_hold_since_plus_plan_grace_days() -> None:
    since = NOW - 2 * DAY
    s = sub("on_hold", product_id=PRO, on_hold_since=since)
    assert decide(s, CATALOG, NOW) == granted(AccessReason.GRACE_PERIOD, since + 3 * DAY)


def test_on_hold_denies_once_plan_grace_is_over() -> None:
    since = NOW - 3 * DAY
    s = sub("on_hold", product_id=PRO, on_hold_since=since)
    assert decide(s, CATALOG, NOW) == DENIED
    assert decide(s, CATALOG, NOW - timedelta(microseconds=1)).reason is AccessReason.GRACE_PERIOD


def test_on_hold_uses_catalog_default_grace_when_plan_has_none() -> None:
    since = NOW - 5 * DAY
    s = sub("on_hold", product_id=STARTER, on_hold_since=since)
    assert CATALOG.grace_days(STARTER) == 7
    assert decide(s, CATALOG, NOW) == granted(AccessReason.GRACE_PERIOD, since + 7 * DAY)
    assert decide(s, CATALOG, since + 7 * DAY) == DENIED


def test_on_hold_uses_catalog_default_grace_for_product_not_in_catalog() -> None:
    since = NOW - 5 * DAY
    s = sub("on_hold", product_id="pdt_unknown", on_hold_since=since)
    assert decide(s, CATALOG, NOW) == granted(AccessReason.GRACE_PERIOD, since + 7 * DAY)


def test_on_hold_with_plan_grace_zero_denies_immediately() -> None:
    s = sub("on_hold", product_id=NO_GRACE, on_hold_since=NOW)
    assert decide(s, CATALOG, NOW) == DENIED
    assert decide(s, CATALOG, NOW - DAY) == DENIED


def test_on_hold_with_grace_zero_denies_immediately() -> None:
    s = sub("on_hold", on_hold_since=NOW - timedelta(seconds=1))
    assert subscription_access(s, 0, NOW) == DENIED


# --- Per subscription: statuses that never grant


def test_cancelled_immediately_denies_even_before_next_billing_date() -> None:
    s = sub("cancelled", cancel_at_next_billing_date=False, next_billing_date=NOW + 20 * DAY)
    assert decide(s, CATALOG, NOW) == DENIED


@pytest.mark.parametrize("status", ["paused", "pending", "failed", "expired"])
def test_non_granting_status_denies_even_mid_period_and_in_trial(status: str) -> None:
    s = sub(
        status,
        created_at=NOW - DAY,
        trial_period_days=14,
        next_billing_date=NOW + 20 * DAY,
        on_hold_since=NOW - DAY,
    )
    assert decide(s, CATALOG, NOW) == DENIED


def test_unknown_status_denies_even_with_scheduled_cancellation_and_trial() -> None:
    s = sub(
        "frozen_by_dodo_2027",
        created_at=NOW - DAY,
        trial_period_days=14,
        cancel_at_next_billing_date=True,
        next_billing_date=NOW + 20 * DAY,
        past_due_ends_at=NOW + 20 * DAY,
        on_hold_since=NOW - DAY,
    )
    assert decide(s, CATALOG, NOW) == DENIED


# --- Per customer and feature


def test_feature_granted_when_a_subscription_whose_plan_includes_it_grants() -> None:
    s = sub("active", product_id=PRO)
    d = feature_access([s], CATALOG, "pro", NOW)
    assert d.allowed
    assert d.reason is AccessReason.ACTIVE
    assert d.kind is FeatureKind.BOOLEAN
    assert d.subscription == s
    assert d.access_ends_at is None


def test_feature_granting_subscription_beats_newer_denying_one() -> None:
    granting = sub("active", product_id=PRO, created_at=NOW - 90 * DAY)
    denying = sub("expired", product_id=PRO, created_at=NOW - DAY)
    d = feature_access([denying, granting], CATALOG, "pro", NOW)
    assert d.allowed
    assert d.subscription == granting


def test_feature_among_granting_subscriptions_latest_access_ends_at_wins() -> None:
    sooner = sub("active", cancel_at_next_billing_date=True, next_billing_date=NOW + 2 * DAY)
    later = sub("on_hold", product_id=STARTER, on_hold_since=NOW - DAY)  # 7-day grace: ends NOW + 6 days
    latest = sub("cancelled", cancel_at_next_billing_date=True, next_billing_date=NOW + 9 * DAY)
    d = feature_access([sooner, latest, later], CATALOG, "dashboard", NOW)
    assert d.allowed
    assert d.subscription == latest
    d = feature_access([sooner, later], CATALOG, "dashboard", NOW)
    assert d.subscription == later
    assert d.access_ends_at == NOW + 6 * DAY
    d = feature_access([sooner, latest, later], CATALOG, "dashboard", NOW)
    assert d.allowed
    assert d.subscription == latest
    assert d.reason is AccessReason.CANCELLATION_SCHEDULED
    assert d.access_ends_at == NOW + 9 * DAY


def test_feature_open_ended_grant_beats_any_end() -> None:
    open_ended = sub("active", product_id=STARTER, created_at=NOW - 300 * DAY)
    far_end = sub("active", cancel_at_next_billing_date=True, next_billing_date=NOW + 3650 * DAY)
    d = feature_access([far_end, open_ended], CATALOG, "dashboard", NOW)
    assert d.allowed
    assert d.subscription == open_ended
    assert d.access_ends_at is None


def test_feature_not_in_plan_when_a_subscription_grants_but_no_plan_includes_feature() -> None:
    starter = sub("active", product_id=STARTER)
    d = feature_access([starter], CATALOG, "pro", NOW)
    assert not d.allowed
    assert d.reason is AccessReason.FEATURE_NOT_IN_PLAN
    assert d.subscription == starter


def test_feature_subscription_inactive_when_no_subscription_grants_access() -> None:
    expired = sub("expired", product_id=STARTER)
    d = feature_access([expired], CATALOG, "pro", NOW)
    assert not d.allowed
    assert d.reason is AccessReason.SUBSCRIPTION_INACTIVE


def test_feature_subscription_inactive_when_only_plans_including_it_are_inactive() -> None:
    # The answer is the best decision among plans that include the feature, even if another plan grants.
    lapsed_pro = sub("expired", product_id=PRO)
    active_starter = sub("active", product_id=STARTER)
    d = feature_access([lapsed_pro, active_starter], CATALOG, "pro", NOW)
    assert not d.allowed
    assert d.reason is AccessReason.SUBSCRIPTION_INACTIVE
    assert d.subscription == lapsed_pro


def test_feature_no_subscription_when_customer_has_none() -> None:
    d = feature_access([], CATALOG, "pro", NOW)
    assert not d.allowed
    assert d.reason is AccessReason.NO_SUBSCRIPTION
    assert d.subscription is None


def test_limit_feature_returns_the_deciding_plans_limit() -> None:
    d = feature_access([sub("active", product_id=PRO)], CATALOG, "projects", NOW)
    assert d.allowed
    assert d.kind is FeatureKind.LIMIT
    assert d.limit == 50


def test_limit_feature_returns_limit_of_the_granting_plan_not_the_lapsed_one() -> None:
    lapsed_pro = sub("expired", product_id=PRO, created_at=NOW - DAY)
    starter = sub("active", product_id=STARTER, created_at=NOW - 90 * DAY)
    d = feature_access([lapsed_pro, starter], CATALOG, "projects", NOW)
    assert d.allowed
    assert d.limit == 3


def test_credit_feature_with_positive_balance_grants() -> None:
    d = feature_access([sub("active")], CATALOG, "ai_tokens", NOW, balance=Decimal("0.01"))
    assert d.allowed
    assert d.kind is FeatureKind.CREDIT
    assert d.reason is AccessReason.ACTIVE
    assert d.balance == Decimal("0.01")


def test_credit_feature_with_zero_balance_is_credits_exhausted() -> None:
    d = feature_access([sub("active")], CATALOG, "ai_tokens", NOW, balance=Decimal(0))
    assert not d.allowed
    assert d.reason is AccessReason.CREDITS_EXHAUSTED
    assert d.kind is FeatureKind.CREDIT


def test_credit_feature_without_a_balance_is_decided_by_subscriptions_alone() -> None:
    d = feature_access([sub("active")], CATALOG, "ai_tokens", NOW)
    assert d.allowed
    assert d.reason is AccessReason.ACTIVE


def test_credit_feature_with_zero_balance_but_overage_headroom_grants() -> None:
    d = feature_access([sub("active")], CATALOG, "ai_tokens", NOW, balance=Decimal(0), overage_headroom=Decimal(100))
    assert d.allowed
    assert d.reason is AccessReason.ACTIVE


def test_credit_feature_with_overage_headroom_used_up_is_credits_exhausted() -> None:
    d = feature_access([sub("active")], CATALOG, "ai_tokens", NOW, balance=Decimal(-100), overage_headroom=Decimal(100))
    assert not d.allowed
    assert d.reason is AccessReason.CREDITS_EXHAUSTED


def test_credit_feature_on_inactive_subscription_is_inactive_not_exhausted() -> None:
    d = feature_access([sub("expired")], CATALOG, "ai_tokens", NOW, balance=Decimal(0))
    assert not d.allowed
    assert d.reason is AccessReason.SUBSCRIPTION_INACTIVE


def test_dodo_linked_credit_granted_through_subscription_credit_cart_when_plan_does_not_list_it() -> None:
    cart = (CartCredit(LINKED_ENTITLEMENT, overage_enabled=True, overage_limit=Decimal(100)),)
    s = sub("active", product_id=STARTER, credit_cart=cart)
    assert carries_feature(s, CATALOG, "api_calls")
    d = feature_access([s], CATALOG, "api_calls", NOW, balance=Decimal(5))
    assert d.allowed
    assert d.kind is FeatureKind.CREDIT
    assert d.subscription == s


def test_dodo_linked_credit_not_in_plan_without_cart_entry() -> None:
    other = (CartCredit("cent_something_else", overage_enabled=False, overage_limit=None),)
    s = sub("active", product_id=STARTER, credit_cart=other)
    assert not carries_feature(s, CATALOG, "api_calls")
    d = feature_access([s], CATALOG, "api_calls", NOW, balance=Decimal(5))
    assert not d.allowed
    assert d.reason is AccessReason.FEATURE_NOT_IN_PLAN


def test_unlinked_credit_is_not_granted_by_an_unrelated_cart_entry() -> None:
    cart = (CartCredit(LINKED_ENTITLEMENT, overage_enabled=False, overage_limit=None),)
    s = sub("active", product_id=STARTER, credit_cart=cart)
    assert not carries_feature(s, CATALOG, "ai_tokens")


def test_trialing_subscription_grants_feature_with_trialing_reason() -> None:
    s = sub("active", created_at=NOW - DAY, trial_period_days=7)
    d = feature_access([s], CATALOG, "pro", NOW)
    assert d.allowed
    assert d.reason is AccessReason.TRIALING


def test_best_returns_none_without_subscriptions() -> None:
    assert best([], CATALOG, NOW) is None


# --- most_relevant (GetSubscription by customer)


def test_most_relevant_prefers_a_granting_subscription_over_a_newer_denying_one() -> None:
    old_active = sub("active", created_at=NOW - 300 * DAY)
    new_expired = sub("expired", created_at=NOW - DAY)
    assert most_relevant([new_expired, old_active], CATALOG, NOW) == old_active


def test_most_relevant_among_granting_prefers_the_newest() -> None:
    older = sub("active", created_at=NOW - 300 * DAY)
    newer = sub("on_hold", on_hold_since=NOW - DAY, created_at=NOW - 10 * DAY)
    assert most_relevant([older, newer], CATALOG, NOW) == newer


def test_most_relevant_among_denying_prefers_the_newest() -> None:
    older = sub("expired", created_at=NOW - 300 * DAY)
    newer = sub("failed", created_at=NOW - 10 * DAY)
    assert most_relevant([newer, older], CATALOG, NOW) == newer


def test_most_relevant_is_none_without_subscriptions() -> None:
    assert most_relevant([], CATALOG, NOW) is None
