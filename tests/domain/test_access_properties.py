"""Property tests for the access rules of DESIGN §5, over generated Dodo snapshots and instants."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain.access_rules import decide, feature_access, subscription_access, trial_ends_at
from service.domain.catalog import Catalog, parse_catalog
from service.domain.values import SubscriptionState

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)

# The statuses with the richest rules come first: sampled_from favours early elements.
KNOWN_STATUSES = ["active", "cancelled", "past_due", "on_hold", "pending", "paused", "failed", "expired"]
_known = st.sampled_from(KNOWN_STATUSES)
_unknown = st.sampled_from(["frozen_by_dodo_2027", "ACTIVE", "trialing", ""]) | st.text(max_size=12)
statuses = st.sampled_from([_known, _known, _known, _unknown]).flatmap(lambda s: s)  # about a quarter unknown
instants = st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC))
# Offsets from created_at, both signs, so dates land before, at and after any instant we test.
offsets = st.timedeltas(min_value=timedelta(days=-30), max_value=timedelta(days=400))
grace_days = st.integers(min_value=0, max_value=30)

FEATURE = "reports"
WITH_FEATURE = "pdt_with"
WITHOUT_FEATURE = "pdt_without"
ONLY_WITH_FEATURE = st.just(WITH_FEATURE)
CATALOG: Catalog = parse_catalog(
    {
        "grace_period_days": 7,
        "plans": {
            WITH_FEATURE: {"features": [FEATURE, "dashboard"], "grace_period_days": 2},
            WITHOUT_FEATURE: {"features": ["dashboard"]},
        },
    },
    source="property-catalog",
)


@st.composite
def states(
    draw: st.DrawFn,
    status: st.SearchStrategy[str] = statuses,
    product_id: st.SearchStrategy[str] = ONLY_WITH_FEATURE,
    created: st.SearchStrategy[datetime] = instants,
) -> SubscriptionState:
    created_at = draw(created)

    def maybe_at() -> datetime | None:
        return draw(st.none() | offsets.map(lambda d: created_at + d))

    return SubscriptionState(
        subscription_id=draw(st.uuids()).hex,
        customer_id="cus_1",
        product_id=draw(product_id),
        status=draw(status),
        quantity=1,
        created_at=created_at,
        trial_period_days=draw(st.integers(min_value=0, max_value=30)),
        next_billing_date=maybe_at(),
        cancel_at_next_billing_date=draw(st.booleans()),
        past_due_ends_at=maybe_at(),
        on_hold_since=maybe_at(),
    )


@st.composite
def state_and_now(draw: st.DrawFn) -> tuple[SubscriptionState, datetime]:
    state = draw(states())
    # Instants cluster around the snapshot's own dates so boundaries get exercised.
    anchors = [
        d
        for d in (
            state.created_at,
            trial_ends_at(state),
            state.next_billing_date,
            state.past_due_ends_at,
            state.on_hold_since,
        )
        if d is not None
    ]
    anchor = draw(st.sampled_from(anchors))
    jitter = draw(st.sampled_from([timedelta(0), timedelta(microseconds=-1), timedelta(microseconds=1)]) | offsets)
    return state, anchor + jitter


@PROPERTY_SETTINGS
@given(state_and_now(), grace_days)
def test_granting_decision_has_granting_reason_and_denying_has_denying_reason(
    pair: tuple[SubscriptionState, datetime], grace: int
) -> None:
    state, now = pair
    decision = subscription_access(state, grace, now)
    assert decision.allowed == decision.reason.grants


@PROPERTY_SETTINGS
@given(
    states(status=st.sampled_from(["active", "cancelled"])),
    offsets,
    st.sampled_from([timedelta(0), timedelta(microseconds=-1), timedelta(microseconds=1)]) | offsets,
    grace_days,
)
def test_scheduled_cancellation_grants_exactly_until_next_billing_date(
    state: SubscriptionState, period: timedelta, delta: timedelta, grace: int
) -> None:
    next_billing = state.created_at + period
    state = dataclasses.replace(
        state, cancel_at_next_billing_date=True, next_billing_date=next_billing, trial_period_days=0
    )
    now = next_billing + delta
    decision = subscription_access(state, grace, now)
    assert decision.allowed == (now < next_billing)
    if decision.allowed:
        assert decision.access_ends_at == next_billing


@PROPERTY_SETTINGS
@given(
    state_and_now(),
    st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=800)),
    grace_days,
)
def test_more_time_never_turns_a_denial_into_a_grant(
    pair: tuple[SubscriptionState, datetime], later_by: timedelta, grace: int
) -> None:
    state, t1 = pair
    if not subscription_access(state, grace, t1).allowed:
        assert not subscription_access(state, grace, t1 + later_by).allowed


@PROPERTY_SETTINGS
@given(state_and_now(), grace_days)
def test_granting_access_ends_at_is_in_the_future(pair: tuple[SubscriptionState, datetime], grace: int) -> None:
    state, now = pair
    decision = subscription_access(state, grace, now)
    if decision.allowed and decision.access_ends_at is not None:
        assert decision.access_ends_at > now


@st.composite
def customer_at(draw: st.DrawFn) -> tuple[list[SubscriptionState], datetime]:
    """Several subscriptions of one customer, created around `now` so that their decisions vary."""
    now = draw(instants)
    created = st.timedeltas(min_value=timedelta(days=-60), max_value=timedelta(days=60)).map(lambda d: now + d)
    plans = st.sampled_from([WITH_FEATURE, WITHOUT_FEATURE])
    subs = draw(st.lists(states(product_id=plans, created=created), max_size=5))
    return subs, now


@PROPERTY_SETTINGS
@given(customer_at())
def test_boolean_feature_granted_iff_some_subscription_carrying_it_grants(
    customer: tuple[list[SubscriptionState], datetime],
) -> None:
    subs, now = customer
    decision = feature_access(subs, CATALOG, FEATURE, now)
    carriers_grant = [decide(s, CATALOG, now).allowed for s in subs if s.product_id == WITH_FEATURE]
    assert decision.allowed == any(carriers_grant)
    assert decision.allowed == decision.reason.grants
    if decision.allowed:
        assert decision.subscription is not None
        assert decision.subscription.product_id == WITH_FEATURE
