"""Ordering, duplicates and concurrency of webhook deliveries (DESIGN §7, §8: no ordering guarantee, repeats happen).

Deliveries go to the real HTTP port, state is read back through gRPC; inbox statuses and `last_event_at`, which no
RPC exposes, are read from the tables."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from sqlalchemy import select

from storage.engine import Database
from storage.models import Subscription, WebhookInbox
from tests.support import (
    CUSTOMER_ID,
    SUB_ID,
    FakeClock,
    WebhookPoster,
    count_rows,
    inbox_statuses,
    sign,
    stored_counts,
    subscription_event,
    utc,
)

T0 = utc("2026-09-01T10:15:40Z")
HOLD_AT = utc("2026-10-01T10:17:45.330871Z")
PRO_GRACE = timedelta(days=3)  # service/catalog.example.toml, plan pdt_6Gx2Kq9LwPro0Mth4Rt1
DAY = timedelta(days=1)


async def current(stub: pb_grpc.EntitlementServiceAsyncStub) -> pb.Subscription:
    return (await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=SUB_ID))).subscription


async def dashboard(stub: pb_grpc.EntitlementServiceAsyncStub) -> pb.CheckAccessResponse:
    return await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="dashboard"))


async def last_event_at(db: Database, subscription_id: str = SUB_ID) -> datetime | None:
    async with db.session() as session:
        return await session.scalar(
            select(Subscription.last_event_at).where(Subscription.subscription_id == subscription_id)
        )


def on_hold(at: datetime) -> dict[str, Any]:
    return subscription_event("subscription.on_hold", timestamp=at, base="subscription_on_hold")


async def test_older_event_after_a_newer_one_is_kept_as_stale_and_does_not_regress_state(
    webhooks: WebhookPoster, db: Database, stub: pb_grpc.EntitlementServiceAsyncStub
) -> None:
    newer = subscription_event("subscription.plan_changed", timestamp=T0 + 2 * DAY, quantity=2)
    older = subscription_event("subscription.cancelled", timestamp=T0 + DAY, status="cancelled", cancelled_at=T0 + DAY)
    assert await webhooks.send(newer, webhook_id="msg_newer") == (200, {"status": "applied"})

    assert await webhooks.send(older, webhook_id="msg_older") == (200, {"status": "stale"})

    assert await inbox_statuses(db) == {"msg_newer": "applied", "msg_older": "stale"}
    sub = await current(stub)
    assert (sub.status, sub.quantity, sub.HasField("cancelled_at")) == ("active", 2, False)
    assert await last_event_at(db) == T0 + 2 * DAY


async def test_same_event_delivered_twice_under_different_webhook_ids_is_idempotent(
    webhooks: WebhookPoster, db: Database, stub: pb_grpc.EntitlementServiceAsyncStub, clock: FakeClock
) -> None:
    clock.set(HOLD_AT + DAY)
    event = on_hold(HOLD_AT)
    assert await webhooks.send(event, webhook_id="msg_first_try") == (200, {"status": "applied"})
    before = await dashboard(stub)

    status, _ = await webhooks.send(event, webhook_id="msg_redelivered")

    assert status == 200
    assert set(await inbox_statuses(db)) == {"msg_first_try", "msg_redelivered"}
    after = await dashboard(stub)
    assert after == before
    assert (after.reason, after.access_ends_at.ToDatetime(tzinfo=UTC)) == (
        pb.ACCESS_REASON_GRACE_PERIOD,
        HOLD_AT + PRO_GRACE,
    )
    assert await count_rows(db, Subscription) == 1
    assert await last_event_at(db) == HOLD_AT


SEQUENCE = (
    ("active", subscription_event("subscription.active", timestamp=T0)),
    ("on_hold", subscription_event("subscription.on_hold", timestamp=T0 + DAY, status="on_hold")),
    ("cancelled", subscription_event("subscription.cancelled", timestamp=T0 + 2 * DAY, status="cancelled")),
)


@pytest.mark.parametrize(
    "order",
    list(itertools.permutations(range(len(SEQUENCE)))),
    ids=lambda order: "-".join(SEQUENCE[i][0] for i in order),
)
async def test_any_arrival_order_ends_in_the_state_of_the_newest_event(
    webhooks: WebhookPoster, db: Database, stub: pb_grpc.EntitlementServiceAsyncStub, order: tuple[int, ...]
) -> None:
    expected: dict[str, str] = {}
    newest_seen = -1
    for index in order:
        name, event = SEQUENCE[index]
        status, body = await webhooks.send(event, webhook_id=f"msg_{name}")
        assert status == 200
        expected[f"msg_{name}"] = "applied" if index > newest_seen else "stale"
        assert body == {"status": expected[f"msg_{name}"]}
        newest_seen = max(newest_seen, index)

    assert await inbox_statuses(db) == expected
    assert (await current(stub)).status == "cancelled"
    assert await last_event_at(db) == T0 + 2 * DAY
    response = await dashboard(stub)
    assert (response.allowed, response.reason) == (False, pb.ACCESS_REASON_SUBSCRIPTION_INACTIVE)


async def test_cancelled_then_an_older_active_event_stays_cancelled(
    webhooks: WebhookPoster, stub: pb_grpc.EntitlementServiceAsyncStub
) -> None:
    cancelled = subscription_event(
        "subscription.cancelled", timestamp=T0 + DAY, status="cancelled", cancelled_at=T0 + DAY
    )
    assert await webhooks.send(cancelled) == (200, {"status": "applied"})

    assert await webhooks.send(subscription_event("subscription.active", timestamp=T0)) == (200, {"status": "stale"})

    response = await dashboard(stub)
    assert (response.allowed, response.reason, response.status) == (
        False,
        pb.ACCESS_REASON_SUBSCRIPTION_INACTIVE,
        "cancelled",
    )


async def test_on_hold_grace_is_measured_from_the_first_event_that_showed_on_hold(
    webhooks: WebhookPoster, stub: pb_grpc.EntitlementServiceAsyncStub, clock: FakeClock
) -> None:
    for at in (HOLD_AT, HOLD_AT + DAY):
        assert await webhooks.send(on_hold(at)) == (200, {"status": "applied"})

    clock.set(HOLD_AT + 2 * DAY)
    response = await dashboard(stub)
    assert (response.allowed, response.reason) == (True, pb.ACCESS_REASON_GRACE_PERIOD)
    assert response.access_ends_at.ToDatetime(tzinfo=UTC) == HOLD_AT + PRO_GRACE

    clock.set(HOLD_AT + PRO_GRACE)
    response = await dashboard(stub)
    assert (response.allowed, response.reason) == (False, pb.ACCESS_REASON_SUBSCRIPTION_INACTIVE)


async def test_a_recovery_ends_the_hold_and_the_next_hold_starts_a_new_grace(
    webhooks: WebhookPoster, stub: pb_grpc.EntitlementServiceAsyncStub, clock: FakeClock
) -> None:
    recovered = subscription_event("subscription.renewed", timestamp=HOLD_AT + DAY, base="subscription_renewed")
    for event in (on_hold(HOLD_AT), recovered, on_hold(HOLD_AT + 2 * DAY)):
        assert await webhooks.send(event) == (200, {"status": "applied"})

    clock.set(HOLD_AT + PRO_GRACE + timedelta(hours=1))
    response = await dashboard(stub)
    assert (response.allowed, response.reason) == (True, pb.ACCESS_REASON_GRACE_PERIOD)
    assert response.access_ends_at.ToDatetime(tzinfo=UTC) == HOLD_AT + 2 * DAY + PRO_GRACE


async def test_a_late_first_on_hold_event_moves_the_grace_start_back_without_regressing_state(
    webhooks: WebhookPoster, stub: pb_grpc.EntitlementServiceAsyncStub, clock: FakeClock
) -> None:
    """Dodo delivers out of order: the on_hold event of T1 arrives after a later one of T1 + 20 h. Grace still runs
    from T1, the first event that showed on_hold, and the late event is kept as stale."""
    later = HOLD_AT + timedelta(hours=20)
    assert await webhooks.send(on_hold(later)) == (200, {"status": "applied"})
    clock.set(later + timedelta(hours=1))
    assert (await dashboard(stub)).access_ends_at.ToDatetime(tzinfo=UTC) == later + PRO_GRACE

    assert await webhooks.send(on_hold(HOLD_AT)) == (200, {"status": "stale"})
    response = await dashboard(stub)
    assert (response.allowed, response.reason) == (True, pb.ACCESS_REASON_GRACE_PERIOD)
    assert response.access_ends_at.ToDatetime(tzinfo=UTC) == HOLD_AT + PRO_GRACE
    clock.set(HOLD_AT + PRO_GRACE)
    assert (await dashboard(stub)).reason == pb.ACCESS_REASON_SUBSCRIPTION_INACTIVE


async def test_a_late_on_hold_event_from_before_a_known_recovery_does_not_move_the_grace_start(
    webhooks: WebhookPoster, stub: pb_grpc.EntitlementServiceAsyncStub, clock: FakeClock
) -> None:
    recovered = subscription_event("subscription.renewed", timestamp=HOLD_AT + DAY, base="subscription_renewed")
    for event in (recovered, on_hold(HOLD_AT + 2 * DAY)):
        assert await webhooks.send(event) == (200, {"status": "applied"})
    # An on_hold from before the recovery belongs to an earlier episode.
    assert await webhooks.send(on_hold(HOLD_AT)) == (200, {"status": "stale"})
    clock.set(HOLD_AT + 2 * DAY + timedelta(hours=1))
    response = await dashboard(stub)
    assert response.access_ends_at.ToDatetime(tzinfo=UTC) == HOLD_AT + 2 * DAY + PRO_GRACE


async def test_envelope_without_timestamp_is_ordered_by_the_signed_header_time(
    webhooks: WebhookPoster, db: Database, stub: pb_grpc.EntitlementServiceAsyncStub
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    untimed = subscription_event("subscription.updated", timestamp=now, quantity=4)
    del untimed["timestamp"]
    body = json.dumps(untimed).encode()
    headers = sign(body, webhook_id="msg_untimed", at=now)
    # The verifier reads the header as a number, so a fractional form of the signed second verifies too.
    headers["webhook-timestamp"] += ".0"
    assert await webhooks.post_raw(body, headers) == (200, {"status": "applied"})
    earlier = subscription_event("subscription.updated", timestamp=now - DAY, quantity=9)

    assert await webhooks.send(earlier) == (200, {"status": "stale"})

    assert await last_event_at(db) == now
    assert (await current(stub)).quantity == 4


# --- concurrency: many deliveries at once over the real HTTP port ------------------------------------------------

CONCURRENT = 20
STATUSES = ("active", "on_hold", "paused", "past_due", "active")


async def test_concurrent_distinct_events_for_one_subscription_end_in_the_newest_events_state(
    webhooks: WebhookPoster, db: Database, stub: pb_grpc.EntitlementServiceAsyncStub
) -> None:
    events = [
        (
            f"msg_{n:02d}",
            subscription_event(
                "subscription.updated",
                timestamp=T0 + timedelta(minutes=n),
                status=STATUSES[n % len(STATUSES)],
                quantity=n + 1,
            ),
        )
        for n in range(CONCURRENT)
    ]
    random.Random(20).shuffle(events)

    answers = await asyncio.gather(*(webhooks.send(event, webhook_id=webhook_id) for webhook_id, event in events))

    assert [status for status, _ in answers] == [200] * CONCURRENT
    newest = CONCURRENT - 1
    sub = await current(stub)
    assert (sub.status, sub.quantity) == (STATUSES[newest % len(STATUSES)], newest + 1)
    assert await last_event_at(db) == T0 + timedelta(minutes=newest)
    statuses = await inbox_statuses(db)
    assert len(statuses) == CONCURRENT
    assert set(statuses.values()) <= {"applied", "stale"}
    assert statuses[f"msg_{newest:02d}"] == "applied"
    assert await stored_counts(db) == {"webhook_inbox": CONCURRENT, "subscriptions": 1, "customers": 1}


async def test_concurrent_deliveries_of_the_same_webhook_id_store_one_row_and_all_get_200(
    webhooks: WebhookPoster, db: Database, stub: pb_grpc.EntitlementServiceAsyncStub
) -> None:
    event = subscription_event("subscription.active", timestamp=T0)

    answers = await asyncio.gather(*(webhooks.send(event, webhook_id="msg_same") for _ in range(CONCURRENT)))

    assert sorted(body["status"] for status, body in answers if status == 200) == sorted(
        ["applied"] + ["duplicate"] * (CONCURRENT - 1)
    )
    assert await inbox_statuses(db) == {"msg_same": "applied"}
    assert await count_rows(db, WebhookInbox) == 1
    assert (await current(stub)).status == "active"


async def test_concurrent_first_deliveries_for_a_new_subscription_do_not_fail_on_the_insert_race(
    webhooks: WebhookPoster, db: Database, stub: pb_grpc.EntitlementServiceAsyncStub
) -> None:
    # Dodo fires several events at once when a subscription starts; all carry the same new snapshot.
    types = ("subscription.active", "subscription.updated", "subscription.renewed", "subscription.plan_changed")
    events = [subscription_event(types[n % len(types)], timestamp=T0) for n in range(CONCURRENT)]

    answers = await asyncio.gather(*(webhooks.send(event) for event in events))

    assert answers == [(200, {"status": "applied"})] * CONCURRENT
    assert await stored_counts(db) == {"webhook_inbox": CONCURRENT, "subscriptions": 1, "customers": 1}
    assert (await current(stub)).status == "active"


async def test_concurrent_first_deliveries_for_a_new_customers_subscriptions_do_not_fail_on_the_insert_race(
    webhooks: WebhookPoster, db: Database, stub: pb_grpc.EntitlementServiceAsyncStub
) -> None:
    events = [
        subscription_event("subscription.active", timestamp=T0, subscription_id=f"sub_new_{n:02d}")
        for n in range(CONCURRENT)
    ]

    answers = await asyncio.gather(*(webhooks.send(event) for event in events))

    assert answers == [(200, {"status": "applied"})] * CONCURRENT
    assert await stored_counts(db) == {"webhook_inbox": CONCURRENT, "subscriptions": CONCURRENT, "customers": 1}
    response = await dashboard(stub)
    assert (response.allowed, response.reason) == (True, pb.ACCESS_REASON_ACTIVE)
