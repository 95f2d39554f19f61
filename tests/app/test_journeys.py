"""Subscription journeys for callers (issue 11, DESIGN §13): CreateCheckout, CreatePortalSession,
CancelSubscription, ResumeSubscription and ListPlans through generated stubs on the real server, against the fake
Dodo through the real SDK; and the journey a calling team runs, driven only from outside."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from service.app.dodo_gateway import DodoGateway
from service.domain.catalog import Catalog
from service.server import Running, start
from storage.engine import Database
from tests.fakedodo import ADDON_EXTRA_SEAT, PRODUCT_PRO, PRODUCT_TEAM, FakeDodo
from tests.support import (
    API_TOKEN,
    CUSTOMER_ID,
    BearerToken,
    FakeClock,
    WebhookPoster,
    deliver,
    error_info,
    iso,
    load_event,
    make_settings,
)

Stub: TypeAlias = "pb_grpc.EntitlementServiceAsyncStub"
REF = "org_1337"


def checkout(key: str = "co-1", **fields: Any) -> pb.CreateCheckoutRequest:
    base: dict[str, Any] = {
        "customer_ref": REF,
        "email": "ada@example.com",
        "items": [pb.CheckoutItem(product_id=PRODUCT_PRO, quantity=1)],
        "return_url": "https://app.example/billing/done",
        "idempotency_key": key,
    }
    return pb.CreateCheckoutRequest(**{**base, **fields})


async def failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


def dodo_event(event_type: str, data: dict[str, Any], *, at: datetime) -> dict[str, Any]:
    return {"business_id": "bus_0NmY7fQz4kR2sT8vW1xJa", "type": event_type, "timestamp": iso(at), "data": data}


# ------------------------------------------------------------------------------------------------ CreateCheckout


async def test_create_checkout_opens_a_dodo_session_with_the_cart_trial_and_ref(
    stub: Stub, fake_dodo: FakeDodo
) -> None:
    request = checkout(
        items=[
            pb.CheckoutItem(
                product_id=PRODUCT_PRO, quantity=2, addons=[pb.CheckoutAddon(addon_id=ADDON_EXTRA_SEAT, quantity=1)]
            )
        ],
        trial_period_days=14,
        cancel_url="https://app.example/billing/cancelled",
        discount_code="WELCOME10",
        metadata={"plan_page": "pricing-v2"},
    )
    created = await stub.CreateCheckout(request)
    assert created.session_id.startswith("cks_")
    assert created.checkout_url.startswith("http")
    assert not created.replayed
    assert created.expires_at.ToDatetime(tzinfo=UTC) > datetime.now(UTC) + timedelta(hours=23)
    (sent,) = fake_dodo.requests_matching("POST /checkouts")
    assert sent.json["product_cart"] == [
        {"product_id": PRODUCT_PRO, "quantity": 2, "addons": [{"addon_id": ADDON_EXTRA_SEAT, "quantity": 1}]}
    ]
    assert sent.json["subscription_data"] == {"trial_period_days": 14}
    assert sent.json["metadata"] == {"plan_page": "pricing-v2", "customer_ref": REF}
    assert sent.json["customer"] == {"email": "ada@example.com"}
    assert sent.json["discount_codes"] == ["WELCOME10"]
    assert (sent.json["return_url"], sent.json["cancel_url"]) == (
        "https://app.example/billing/done",
        "https://app.example/billing/cancelled",
    )


async def test_the_same_key_and_request_replays_the_stored_session_and_other_parameters_are_refused(
    stub: Stub, fake_dodo: FakeDodo
) -> None:
    first = await stub.CreateCheckout(checkout())
    again = await stub.CreateCheckout(checkout())
    assert (again.session_id, again.checkout_url, again.replayed) == (first.session_id, first.checkout_url, True)
    assert len(fake_dodo.requests_matching("POST /checkouts")) == 1
    reused = await failure(stub.CreateCheckout(checkout(trial_period_days=3)))
    assert reused.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(reused).reason == "IDEMPOTENCY_KEY_REUSED"


async def test_a_customer_with_an_access_granting_subscription_is_already_subscribed(
    stub: Stub, webhooks: WebhookPoster, fake_dodo: FakeDodo
) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    fake_dodo.customers.add(CUSTOMER_ID)
    refused = await failure(stub.CreateCheckout(checkout(customer_ref="", customer_id=CUSTOMER_ID)))
    assert refused.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(refused).reason == "ALREADY_SUBSCRIBED"
    assert fake_dodo.requests_matching("POST /checkouts") == []
    allowed = await stub.CreateCheckout(
        checkout(key="co-2", customer_ref="", customer_id=CUSTOMER_ID, allow_additional=True)
    )
    assert allowed.session_id
    (sent,) = fake_dodo.requests_matching("POST /checkouts")
    assert sent.json["customer"] == {"customer_id": CUSTOMER_ID}


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"items": []}, "items", "FIELD_INVALID"),
        ({"items": [pb.CheckoutItem(product_id="pdt_not_ours")]}, "product_id", "PRODUCT_NOT_IN_CATALOG"),
        ({"items": [pb.CheckoutItem(product_id=PRODUCT_PRO, quantity=-1)]}, "items.quantity", "FIELD_INVALID"),
        ({"customer_ref": "", "email": ""}, "customer_id", "FIELD_INVALID"),
        ({"customer_id": CUSTOMER_ID}, "customer_ref", "FIELD_INVALID"),
        ({"email": "not-an-address"}, "email", "FIELD_INVALID"),
        ({"return_url": "javascript:alert(1)"}, "return_url", "FIELD_INVALID"),
        ({"cancel_url": "https://x\x00"}, "cancel_url", "FIELD_INVALID"),
        ({"trial_period_days": 10_001}, "trial_period_days", "FIELD_INVALID"),
        ({"metadata": {"customer_ref": "org_other"}}, "metadata", "FIELD_INVALID"),
        ({"metadata": {f"k{n}": "v" for n in range(51)}}, "metadata", "FIELD_INVALID"),
        ({"idempotency_key": ""}, "idempotency_key", "FIELD_INVALID"),
        ({"discount_code": "x" * 300}, "discount_code", "FIELD_INVALID"),
    ],
)
async def test_create_checkout_refuses_bad_input_before_calling_dodo(
    stub: Stub, fake_dodo: FakeDodo, fields: dict[str, Any], field: str, reason: str
) -> None:
    refused = await failure(stub.CreateCheckout(checkout(**fields)))
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT, refused.details()
    info = error_info(refused)
    assert (info.reason, info.metadata["field"]) == (reason, field)
    assert fake_dodo.requests == []


async def test_dodo_refusing_a_checkout_is_failed_precondition_and_frees_the_key(
    stub: Stub, fake_dodo: FakeDodo
) -> None:
    fake_dodo.fail_next("POST /checkouts", 422, body={"code": "INVALID_REQUEST_BODY", "message": "bad cart"})
    refused = await failure(stub.CreateCheckout(checkout()))
    assert refused.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "bad cart" in (refused.details() or "")
    assert (await stub.CreateCheckout(checkout())).session_id, "the key was freed by the definite refusal"


async def test_dodo_unreachable_is_unavailable_and_a_retry_opens_the_session_once(
    stub: Stub, fake_dodo: FakeDodo
) -> None:
    fake_dodo.fail_next("POST /checkouts", 503)
    unavailable = await failure(stub.CreateCheckout(checkout()))
    assert unavailable.code() is grpc.StatusCode.UNAVAILABLE
    retried = await stub.CreateCheckout(checkout())
    replayed = await stub.CreateCheckout(checkout())
    assert (replayed.session_id, replayed.replayed) == (retried.session_id, True)


# ------------------------------------------------------------------------------------------ CreatePortalSession


async def test_a_known_customer_gets_a_portal_link_by_id_or_ref(
    stub: Stub, webhooks: WebhookPoster, fake_dodo: FakeDodo
) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    fake_dodo.customers.add(CUSTOMER_ID)
    portal = await stub.CreatePortalSession(
        pb.CreatePortalSessionRequest(customer_id=CUSTOMER_ID, return_url="https://app.example/account")
    )
    assert portal.url.startswith("http")
    assert portal.expires_at.ToDatetime(tzinfo=UTC) > datetime.now(UTC) + timedelta(hours=23)
    assert fake_dodo.portal_sessions[-1]["return_url"] == "https://app.example/account"
    await stub.LinkCustomer(pb.LinkCustomerRequest(customer_ref=REF, customer_id=CUSTOMER_ID))
    assert (await stub.CreatePortalSession(pb.CreatePortalSessionRequest(customer_ref=REF, send_email=True))).url
    assert fake_dodo.portal_sessions[-1]["send_email"] is True


@pytest.mark.parametrize(
    "request_",
    [pb.CreatePortalSessionRequest(customer_id="cus_never_seen"), pb.CreatePortalSessionRequest(customer_ref="org_x")],
    ids=["unknown-id", "unlinked-ref"],
)
async def test_an_unknown_customer_or_unlinked_ref_is_not_found_without_asking_dodo(
    stub: Stub, fake_dodo: FakeDodo, request_: pb.CreatePortalSessionRequest
) -> None:
    missing = await failure(stub.CreatePortalSession(request_))
    assert missing.code() is grpc.StatusCode.NOT_FOUND
    assert fake_dodo.requests == []


# --------------------------------------------------------------------------------------- Cancel and Resume


async def known_at_dodo(fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock, **fields: Any) -> str:
    now = datetime.now(UTC)
    clock.set(now)
    sub = fake_dodo.add_subscription(**fields)
    await deliver(webhooks, dodo_event("subscription.active", sub, at=now - timedelta(seconds=5)))
    return str(sub["subscription_id"])


def cancel(subscription_id: str, key: str = "cancel-1", **fields: Any) -> pb.CancelSubscriptionRequest:
    return pb.CancelSubscriptionRequest(subscription_id=subscription_id, idempotency_key=key, **fields)


async def test_cancel_at_period_end_keeps_access_until_then_and_applies_at_once(
    stub: Stub, fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    sub_id = await known_at_dodo(fake_dodo, webhooks, clock)
    cancelled = await stub.CancelSubscription(cancel(sub_id, reason="cancelled_by_customer"))
    assert cancelled.subscription.cancel_at_period_end
    assert cancelled.subscription.access.reason == pb.ACCESS_REASON_CANCELLATION_SCHEDULED
    (patch,) = fake_dodo.requests_matching("PATCH /subscriptions/*")
    assert patch.json == {"cancel_at_next_billing_date": True, "cancel_reason": "cancelled_by_customer"}
    replay = await stub.CancelSubscription(cancel(sub_id, reason="cancelled_by_customer"))
    assert replay.replayed
    assert len(fake_dodo.requests_matching("PATCH /subscriptions/*")) == 1
    reused = await failure(stub.CancelSubscription(cancel(sub_id, immediately=True)))
    assert error_info(reused).reason == "IDEMPOTENCY_KEY_REUSED"


async def test_cancel_immediately_ends_access_now_with_the_reason_as_comment(
    stub: Stub, fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    sub_id = await known_at_dodo(fake_dodo, webhooks, clock)
    cancelled = await stub.CancelSubscription(cancel(sub_id, immediately=True, reason="moving to a competitor"))
    assert (cancelled.subscription.status, cancelled.subscription.access.allowed) == ("cancelled", False)
    (patch,) = fake_dodo.requests_matching("PATCH /subscriptions/*")
    assert patch.json == {"status": "cancelled", "cancellation_comment": "moving to a competitor"}


async def test_resume_undoes_a_scheduled_cancellation_and_resumes_a_paused_subscription(
    stub: Stub, fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    sub_id = await known_at_dodo(fake_dodo, webhooks, clock)
    await stub.CancelSubscription(cancel(sub_id))
    resumed = await stub.ResumeSubscription(pb.ResumeSubscriptionRequest(subscription_id=sub_id, idempotency_key="r1"))
    assert (resumed.subscription.cancel_at_period_end, resumed.subscription.access.reason) == (
        False,
        pb.ACCESS_REASON_ACTIVE,
    )
    paused_id = await known_at_dodo(fake_dodo, webhooks, clock, status="paused", paused_at=iso(datetime.now(UTC)))
    unpaused = await stub.ResumeSubscription(
        pb.ResumeSubscriptionRequest(subscription_id=paused_id, idempotency_key="r2")
    )
    assert (unpaused.subscription.status, unpaused.subscription.access.allowed) == ("active", True)
    assert fake_dodo.requests_matching("PATCH /subscriptions/*")[-1].json == {"status": "active"}


async def test_resume_with_nothing_to_resume_is_failed_precondition_without_a_patch(
    stub: Stub, fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    sub_id = await known_at_dodo(fake_dodo, webhooks, clock)
    refused = await failure(
        stub.ResumeSubscription(pb.ResumeSubscriptionRequest(subscription_id=sub_id, idempotency_key="r1"))
    )
    assert refused.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert fake_dodo.requests_matching("PATCH /subscriptions/*") == []


async def test_a_cancellation_while_a_plan_change_is_in_flight_is_plan_change_in_progress(
    stub: Stub, fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    sub_id = await known_at_dodo(fake_dodo, webhooks, clock)
    fake_dodo.latency = 0.5  # the plan change is still at Dodo when the cancellation arrives
    change = asyncio.ensure_future(
        stub.ChangePlan(pb.ChangePlanRequest(subscription_id=sub_id, product_id=PRODUCT_TEAM, idempotency_key="c1"))
    )
    await asyncio.sleep(0.3)
    busy = await failure(stub.CancelSubscription(cancel(sub_id)))
    fake_dodo.latency = 0.0
    assert busy.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(busy).reason == "PLAN_CHANGE_IN_PROGRESS"
    assert (await change).subscription.product_id == PRODUCT_TEAM
    assert fake_dodo.requests_matching("PATCH /subscriptions/*") == []


@pytest.mark.parametrize(
    "request_",
    [
        pb.CancelSubscriptionRequest(subscription_id="", idempotency_key="k"),
        pb.CancelSubscriptionRequest(subscription_id="sub_x", idempotency_key=""),
        pb.CancelSubscriptionRequest(subscription_id="sub_x", idempotency_key="k", reason="r" * 501),
        pb.CancelSubscriptionRequest(subscription_id="sub_x", idempotency_key="k", reason="bell\x07"),
    ],
)
async def test_cancel_refuses_bad_input(
    stub: Stub, fake_dodo: FakeDodo, request_: pb.CancelSubscriptionRequest
) -> None:
    refused = await failure(stub.CancelSubscription(request_))
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert fake_dodo.requests == []


async def test_cancelling_a_subscription_dodo_does_not_know_is_not_found(stub: Stub) -> None:
    missing = await failure(stub.CancelSubscription(cancel("sub_0Nn0Nn0Nn0Nn0Nn0Nn0Nn")))
    assert missing.code() is grpc.StatusCode.NOT_FOUND


# ------------------------------------------------------------------------------------------------- ListPlans


async def test_list_plans_joins_the_catalog_with_dodos_prices(stub: Stub, fake_dodo: FakeDodo) -> None:
    listed = await stub.ListPlans(pb.ListPlansRequest())
    by_id = {plan.product_id: plan for plan in listed.plans}
    pro = by_id[PRODUCT_PRO]
    assert (pro.name, list(pro.features), dict(pro.limits)) == (
        "Pro",
        ["dashboard", "pro"],
        {"projects": 50, "seats": 5},
    )
    assert (dict(pro.credits), dict(pro.trial_credits), pro.grace_period_days) == (
        {"ai_tokens": "10000"},
        {"ai_tokens": "1000"},
        3,
    )
    assert pro.price == fake_dodo.products[PRODUCT_PRO]
    assert (pro.currency, pro.billing_interval) == ("USD", "1 Month")
    again = await stub.ListPlans(pb.ListPlansRequest())
    assert [p.price for p in again.plans] == [p.price for p in listed.plans]
    assert len(fake_dodo.requests_matching("GET /products")) == 1, "served from memory until the refresh is due"


async def test_list_plans_without_an_api_key_is_the_catalog_without_prices(
    database_url: str, db: Database, clock: FakeClock, catalog: Catalog
) -> None:
    running: Running = await start(
        make_settings(database_url), clock=clock, catalog=catalog, db=db, dodo=DodoGateway(None)
    )
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{running.grpc_port}", interceptors=[BearerToken(API_TOKEN)]
        ) as channel:
            listed = await pb_grpc.EntitlementServiceStub(channel).ListPlans(pb.ListPlansRequest())
    finally:
        await running.stop(0)
    assert {plan.product_id for plan in listed.plans} == set(catalog.plans)
    assert all((plan.price, plan.currency) == (0, "") for plan in listed.plans)


# ------------------------------------------------------------------------------------------------ the journey


async def test_the_journey_from_checkout_to_resume_driven_from_outside(
    stub: Stub, fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    """CreateCheckout(ref) → Dodo's signed subscription.active carrying the ref → CheckAccess(ref) TRIALING →
    CancelSubscription → CANCELLATION_SCHEDULED until the period ends → ResumeSubscription → ACTIVE."""
    ref = f"org_{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    clock.set(now)
    session = await stub.CreateCheckout(checkout(customer_ref=ref, trial_period_days=14))
    assert (await stub.CheckAccess(pb.CheckAccessRequest(customer_ref=ref, feature="dashboard"))).reason == (
        pb.ACCESS_REASON_NO_SUBSCRIPTION
    )

    # The buyer pays; Dodo creates the subscription (with the checkout's metadata) and signs its webhook.
    sub = fake_dodo.complete_checkout(session.session_id)
    assert sub["metadata"]["customer_ref"] == ref
    await deliver(webhooks, dodo_event("subscription.active", sub, at=now))

    trialing = await stub.CheckAccess(pb.CheckAccessRequest(customer_ref=ref, feature="dashboard"))
    assert (trialing.allowed, trialing.reason) == (True, pb.ACCESS_REASON_TRIALING)
    credits = await stub.CheckAccess(pb.CheckAccessRequest(customer_ref=ref, feature="ai_tokens"))
    assert credits.balance == "1000", "trial credits"

    cancelled = await stub.CancelSubscription(cancel(sub["subscription_id"], key=f"{ref}-cancel"))
    period_end = cancelled.subscription.current_period_end.ToDatetime(tzinfo=UTC)
    clock.set(now + timedelta(days=15))  # past the trial, before the period ends
    scheduled = await stub.CheckAccess(pb.CheckAccessRequest(customer_ref=ref, feature="dashboard"))
    assert (scheduled.allowed, scheduled.reason) == (True, pb.ACCESS_REASON_CANCELLATION_SCHEDULED)
    assert scheduled.access_ends_at.ToDatetime(tzinfo=UTC) == period_end
    clock.set(period_end)
    ended = await stub.CheckAccess(pb.CheckAccessRequest(customer_ref=ref, feature="dashboard"))
    assert (ended.allowed, ended.reason) == (False, pb.ACCESS_REASON_SUBSCRIPTION_INACTIVE)

    clock.set(now + timedelta(days=15))
    await stub.ResumeSubscription(
        pb.ResumeSubscriptionRequest(subscription_id=sub["subscription_id"], idempotency_key=f"{ref}-resume")
    )
    resumed = await stub.CheckAccess(pb.CheckAccessRequest(customer_ref=ref, feature="dashboard"))
    assert (resumed.allowed, resumed.reason, resumed.access_ends_at.seconds) == (True, pb.ACCESS_REASON_ACTIVE, 0)
