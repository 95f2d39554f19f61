"""ChangePlan through the real gRPC server, the real dodopayments SDK and the fake Dodo API (DESIGN §4, §8):
entitlements move the moment Dodo accepts, every failure maps to an honest status, and one idempotency key never
sends a change twice, whatever retries happen."""

from __future__ import annotations

import asyncio
import copy
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, TypeAlias

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from service.app.dodo_gateway import DodoGateway
from service.domain.catalog import Catalog
from service.domain.dodo_payloads import DodoSubscription
from service.domain.plan_change_rules import fingerprint
from service.grpc import conversion
from service.grpc.interceptors import LEGACY_CALLER
from service.logs import EventFormatter
from service.server import start
from storage.engine import Database
from storage.models import PlanChangeRequest
from tests.fakedodo import ADDON_EXTRA_PROJECTS, ADDON_EXTRA_SEAT, FakeDodo, RecordedRequest
from tests.support import (
    API_TOKEN,
    CUSTOMER_ID,
    DODO_API_KEY,
    PRO,
    STARTER,
    SUB_ID,
    TEAM,
    BearerToken,
    FakeClock,
    WebhookPoster,
    count_rows,
    deliver,
    error_info,
    iso,
    load_event,
    make_settings,
    utc,
)

# Only the .pyi has the async stub type; at run time the stub is built from an aio channel.
Stub: TypeAlias = "pb_grpc.EntitlementServiceAsyncStub"

CHANGE_PLAN = "POST /subscriptions/*/change-plan"
PREVIEW = "POST /subscriptions/*/change-plan/preview"
GET = "GET /subscriptions/*"
WRONG_KEY = "sk_wrong_5ecr3tKeyMaterial"


@pytest.fixture(autouse=True)
def dodo_time(fake_dodo: FakeDodo, clock: FakeClock) -> None:
    """Dodo and the service agree on "now", so periods and proration are deterministic."""
    fake_dodo.frozen_now = clock.now


def change(
    subscription_id: str,
    product_id: str = TEAM,
    *,
    key: str | None = None,
    quantity: int = 0,
    proration_mode: pb.ProrationMode.ValueType = pb.PRORATION_MODE_UNSPECIFIED,
    effective_at: pb.EffectiveAt.ValueType = pb.EFFECTIVE_AT_UNSPECIFIED,
    preview: bool = False,
) -> pb.ChangePlanRequest:
    return pb.ChangePlanRequest(
        subscription_id=subscription_id,
        product_id=product_id,
        quantity=quantity,
        proration_mode=proration_mode,
        effective_at=effective_at,
        idempotency_key=f"key-{uuid.uuid4().hex}" if key is None else key,
        preview=preview,
    )


def change_plan_requests(fake: FakeDodo) -> list[RecordedRequest]:
    return fake.requests_matching(CHANGE_PLAN)


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """The status a call ended with; fails the test if the call succeeded."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def ts(value: datetime | str) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(utc(value) if isinstance(value, str) else value)
    return stamp


def dodo_copy(data: dict[str, Any]) -> dict[str, Any]:
    """A webhook's `data` as GET /subscriptions/{id} would send it."""
    return {key: value for key, value in copy.deepcopy(data).items() if key != "payload_type"}


async def pro_customer(webhooks: WebhookPoster, fake: FakeDodo) -> dict[str, Any]:
    """The fixture customer on Pro, known locally (from its webhook) and at Dodo alike."""
    active = load_event("subscription_active")
    await deliver(webhooks, active)
    return fake.add_subscription(**dodo_copy(active["data"]))


def without_updated_at(subscription: pb.Subscription) -> pb.Subscription:
    kept = pb.Subscription()
    kept.CopyFrom(subscription)
    kept.ClearField("updated_at")
    return kept


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@asynccontextmanager
async def service_with_gateway(
    database_url: str, clock: FakeClock, catalog: Catalog, gateway: DodoGateway
) -> AsyncIterator[Stub]:
    """A second server from the same factory whose DodoGateway the test chooses (wrong key, unreachable Dodo)."""
    running = await start(
        make_settings(database_url),
        clock=clock,
        catalog=catalog,
        db=Database.from_url(database_url, pool_size=4),
        dodo=gateway,
    )
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{running.grpc_port}", interceptors=[BearerToken(API_TOKEN)]
        ) as channel:
            yield pb_grpc.EntitlementServiceStub(channel)
    finally:
        await running.stop(0)


# ------------------------------------------------------------------------------------------- the change itself


@pytest.mark.parametrize(
    ("webhook_offset", "inbox_status"),
    [(timedelta(minutes=-1), "stale"), (timedelta(minutes=1), "applied")],
    ids=["webhook-stamped-before-the-change-was-read", "webhook-stamped-after-the-change-was-read"],
)
async def test_immediate_upgrade_moves_entitlements_at_once_and_the_later_plan_changed_webhook_is_a_no_op(
    fake_dodo: FakeDodo,
    stub: Stub,
    webhooks: WebhookPoster,
    clock: FakeClock,
    webhook_offset: timedelta,
    inbox_status: str,
) -> None:
    await pro_customer(webhooks, fake_dodo)
    sso = pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="sso")
    assert (await stub.CheckAccess(sso)).reason == pb.ACCESS_REASON_FEATURE_NOT_IN_PLAN

    response = await stub.ChangePlan(change(SUB_ID, TEAM))

    assert (response.subscription.product_id, response.subscription.plan_name) == (TEAM, "Team")
    assert "sso" in response.subscription.features
    assert not response.replayed
    allowed = await stub.CheckAccess(sso)
    assert (allowed.allowed, allowed.reason, allowed.product_id) == (True, pb.ACCESS_REASON_ACTIVE, TEAM)
    stored = (await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=SUB_ID))).subscription
    assert (stored.product_id, stored.recurring_amount) == (TEAM, 9900)

    # Dodo's plan_changed webhook carries the same state, delivered later: it must change nothing.
    plan_changed = {
        "business_id": "bus_0NmY7fQz4kR2sT8vW1xJa",
        "type": "subscription.plan_changed",
        "timestamp": iso(clock.now + webhook_offset),
        "data": {"payload_type": "Subscription", **copy.deepcopy(fake_dodo.subscriptions[SUB_ID])},
    }
    assert await webhooks.send(plan_changed) == (200, {"status": inbox_status})
    after = (await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=SUB_ID))).subscription
    assert without_updated_at(after) == without_updated_at(stored)
    assert (await stub.CheckAccess(sso)).allowed
    assert len(change_plan_requests(fake_dodo)) == 1


async def test_quantity_zero_keeps_the_current_quantity(fake_dodo: FakeDodo, stub: Stub) -> None:
    sub = fake_dodo.add_subscription(quantity=4)

    response = await stub.ChangePlan(change(sub["subscription_id"], TEAM, quantity=0))

    (sent,) = change_plan_requests(fake_dodo)
    assert sent.json["quantity"] == 4
    assert (response.subscription.product_id, response.subscription.quantity) == (TEAM, 4)


async def test_an_explicit_quantity_is_sent_and_shown(fake_dodo: FakeDodo, stub: Stub) -> None:
    sub = fake_dodo.add_subscription(quantity=1)

    response = await stub.ChangePlan(change(sub["subscription_id"], PRO, quantity=3))

    (sent,) = change_plan_requests(fake_dodo)
    assert (sent.json["product_id"], sent.json["quantity"]) == (PRO, 3)
    assert (response.subscription.product_id, response.subscription.quantity) == (PRO, 3)


ADDONS = [{"addon_id": ADDON_EXTRA_SEAT, "quantity": 2}, {"addon_id": ADDON_EXTRA_PROJECTS, "quantity": 1}]


@pytest.mark.parametrize(
    ("effective_at", "preview", "endpoint"),
    [
        (pb.EFFECTIVE_AT_IMMEDIATELY, False, CHANGE_PLAN),
        (pb.EFFECTIVE_AT_NEXT_BILLING_DATE, False, CHANGE_PLAN),
        (pb.EFFECTIVE_AT_IMMEDIATELY, True, PREVIEW),
    ],
    ids=["immediately", "next-billing-date", "preview"],
)
async def test_the_subscriptions_add_ons_are_passed_through_so_dodo_keeps_them(
    fake_dodo: FakeDodo, stub: Stub, effective_at: pb.EffectiveAt.ValueType, preview: bool, endpoint: str
) -> None:
    sub = fake_dodo.add_subscription(addons=ADDONS)

    await stub.ChangePlan(change(sub["subscription_id"], TEAM, effective_at=effective_at, preview=preview))

    (sent,) = fake_dodo.requests_matching(endpoint)
    assert sent.json["addons"] == ADDONS
    assert fake_dodo.subscriptions[sub["subscription_id"]]["addons"] == ADDONS


async def test_a_subscription_without_add_ons_sends_an_explicit_empty_list(fake_dodo: FakeDodo, stub: Stub) -> None:
    sub = fake_dodo.add_subscription()

    await stub.ChangePlan(change(sub["subscription_id"], TEAM))

    (sent,) = change_plan_requests(fake_dodo)
    assert sent.json["addons"] == []


@pytest.mark.parametrize(
    ("mode", "dodo_mode"),
    [
        (pb.PRORATION_MODE_UNSPECIFIED, "prorated_immediately"),
        (pb.PRORATION_MODE_PRORATED_IMMEDIATELY, "prorated_immediately"),
        (pb.PRORATION_MODE_FULL_IMMEDIATELY, "full_immediately"),
        (pb.PRORATION_MODE_DIFFERENCE_IMMEDIATELY, "difference_immediately"),
        (pb.PRORATION_MODE_DO_NOT_BILL, "do_not_bill"),
    ],
    ids=["unspecified", "prorated", "full", "difference", "do-not-bill"],
)
async def test_proration_mode_is_sent_as_dodos_proration_billing_mode(
    fake_dodo: FakeDodo, stub: Stub, mode: pb.ProrationMode.ValueType, dodo_mode: str
) -> None:
    sub = fake_dodo.add_subscription()

    await stub.ChangePlan(change(sub["subscription_id"], TEAM, proration_mode=mode))

    (sent,) = change_plan_requests(fake_dodo)
    assert sent.json["proration_billing_mode"] == dodo_mode


@pytest.mark.parametrize(
    ("effective_at", "dodo_effective_at"),
    [
        (pb.EFFECTIVE_AT_UNSPECIFIED, "immediately"),
        (pb.EFFECTIVE_AT_IMMEDIATELY, "immediately"),
        (pb.EFFECTIVE_AT_NEXT_BILLING_DATE, "next_billing_date"),
    ],
    ids=["unspecified", "immediately", "next-billing-date"],
)
async def test_effective_at_is_sent_as_dodos_effective_at(
    fake_dodo: FakeDodo, stub: Stub, effective_at: pb.EffectiveAt.ValueType, dodo_effective_at: str
) -> None:
    sub = fake_dodo.add_subscription()

    await stub.ChangePlan(change(sub["subscription_id"], TEAM, effective_at=effective_at))

    (sent,) = change_plan_requests(fake_dodo)
    assert sent.json["effective_at"] == dodo_effective_at


async def test_change_plan_is_sent_once_with_the_sdks_retries_off_and_our_api_key(
    fake_dodo: FakeDodo, stub: Stub
) -> None:
    sub = fake_dodo.add_subscription()

    await stub.ChangePlan(change(sub["subscription_id"], TEAM))

    (sent,) = change_plan_requests(fake_dodo)
    assert sent.retry_count == 0
    assert sent.headers["authorization"] == "Bearer test_dodo_key"


async def test_a_change_at_the_next_billing_date_shows_as_scheduled_and_leaves_the_plan_as_it_is(
    fake_dodo: FakeDodo, stub: Stub
) -> None:
    sub = fake_dodo.add_subscription(quantity=2)
    customer_id = sub["customer"]["customer_id"]

    response = await stub.ChangePlan(
        change(sub["subscription_id"], TEAM, quantity=3, effective_at=pb.EFFECTIVE_AT_NEXT_BILLING_DATE)
    )

    shown = response.subscription
    assert (shown.product_id, shown.quantity, shown.plan_name) == (PRO, 2, "Pro")
    expected = pb.ScheduledChange(product_id=TEAM, quantity=3, effective_at=ts(sub["next_billing_date"]))
    assert shown.scheduled_change == expected
    stored = await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=sub["subscription_id"]))
    assert stored.subscription.scheduled_change == expected
    # Entitlements move when the change takes effect, not when it is scheduled.
    sso = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=customer_id, feature="sso"))
    assert sso.reason == pb.ACCESS_REASON_FEATURE_NOT_IN_PLAN


# ------------------------------------------------------------------------------------------------- preview


@pytest.mark.parametrize(
    ("mode", "effective_at", "charge"),
    [
        # Team 9900 vs Pro 2900, 21 of the period's 30 days left on 2026-09-10 (see FakeDodo.preview).
        (pb.PRORATION_MODE_PRORATED_IMMEDIATELY, pb.EFFECTIVE_AT_IMMEDIATELY, 4900),
        (pb.PRORATION_MODE_FULL_IMMEDIATELY, pb.EFFECTIVE_AT_IMMEDIATELY, 9900),
        (pb.PRORATION_MODE_DIFFERENCE_IMMEDIATELY, pb.EFFECTIVE_AT_IMMEDIATELY, 7000),
        (pb.PRORATION_MODE_DO_NOT_BILL, pb.EFFECTIVE_AT_IMMEDIATELY, 0),
        (pb.PRORATION_MODE_FULL_IMMEDIATELY, pb.EFFECTIVE_AT_NEXT_BILLING_DATE, 0),
    ],
    ids=["prorated", "full", "difference", "do-not-bill", "next-billing-date"],
)
async def test_preview_returns_the_immediate_charge_and_changes_nothing(
    fake_dodo: FakeDodo,
    stub: Stub,
    webhooks: WebhookPoster,
    db: Database,
    mode: pb.ProrationMode.ValueType,
    effective_at: pb.EffectiveAt.ValueType,
    charge: int,
) -> None:
    await pro_customer(webhooks, fake_dodo)
    at_dodo = copy.deepcopy(fake_dodo.subscriptions[SUB_ID])
    stored = (await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=SUB_ID))).subscription

    response = await stub.ChangePlan(
        change(SUB_ID, TEAM, key="", proration_mode=mode, effective_at=effective_at, preview=True)
    )

    assert (response.immediate_charge, response.currency) == (charge, "USD")
    assert not change_plan_requests(fake_dodo)
    (priced,) = fake_dodo.requests_matching(PREVIEW)
    assert priced.json["product_id"] == TEAM
    assert fake_dodo.subscriptions[SUB_ID] == at_dodo
    assert (await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=SUB_ID))).subscription == stored
    sso = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="sso"))
    assert not sso.allowed
    assert await count_rows(db, PlanChangeRequest) == 0


async def test_preview_shows_the_subscription_as_it_would_become(fake_dodo: FakeDodo, stub: Stub) -> None:
    sub = fake_dodo.add_subscription()

    response = await stub.ChangePlan(change(sub["subscription_id"], TEAM, quantity=2, preview=True))

    assert (response.subscription.product_id, response.subscription.quantity) == (TEAM, 2)
    assert response.subscription.recurring_amount == 2 * 9900
    assert fake_dodo.subscriptions[sub["subscription_id"]]["product_id"] == PRO


# ------------------------------------------------------------------------------------------ invalid requests


@pytest.mark.parametrize(
    ("request_", "named"),
    [
        (change(SUB_ID, "pdt_0NotInTheCatalog00000"), "pdt_0NotInTheCatalog00000"),
        (change(SUB_ID, TEAM, key=""), "idempotency_key"),
        (change("", TEAM), "subscription_id"),
        (change(SUB_ID, ""), "product_id"),
        (change(SUB_ID, TEAM, quantity=-1), "quantity"),
    ],
    ids=["product-not-in-catalog", "missing-idempotency-key", "missing-subscription", "missing-product", "negative"],
)
async def test_an_invalid_request_is_refused_without_calling_dodo(
    fake_dodo: FakeDodo, stub: Stub, request_: pb.ChangePlanRequest, named: str
) -> None:
    fake_dodo.add_subscription(subscription_id=SUB_ID)

    error = await rpc_error(stub.ChangePlan(request_))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (error.details() or "")
    assert fake_dodo.requests == []


@pytest.mark.parametrize("quantity", [0, 2], ids=["quantity-kept", "quantity-explicit"])
async def test_the_same_product_and_quantity_as_now_is_invalid(fake_dodo: FakeDodo, stub: Stub, quantity: int) -> None:
    sub = fake_dodo.add_subscription(product_id=PRO, quantity=2)

    error = await rpc_error(stub.ChangePlan(change(sub["subscription_id"], PRO, quantity=quantity)))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already" in (error.details() or "")
    assert not change_plan_requests(fake_dodo)


async def test_an_unknown_subscription_is_not_found(fake_dodo: FakeDodo, stub: Stub) -> None:
    error = await rpc_error(stub.ChangePlan(change("sub_0Nn0Nn0Nn0Nn0Nn0Nn0Nn", TEAM)))

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "sub_0Nn0Nn0Nn0Nn0Nn0Nn0Nn" in (error.details() or "")
    assert not change_plan_requests(fake_dodo)


# ------------------------------------------------------------------------------------ subscriptions that can't


@pytest.mark.parametrize("status", ["on_hold", "past_due", "paused", "cancelled", "pending"])
async def test_a_subscription_that_is_not_active_cannot_change_plan(
    fake_dodo: FakeDodo, stub: Stub, status: str
) -> None:
    sub = fake_dodo.add_subscription(status=status)

    error = await rpc_error(stub.ChangePlan(change(sub["subscription_id"], TEAM)))

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert status in (error.details() or "")
    assert not change_plan_requests(fake_dodo)


async def test_a_subscription_with_a_change_already_scheduled_cannot_change_plan(
    fake_dodo: FakeDodo, stub: Stub
) -> None:
    sub = fake_dodo.add_subscription()
    await stub.ChangePlan(change(sub["subscription_id"], TEAM, effective_at=pb.EFFECTIVE_AT_NEXT_BILLING_DATE))

    error = await rpc_error(stub.ChangePlan(change(sub["subscription_id"], STARTER)))

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "scheduled" in (error.details() or "")
    assert len(change_plan_requests(fake_dodo)) == 1


@pytest.mark.parametrize("status", [409, 422])
async def test_dodo_refusing_the_change_is_failed_precondition_with_dodos_message(
    fake_dodo: FakeDodo, stub: Stub, status: int
) -> None:
    sub = fake_dodo.add_subscription()
    message = f"Dodo says no ({status}): the customer's mandate does not allow this change"
    fake_dodo.fail_next(CHANGE_PLAN, status, body={"code": "CHANGE_REFUSED", "message": message})

    error = await rpc_error(stub.ChangePlan(change(sub["subscription_id"], TEAM)))

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert message in (error.details() or "")
    assert len(change_plan_requests(fake_dodo)) == 1  # a refusal is not retried
    assert fake_dodo.subscriptions[sub["subscription_id"]]["product_id"] == PRO


async def test_a_product_dodo_does_not_know_is_failed_precondition_with_dodos_own_422_message(
    fake_dodo: FakeDodo, stub: Stub
) -> None:
    sub = fake_dodo.add_subscription()
    del fake_dodo.products[STARTER]  # in our catalog, gone at Dodo

    error = await rpc_error(stub.ChangePlan(change(sub["subscription_id"], STARTER)))

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"Product {STARTER} does not exist" in (error.details() or "")


# ------------------------------------------------------------------------------------------ Dodo unreachable


@pytest.mark.parametrize(
    ("spec", "status"),
    [(CHANGE_PLAN, 500), (CHANGE_PLAN, 503), (CHANGE_PLAN, 429), (GET, 503)],
    ids=["change-plan-500", "change-plan-503", "change-plan-429", "read-503"],
)
async def test_dodo_failing_is_unavailable_and_change_plan_is_not_retried_by_the_sdk(
    fake_dodo: FakeDodo, stub: Stub, spec: str, status: int
) -> None:
    sub = fake_dodo.add_subscription()
    fake_dodo.fail_next(spec, status, headers={"retry-after-ms": "10"})

    error = await rpc_error(stub.ChangePlan(change(sub["subscription_id"], TEAM)))

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "retry" in (error.details() or "")
    assert len(change_plan_requests(fake_dodo)) == (1 if spec == CHANGE_PLAN else 0)


async def test_dodo_timing_out_is_unavailable_after_one_change_plan_request(fake_dodo: FakeDodo, stub: Stub) -> None:
    sub = fake_dodo.add_subscription()
    fake_dodo.timeout_next(CHANGE_PLAN)

    error = await rpc_error(stub.ChangePlan(change(sub["subscription_id"], TEAM)))

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert len(change_plan_requests(fake_dodo)) == 1


async def test_dodo_refusing_connections_is_unavailable_without_naming_the_address(
    database_url: str, db: Database, clock: FakeClock, catalog: Catalog
) -> None:
    gateway = DodoGateway("test_dodo_key", f"http://127.0.0.1:{closed_port()}", timeout=1.0, read_max_retries=0)
    async with service_with_gateway(database_url, clock, catalog, gateway) as stub:
        error = await rpc_error(stub.ChangePlan(change(SUB_ID, TEAM)))

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "127.0.0.1" not in (error.details() or "")


# ------------------------------------------------------------------------------------ our own misconfiguration


async def test_dodo_refusing_our_api_key_is_internal_with_a_generic_message_and_an_error_log(
    database_url: str,
    db: Database,
    clock: FakeClock,
    catalog: Catalog,
    fake_dodo: FakeDodo,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sub = fake_dodo.add_subscription()
    gateway = DodoGateway(WRONG_KEY, fake_dodo.base_url, timeout=1.0, read_max_retries=0)
    caplog.set_level(logging.INFO)

    async with service_with_gateway(database_url, clock, catalog, gateway) as stub:
        error = await rpc_error(stub.ChangePlan(change(sub["subscription_id"], TEAM)))

    assert error.code() == grpc.StatusCode.INTERNAL
    details = error.details() or ""
    assert "misconfigured" in details
    for leak in (WRONG_KEY, "Authentication failed", "401", "Dodo refused"):
        assert leak not in details
    # As an operator reads them: the event and its facts, one line each.
    lines = [(record.levelno, EventFormatter().format(record)) for record in caplog.records]
    assert any("DODO_PAYMENTS_API_KEY" in line for level, line in lines if level >= logging.ERROR)
    assert all(WRONG_KEY not in line for _, line in lines)
    assert fake_dodo.requests[0].headers["authorization"] == f"Bearer {WRONG_KEY}"
    assert not change_plan_requests(fake_dodo)


@pytest.mark.parametrize("status", [401, 403])
async def test_dodo_refusing_our_credentials_on_change_plan_is_internal(
    fake_dodo: FakeDodo, stub: Stub, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    sub = fake_dodo.add_subscription()
    fake_dodo.fail_next(CHANGE_PLAN, status)

    error = await rpc_error(stub.ChangePlan(change(sub["subscription_id"], TEAM)))

    assert error.code() == grpc.StatusCode.INTERNAL
    assert "Injected failure" not in (error.details() or "")
    assert any(record.levelno >= logging.ERROR for record in caplog.records)


# ------------------------------------------------------------------------------------------------ idempotency


async def test_the_same_key_after_success_replays_without_a_second_change_plan_request(
    fake_dodo: FakeDodo, stub: Stub
) -> None:
    sub = fake_dodo.add_subscription()
    request = change(sub["subscription_id"], TEAM, key="order-7-upgrade")

    first = await stub.ChangePlan(request)
    second = await stub.ChangePlan(request)

    assert (first.replayed, second.replayed) == (False, True)
    assert without_updated_at(second.subscription) == without_updated_at(first.subscription)
    assert len(change_plan_requests(fake_dodo)) == 1


@pytest.mark.parametrize(
    "other",
    [
        {"product_id": STARTER},
        {"quantity": 2},
        {"proration_mode": pb.PRORATION_MODE_FULL_IMMEDIATELY},
        {"effective_at": pb.EFFECTIVE_AT_NEXT_BILLING_DATE},
        {"subscription_id": "sub_other"},
    ],
    ids=["product", "quantity", "proration", "effective-at", "subscription"],
)
async def test_the_same_key_with_other_parameters_is_refused_as_reused(
    fake_dodo: FakeDodo, stub: Stub, other: dict[str, Any]
) -> None:
    sub = fake_dodo.add_subscription()
    await stub.ChangePlan(change(sub["subscription_id"], TEAM, key="order-8", quantity=1))
    sent = len(fake_dodo.requests)

    reused = change(sub["subscription_id"], TEAM, key="order-8", quantity=1)
    for name, value in other.items():
        setattr(reused, name, value)
    error = await rpc_error(stub.ChangePlan(reused))

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(error)
    assert (info.reason, info.domain) == ("IDEMPOTENCY_KEY_REUSED", "entitlements.v1")
    assert len(fake_dodo.requests) == sent  # refused before Dodo is asked anything


async def test_the_same_key_with_other_parameters_after_an_unknown_outcome_is_refused_as_reused(
    fake_dodo: FakeDodo, stub: Stub
) -> None:
    sub = fake_dodo.add_subscription()
    fake_dodo.apply_then_fail()
    await rpc_error(stub.ChangePlan(change(sub["subscription_id"], TEAM, key="order-9")))

    error = await rpc_error(stub.ChangePlan(change(sub["subscription_id"], STARTER, key="order-9")))

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(error).reason == "IDEMPOTENCY_KEY_REUSED"
    assert len(change_plan_requests(fake_dodo)) == 1


@pytest.mark.parametrize("hang", [False, True], ids=["answer-502", "answer-timed-out"])
async def test_a_change_dodo_applied_but_whose_answer_was_lost_is_not_sent_again_on_retry(
    fake_dodo: FakeDodo, stub: Stub, hang: bool
) -> None:
    sub = fake_dodo.add_subscription()
    customer_id = sub["customer"]["customer_id"]
    fake_dodo.apply_then_fail(timeout=hang)
    request = change(sub["subscription_id"], TEAM, key="order-10")

    lost = await rpc_error(stub.ChangePlan(request))
    assert lost.code() == grpc.StatusCode.UNAVAILABLE
    assert fake_dodo.subscriptions[sub["subscription_id"]]["product_id"] == TEAM  # Dodo did apply it

    retried = await stub.ChangePlan(request)

    assert retried.subscription.product_id == TEAM
    assert len(change_plan_requests(fake_dodo)) == 1
    sso = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=customer_id, feature="sso"))
    assert sso.allowed
    again = await stub.ChangePlan(request)
    assert again.replayed
    assert len(change_plan_requests(fake_dodo)) == 1


async def test_a_scheduled_change_dodo_applied_but_whose_answer_was_lost_is_not_sent_again_on_retry(
    fake_dodo: FakeDodo, stub: Stub
) -> None:
    sub = fake_dodo.add_subscription()
    fake_dodo.apply_then_fail()
    request = change(sub["subscription_id"], TEAM, key="order-11", effective_at=pb.EFFECTIVE_AT_NEXT_BILLING_DATE)

    assert (await rpc_error(stub.ChangePlan(request))).code() == grpc.StatusCode.UNAVAILABLE
    retried = await stub.ChangePlan(request)

    assert retried.subscription.scheduled_change.product_id == TEAM
    assert retried.subscription.product_id == PRO
    assert len(change_plan_requests(fake_dodo)) == 1


async def test_a_503_that_did_not_apply_is_sent_exactly_once_more_on_retry(fake_dodo: FakeDodo, stub: Stub) -> None:
    sub = fake_dodo.add_subscription()
    fake_dodo.fail_next(CHANGE_PLAN, 503)
    request = change(sub["subscription_id"], TEAM, key="order-12")

    assert (await rpc_error(stub.ChangePlan(request))).code() == grpc.StatusCode.UNAVAILABLE
    assert fake_dodo.subscriptions[sub["subscription_id"]]["product_id"] == PRO

    retried = await stub.ChangePlan(request)

    assert retried.subscription.product_id == TEAM
    assert not retried.replayed
    assert len(change_plan_requests(fake_dodo)) == 2
    assert (await stub.ChangePlan(request)).replayed
    assert len(change_plan_requests(fake_dodo)) == 2


async def test_after_a_refusal_the_same_key_may_be_used_again(fake_dodo: FakeDodo, stub: Stub) -> None:
    sub = fake_dodo.add_subscription(status="on_hold")
    request = change(sub["subscription_id"], TEAM, key="order-13")
    assert (await rpc_error(stub.ChangePlan(request))).code() == grpc.StatusCode.FAILED_PRECONDITION

    fake_dodo.set_subscription(sub["subscription_id"], status="active")
    response = await stub.ChangePlan(request)

    assert response.subscription.product_id == TEAM
    assert len(change_plan_requests(fake_dodo)) == 1


async def test_concurrent_calls_with_one_key_send_at_most_one_change_plan_request(
    fake_dodo: FakeDodo, stub: Stub
) -> None:
    sub = fake_dodo.add_subscription()
    fake_dodo.latency = 0.2  # every call is in flight while the others arrive
    request = change(sub["subscription_id"], TEAM, key="order-14")

    results = await asyncio.gather(*(stub.ChangePlan(request) for _ in range(4)), return_exceptions=True)

    assert len(change_plan_requests(fake_dodo)) == 1
    answered = [result for result in results if isinstance(result, pb.ChangePlanResponse)]
    refused = [result for result in results if not isinstance(result, pb.ChangePlanResponse)]
    assert answered
    assert all(response.subscription.product_id == TEAM for response in answered)
    for error in refused:
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() == grpc.StatusCode.UNAVAILABLE  # "in progress, retry": safe to retry
    fake_dodo.latency = 0.0
    assert (await stub.ChangePlan(request)).replayed
    assert len(change_plan_requests(fake_dodo)) == 1


async def test_a_caller_that_gives_up_mid_change_can_retry_without_the_change_being_sent_twice(
    fake_dodo: FakeDodo, stub: Stub
) -> None:
    sub = fake_dodo.add_subscription()
    fake_dodo.apply_then_fail(timeout=True)  # Dodo applies it, then answers slower than the caller waits
    request = change(sub["subscription_id"], TEAM, key="order-15")

    gave_up = await rpc_error(stub.ChangePlan(request, timeout=0.4))
    assert gave_up.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def retry() -> pb.ChangePlanResponse:
        for _ in range(30):  # the abandoned attempt may still hold the key for a moment
            try:
                return await stub.ChangePlan(request)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.1)
        return await stub.ChangePlan(request)

    retried = await retry()
    assert retried.subscription.product_id == TEAM
    assert len(change_plan_requests(fake_dodo)) == 1


class ReadBackFails(DodoGateway):
    """The real gateway, except that the subscription cannot be read right after a change-plan Dodo accepted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.just_changed = False

    async def change_plan(self, subscription_id: str, **kwargs: Any) -> None:
        await super().change_plan(subscription_id, **kwargs)
        self.just_changed = True

    async def get_subscription(self, subscription_id: str) -> DodoSubscription:
        if self.just_changed:
            self.just_changed = False
            await super().get_subscription("sub_0Nn0Nn0Nn0Nn0Nn0Nn0Nn")  # a real 404 from Dodo
        return await super().get_subscription(subscription_id)


async def test_an_accepted_change_whose_new_state_cannot_be_read_is_unavailable_and_a_retry_moves_entitlements(
    database_url: str, fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock, catalog: Catalog
) -> None:
    await pro_customer(webhooks, fake_dodo)
    gateway = ReadBackFails(DODO_API_KEY, fake_dodo.base_url, timeout=1.0, read_max_retries=0)
    request = change(SUB_ID, TEAM, key="order-16")

    async with service_with_gateway(database_url, clock, catalog, gateway) as stub:
        error = await rpc_error(stub.ChangePlan(request))
        retried = await stub.ChangePlan(request)

    # Success would claim entitlements moved while the old plan is still stored: the retry moves them.
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "same idempotency key" in (error.details() or "")
    assert (retried.subscription.product_id, retried.replayed) == (TEAM, False)
    assert len(change_plan_requests(fake_dodo)) == 1


async def test_an_accepted_change_unreadable_and_not_yet_stored_is_unavailable_and_a_retry_completes_it(
    database_url: str, db: Database, fake_dodo: FakeDodo, clock: FakeClock, catalog: Catalog
) -> None:
    sub = fake_dodo.add_subscription()  # no webhook about it has arrived yet
    gateway = ReadBackFails(DODO_API_KEY, fake_dodo.base_url, timeout=1.0, read_max_retries=0)
    request = change(sub["subscription_id"], TEAM, key="order-17")

    async with service_with_gateway(database_url, clock, catalog, gateway) as stub:
        error = await rpc_error(stub.ChangePlan(request))
        retried = await stub.ChangePlan(request)

    # Never NOT_FOUND: the subscription exists and the change was made.
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "same idempotency key" in (error.details() or "")
    assert retried.subscription.product_id == TEAM
    assert len(change_plan_requests(fake_dodo)) == 1


@pytest.mark.parametrize(
    "body",
    [{"subscription_id": 7, "status": ["active"]}, "<html><body>502 Bad Gateway</body></html>"],
    ids=["json-that-is-not-a-subscription", "not-json"],
)
async def test_an_accepted_change_whose_read_back_is_unparseable_is_unavailable_and_a_retry_completes_it(
    fake_dodo: FakeDodo, stub: Stub, body: object
) -> None:
    sub = fake_dodo.add_subscription()
    customer_id = sub["customer"]["customer_id"]
    fake_dodo.fail_after_change(GET, 200, body=body)  # the read right after the change answers 200 with garbage
    request = change(sub["subscription_id"], TEAM, key="order-18")

    error = await rpc_error(stub.ChangePlan(request))
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # never INVALID_ARGUMENT: the caller's request was fine
    assert "same idempotency key" in (error.details() or "")
    assert fake_dodo.subscriptions[sub["subscription_id"]]["product_id"] == TEAM

    retried = await stub.ChangePlan(request)

    assert (retried.subscription.product_id, retried.replayed) == (TEAM, False)
    assert len(change_plan_requests(fake_dodo)) == 1
    sso = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=customer_id, feature="sso"))
    assert sso.allowed


# ------------------------------------------------------------------------------------ a crashed process's record


async def left_sending(db: Database, request: pb.ChangePlanRequest, *, lease: timedelta, attempts: int = 1) -> None:
    """The record of a process that died after claiming the key (and, with attempts > 0, maybe sending the change):
    status `sending`, a lease that runs out on its own."""
    async with db.tx() as connection:
        await connection.execute(
            """
            INSERT INTO plan_change_requests
                (caller, idempotency_key, subscription_id, fingerprint, status, lease_until, attempts)
            VALUES ($1, $2, $3, $4, 'sending', now() + $5::interval, $6)
            """,
            LEGACY_CALLER,  # the name of the test token's caller (ENTITLEMENTS_API_TOKENS)
            request.idempotency_key,
            request.subscription_id,
            fingerprint(conversion.plan_change(request)),
            lease,
            attempts,
        )


@pytest.mark.parametrize("applied", [True, False], ids=["dodo-had-applied-it", "dodo-never-got-it"])
async def test_a_change_left_sending_by_a_crashed_process_is_completed_by_a_retry_and_never_sent_twice(
    fake_dodo: FakeDodo, stub: Stub, db: Database, applied: bool
) -> None:
    sub = fake_dodo.add_subscription()
    request = change(sub["subscription_id"], TEAM, key="order-19")
    if applied:
        fake_dodo.set_subscription(sub["subscription_id"], product_id=TEAM, recurring_pre_tax_amount=9900)
    await left_sending(db, request, lease=timedelta(seconds=-1))  # the lease ran out: the process is gone

    retried = await stub.ChangePlan(request)

    assert retried.subscription.product_id == TEAM
    assert len(change_plan_requests(fake_dodo)) == (0 if applied else 1)
    assert (await stub.ChangePlan(request)).replayed
    assert len(change_plan_requests(fake_dodo)) == (0 if applied else 1)


async def test_a_retry_while_the_keys_lease_is_live_is_unavailable_and_asks_dodo_nothing(
    fake_dodo: FakeDodo, stub: Stub, db: Database
) -> None:
    sub = fake_dodo.add_subscription()
    request = change(sub["subscription_id"], TEAM, key="order-20")
    await left_sending(db, request, lease=timedelta(seconds=30))

    error = await rpc_error(stub.ChangePlan(request))

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "in progress" in (error.details() or "")
    assert fake_dodo.requests == []
