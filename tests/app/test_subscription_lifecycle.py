"""Subscription lifecycles end to end (DESIGN §5, §7): signed webhooks in, CheckAccess/GetSubscription out, with the
service's clock moved through time. Access that ends is a comparison at check time, so no webhook is needed for it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from tests.support import (
    CUSTOMER_ID,
    PRO,
    STARTER,
    SUB_ID,
    TEAM,
    FakeClock,
    WebhookPoster,
    deliver,
    load_event,
    subscription_event,
    utc,
)

# Only the .pyi has the async stub type; at run time the stub is built from an aio channel.
Stub: TypeAlias = "pb_grpc.EntitlementServiceAsyncStub"

# The fixtures' subscription: created, and first period ending, at these instants.
CREATED = utc("2026-09-01T10:15:02.481233Z")
PERIOD_END = utc("2026-10-01T10:15:02.481233Z")
DAY = timedelta(days=1)
SECOND = timedelta(seconds=1)
PRO_GRACE = 3 * DAY  # catalog.example.toml: Pro overrides the default on_hold grace
DEFAULT_GRACE = 7 * DAY  # catalog.example.toml: Team has no grace of its own

SECOND_SUB = "sub_2Qm7Xc4Vn9Bt1Lk6Hj3Pw"
OTHER_CUSTOMER = "cus_0Zz9Yy8Xx7Ww6Vv5Uu4Tt"

Verdict = tuple[bool, str, datetime | None]


async def check(stub: Stub, feature: str = "dashboard", customer_id: str = CUSTOMER_ID) -> pb.CheckAccessResponse:
    return await stub.CheckAccess(pb.CheckAccessRequest(customer_id=customer_id, feature=feature))


def verdict(response: pb.CheckAccessResponse) -> Verdict:
    """allowed, reason name, access_ends_at (None when unset): readable in assertion failures."""
    ends = response.access_ends_at.ToDatetime(tzinfo=UTC) if response.HasField("access_ends_at") else None
    return response.allowed, pb.AccessReason.Name(response.reason), ends


def granted(reason: str, ends: datetime | None = None) -> Verdict:
    return True, f"ACCESS_REASON_{reason}", ends


def denied(reason: str = "SUBSCRIPTION_INACTIVE") -> Verdict:
    return False, f"ACCESS_REASON_{reason}", None


async def test_trial_then_paid_then_on_hold_grace_expiry_and_recovery(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    trial_end = CREATED + 14 * DAY
    await deliver(
        webhooks,
        subscription_event(
            "subscription.active",
            timestamp=CREATED + 30 * SECOND,
            trial_period_days=14,
            previous_billing_date=CREATED,
            next_billing_date=trial_end,
        ),
    )
    clock.set(CREATED + 2 * DAY)
    assert verdict(await check(stub)) == granted("TRIALING")

    # The trial is over and the renewal webhook is late: a paying customer is never revoked for that.
    clock.set(trial_end + 10 * SECOND)
    assert verdict(await check(stub)) == granted("ACTIVE")

    second_period_end = trial_end + 30 * DAY
    await deliver(
        webhooks,
        subscription_event(
            "subscription.renewed",
            timestamp=trial_end + 70 * SECOND,
            trial_period_days=14,
            previous_billing_date=trial_end,
            next_billing_date=second_period_end,
        ),
    )
    clock.set(trial_end + DAY)
    response = await check(stub)
    assert verdict(response) == granted("ACTIVE")
    assert (response.status, response.subscription_id, response.product_id) == ("active", SUB_ID, PRO)

    on_hold_at = second_period_end + 2 * 60 * SECOND
    on_hold: dict[str, Any] = {
        "status": "on_hold",
        "trial_period_days": 14,
        "previous_billing_date": second_period_end,
        "next_billing_date": second_period_end + 30 * DAY,
    }
    await deliver(webhooks, subscription_event("subscription.on_hold", timestamp=on_hold_at, **on_hold))
    clock.set(on_hold_at + 60 * SECOND)
    response = await check(stub)
    assert verdict(response) == granted("GRACE_PERIOD", on_hold_at + PRO_GRACE)
    assert response.status == "on_hold"

    # Grace runs from the first event that showed on_hold; a later on_hold snapshot does not extend it.
    await deliver(webhooks, subscription_event("subscription.updated", timestamp=on_hold_at + DAY, **on_hold))
    clock.set(on_hold_at + PRO_GRACE - SECOND)
    assert verdict(await check(stub)) == granted("GRACE_PERIOD", on_hold_at + PRO_GRACE)

    clock.set(on_hold_at + PRO_GRACE)
    response = await check(stub)
    assert verdict(response) == denied()
    assert (response.status, response.subscription_id) == ("on_hold", SUB_ID)

    recovered_at = on_hold_at + 4 * DAY
    await deliver(
        webhooks,
        subscription_event(
            "subscription.renewed",
            timestamp=recovered_at,
            trial_period_days=14,
            previous_billing_date=recovered_at,
            next_billing_date=recovered_at + 30 * DAY,
        ),
    )
    clock.set(recovered_at + 60 * SECOND)
    response = await check(stub)
    assert verdict(response) == granted("ACTIVE")
    assert response.status == "active"


async def test_a_new_on_hold_episode_after_recovery_gets_a_fresh_grace_period(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    first_hold = PERIOD_END + 60 * SECOND
    recovered = first_hold + 10 * DAY
    second_hold = recovered + 30 * DAY
    await deliver(
        webhooks,
        subscription_event("subscription.active", timestamp=CREATED + 30 * SECOND),
        subscription_event("subscription.on_hold", timestamp=first_hold, status="on_hold"),
        subscription_event("subscription.active", timestamp=recovered),
        subscription_event("subscription.on_hold", timestamp=second_hold, status="on_hold"),
    )
    clock.set(second_hold + DAY)
    assert verdict(await check(stub)) == granted("GRACE_PERIOD", second_hold + PRO_GRACE)


async def test_an_older_event_delivered_late_does_not_take_access_away(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    """Dodo does not order deliveries: the renewal can overtake the on_hold it resolved."""
    on_hold = load_event("subscription_on_hold")
    renewed_after_retry = subscription_event(
        "subscription.renewed", timestamp=utc(on_hold["timestamp"]) + DAY, base="subscription_renewed"
    )
    await deliver(webhooks, load_event("subscription_active"), renewed_after_retry)
    status, body = await webhooks.send(on_hold)
    assert (status, body) == (200, {"status": "stale"})
    clock.set(PERIOD_END + 30 * DAY)
    assert verdict(await check(stub)) == granted("ACTIVE")


@pytest.mark.parametrize(
    ("event_type", "status"),
    [("subscription.updated", "active"), ("subscription.cancelled", "cancelled")],
)
async def test_cancellation_at_period_end_keeps_access_until_the_next_billing_date(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock, event_type: str, status: str
) -> None:
    await deliver(
        webhooks,
        subscription_event("subscription.active", timestamp=CREATED + 30 * SECOND),
        subscription_event(
            event_type,
            timestamp=CREATED + 10 * DAY,
            status=status,
            cancel_at_next_billing_date=True,
            cancelled_at=CREATED + 10 * DAY,
        ),
    )
    clock.set(CREATED + 11 * DAY)
    response = await check(stub)
    assert verdict(response) == granted("CANCELLATION_SCHEDULED", PERIOD_END)
    assert response.status == status

    clock.set(PERIOD_END - SECOND)
    assert verdict(await check(stub)) == granted("CANCELLATION_SCHEDULED", PERIOD_END)

    clock.set(PERIOD_END)
    response = await check(stub)
    assert verdict(response) == denied()
    assert (response.status, response.subscription_id) == (status, SUB_ID)


async def test_immediate_cancellation_revokes_access_before_the_period_ends(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await deliver(webhooks, load_event("subscription_active"), load_event("subscription_cancelled"))
    clock.set(utc("2026-09-20T14:31:00Z"))
    response = await check(stub)
    assert verdict(response) == denied()
    assert (response.status, response.subscription_id, response.product_id) == ("cancelled", SUB_ID, PRO)


async def test_plan_change_to_team_unlocks_team_features_and_limits(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    clock.set(utc("2026-09-10T00:00:00Z"))
    assert verdict(await check(stub, "sso")) == denied("FEATURE_NOT_IN_PLAN")
    assert (await check(stub, "projects")).limit == 50

    await deliver(webhooks, load_event("subscription_plan_changed"))
    clock.set(utc("2026-09-16T00:00:00Z"))
    sso = await check(stub, "sso")
    assert verdict(sso) == granted("ACTIVE")
    assert (sso.subscription_id, sso.product_id) == (SUB_ID, TEAM)
    projects = await check(stub, "projects")
    assert (projects.allowed, projects.limit, projects.kind) == (True, 500, pb.FEATURE_KIND_LIMIT)

    subscription = (await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=SUB_ID))).subscription
    assert (subscription.product_id, subscription.quantity, subscription.plan_name) == (TEAM, 3, "Team")
    assert subscription.recurring_amount == 7500
    assert "sso" in subscription.features
    assert subscription.limits["projects"] == 500


@pytest.mark.parametrize(
    ("event_type", "status"),
    [
        ("subscription.expired", "expired"),
        ("subscription.paused", "paused"),
        ("subscription.failed", "failed"),
        ("subscription.updated", "pending"),
        ("subscription.updated", "frozen_by_a_future_dodo"),
    ],
)
async def test_statuses_without_access_deny_every_feature(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock, event_type: str, status: str
) -> None:
    await deliver(
        webhooks,
        subscription_event("subscription.active", timestamp=CREATED + 30 * SECOND),
        subscription_event(event_type, timestamp=CREATED + 5 * DAY, status=status),
    )
    clock.set(CREATED + 6 * DAY)  # well inside the paid period: the status alone decides
    for feature in ("dashboard", "projects"):
        response = await check(stub, feature)
        assert verdict(response) == denied()
        assert (response.status, response.subscription_id) == (status, SUB_ID)


async def test_past_due_grants_grace_until_past_due_ends_at(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    past_due_ends_at = PERIOD_END + 5 * DAY
    await deliver(
        webhooks,
        subscription_event(
            "subscription.past_due",
            timestamp=PERIOD_END + 60 * SECOND,
            status="past_due",
            past_due_ends_at=past_due_ends_at,
        ),
    )
    # Later than the plan's 3-day on_hold grace would allow: Dodo's own deadline rules for past_due.
    clock.set(past_due_ends_at - SECOND)
    response = await check(stub)
    assert verdict(response) == granted("GRACE_PERIOD", past_due_ends_at)
    assert response.status == "past_due"

    clock.set(past_due_ends_at)
    assert verdict(await check(stub)) == denied()


async def test_past_due_without_a_deadline_gets_the_on_hold_grace(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    past_due_at = PERIOD_END + 60 * SECOND
    await deliver(
        webhooks,
        subscription_event("subscription.past_due", timestamp=past_due_at, status="past_due", past_due_ends_at=None),
    )
    clock.set(past_due_at + DAY)
    assert verdict(await check(stub)) == granted("GRACE_PERIOD", past_due_at + PRO_GRACE)
    clock.set(past_due_at + PRO_GRACE)
    assert verdict(await check(stub)) == denied()


async def test_an_active_subscription_wins_over_a_cancelled_one(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await deliver(
        webhooks,
        load_event("subscription_active"),
        load_event("subscription_cancelled"),
        subscription_event(
            "subscription.active",
            timestamp=CREATED + 21 * DAY,
            subscription_id=SECOND_SUB,
            product_id=TEAM,
            created_at=CREATED + 21 * DAY,
        ),
    )
    clock.set(CREATED + 22 * DAY)
    for feature in ("dashboard", "pro", "sso"):
        response = await check(stub, feature)
        assert verdict(response) == granted("ACTIVE"), feature
        assert (response.subscription_id, response.product_id, response.status) == (SECOND_SUB, TEAM, "active")


async def test_open_ended_access_wins_over_access_that_ends(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await deliver(
        webhooks,
        subscription_event("subscription.active", timestamp=CREATED + 30 * SECOND),
        subscription_event(
            "subscription.active",
            timestamp=CREATED + 2 * DAY,
            subscription_id=SECOND_SUB,
            product_id=TEAM,
            created_at=CREATED + 2 * DAY,
            cancel_at_next_billing_date=True,
        ),
    )
    clock.set(CREATED + 3 * DAY)
    response = await check(stub)
    assert verdict(response) == granted("ACTIVE")
    assert response.subscription_id == SUB_ID


async def test_among_ending_grants_the_latest_end_wins(webhooks: WebhookPoster, stub: Stub, clock: FakeClock) -> None:
    on_hold_at = PERIOD_END - DAY
    await deliver(
        webhooks,
        # Pro: cancelled at period end (ends PERIOD_END).
        subscription_event("subscription.active", timestamp=CREATED + 30 * SECOND, cancel_at_next_billing_date=True),
        # Team: on hold since the day before PERIOD_END, with a 7-day grace.
        subscription_event(
            "subscription.on_hold",
            timestamp=on_hold_at,
            subscription_id=SECOND_SUB,
            product_id=TEAM,
            status="on_hold",
            created_at=CREATED - 5 * DAY,
        ),
    )
    clock.set(PERIOD_END - 60 * SECOND)
    response = await check(stub)
    assert verdict(response) == granted("GRACE_PERIOD", on_hold_at + DEFAULT_GRACE)
    assert (response.subscription_id, response.status) == (SECOND_SUB, "on_hold")


async def test_a_feature_only_an_inactive_subscription_carries_is_denied_as_inactive(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await deliver(
        webhooks,
        load_event("subscription_active"),
        load_event("subscription_cancelled"),
        subscription_event(
            "subscription.active",
            timestamp=CREATED + 21 * DAY,
            subscription_id=SECOND_SUB,
            product_id=STARTER,
            created_at=CREATED + 21 * DAY,
        ),
    )
    clock.set(CREATED + 22 * DAY)
    pro = await check(stub, "pro")
    assert verdict(pro) == denied()
    assert (pro.subscription_id, pro.status) == (SUB_ID, "cancelled")
    dashboard = await check(stub, "dashboard")
    assert verdict(dashboard) == granted("ACTIVE")
    assert dashboard.subscription_id == SECOND_SUB


async def test_an_active_plan_without_the_feature_answers_feature_not_in_plan(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await deliver(webhooks, subscription_event("subscription.active", timestamp=CREATED, product_id=STARTER))
    clock.set(CREATED + DAY)
    response = await check(stub, "sso")
    assert verdict(response) == denied("FEATURE_NOT_IN_PLAN")
    assert (response.subscription_id, response.product_id, response.status) == (SUB_ID, STARTER, "active")


async def test_a_customer_whose_subscriptions_are_all_inactive_is_denied_as_inactive(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await deliver(
        webhooks,
        subscription_event("subscription.expired", timestamp=CREATED, product_id=STARTER, status="expired"),
    )
    clock.set(CREATED + DAY)
    # "sso" is in no plan the customer has, but with nothing granting the answer is "inactive", not "upgrade".
    assert verdict(await check(stub, "sso")) == denied()


async def test_an_unknown_customer_has_no_subscription(webhooks: WebhookPoster, stub: Stub, clock: FakeClock) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    clock.set(CREATED + DAY)
    response = await check(stub, "dashboard", customer_id=OTHER_CUSTOMER)
    assert response == pb.CheckAccessResponse(
        allowed=False, reason=pb.ACCESS_REASON_NO_SUBSCRIPTION, kind=pb.FEATURE_KIND_BOOLEAN, customer_id=OTHER_CUSTOMER
    )
