"""The entitlements.v1 contract as other teams' generated stubs see it (DESIGN §4): response fields, status codes and
messages, authentication, health and reflection, all against the real server on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import TypeAlias

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from google.protobuf import descriptor_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from service.domain.catalog import Catalog
from service.domain.clock import Clock
from service.server import SERVICE_NAME, Running, start
from service.settings import Settings
from storage.engine import Database
from tests.support import (
    API_TOKEN,
    CUSTOMER_ID,
    PRO,
    SUB_ID,
    TEAM,
    FakeClock,
    WebhookPoster,
    deliver,
    load_event,
    make_settings,
    subscription_event,
    utc,
)

# Only the .pyi has the async stub type; at run time the stub is built from an aio channel.
Stub: TypeAlias = "pb_grpc.EntitlementServiceAsyncStub"
Metadata = tuple[tuple[str, str], ...]

AUTH: Metadata = (("authorization", f"Bearer {API_TOKEN}"),)
CREATED = utc("2026-09-01T10:15:02.481233Z")
PERIOD_END = utc("2026-10-01T10:15:02.481233Z")
MID_PERIOD = utc("2026-09-10T00:00:00Z")
DAY = timedelta(days=1)
SECOND_SUB = "sub_2Qm7Xc4Vn9Bt1Lk6Hj3Pw"
UNKNOWN_CUSTOMER = "cus_0Zz9Yy8Xx7Ww6Vv5Uu4Tt"
# Reachable by nothing: the service must answer UNAVAILABLE quickly instead of hanging or leaking the cause.
UNREACHABLE_DATABASE = "postgresql://postgres@127.0.0.1:1/x"

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION_INFO = f"/{reflection_pb2.DESCRIPTOR.services_by_name['ServerReflection'].full_name}/ServerReflectionInfo"


def ts(value: datetime | str) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(utc(value) if isinstance(value, str) else value)
    return stamp


# Signs that a status message carries internals: addresses, driver or exception class names, tracebacks.
LEAKS = ("127.0.0.1", "5432", "postgresql://", "asyncpg", "sqlalchemy", "Error", "Exception", "Errno", "Traceback")


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """The status a call ended with; fails the test if the call succeeded."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def assert_no_internals(error: grpc.aio.AioRpcError) -> None:
    details = error.details() or ""
    assert details, "a status needs a message"
    leaked = [sign for sign in LEAKS if sign in details]
    assert not leaked, details


@asynccontextmanager
async def second_service(settings: Settings, *, clock: Clock, catalog: Catalog, db: Database) -> AsyncIterator[Stub]:
    """Another server from the same factory (different settings or collaborators), and a stub without a token."""
    running: Running = await start(settings, clock=clock, catalog=catalog, db=db)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
            yield pb_grpc.EntitlementServiceStub(channel)
    finally:
        await running.stop(0)


def without_volatile_fields(subscription: pb.Subscription) -> pb.Subscription:
    """A copy without `updated_at` (our write time, wall clock) and `credits` (balances: the credit tests' subject)."""
    copy = pb.Subscription()
    copy.CopyFrom(subscription)
    copy.ClearField("updated_at")
    copy.ClearField("credits")
    return copy


PRO_FROM_FIXTURE = pb.Subscription(
    subscription_id=SUB_ID,
    customer_id=CUSTOMER_ID,
    customer_email="ada@example.com",
    product_id=PRO,
    plan_name="Pro",
    status="active",
    quantity=1,
    current_period_start=ts(CREATED),
    current_period_end=ts(PERIOD_END),
    cancel_at_period_end=False,
    access=pb.AccessDecision(allowed=True, reason=pb.ACCESS_REASON_ACTIVE),
    features=["dashboard", "pro"],
    limits={"projects": 50, "seats": 5},
    recurring_amount=2900,
    currency="USD",
    billing_interval="1 Month",
)


# CheckAccess fields


async def test_check_access_names_the_deciding_subscription_and_leaves_open_ended_access_unset(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    clock.set(MID_PERIOD)
    response = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="dashboard"))
    assert response == pb.CheckAccessResponse(
        customer_id=CUSTOMER_ID,
        allowed=True,
        reason=pb.ACCESS_REASON_ACTIVE,
        status="active",
        subscription_id=SUB_ID,
        product_id=PRO,
        kind=pb.FEATURE_KIND_BOOLEAN,
    )
    assert not response.HasField("access_ends_at")


async def test_check_access_on_a_limit_returns_the_plan_limit(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    clock.set(MID_PERIOD)
    response = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="projects"))
    assert response == pb.CheckAccessResponse(
        customer_id=CUSTOMER_ID,
        allowed=True,
        reason=pb.ACCESS_REASON_ACTIVE,
        status="active",
        subscription_id=SUB_ID,
        product_id=PRO,
        limit=50,
        kind=pb.FEATURE_KIND_LIMIT,
    )


async def test_check_access_sets_access_ends_at_when_access_is_ending(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await deliver(
        webhooks,
        subscription_event("subscription.updated", timestamp=CREATED + DAY, cancel_at_next_billing_date=True),
    )
    clock.set(MID_PERIOD)
    response = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="seats"))
    assert response == pb.CheckAccessResponse(
        customer_id=CUSTOMER_ID,
        allowed=True,
        reason=pb.ACCESS_REASON_CANCELLATION_SCHEDULED,
        status="active",
        subscription_id=SUB_ID,
        product_id=PRO,
        access_ends_at=ts(PERIOD_END),
        limit=5,
        kind=pb.FEATURE_KIND_LIMIT,
    )


# GetSubscription


async def test_get_subscription_by_id_shows_the_stored_snapshot_and_its_plan(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    clock.set(MID_PERIOD)
    subscription = (await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=SUB_ID))).subscription
    assert subscription.HasField("updated_at")
    assert without_volatile_fields(subscription) == PRO_FROM_FIXTURE
    for unset in ("trial_ends_at", "cancelled_at", "scheduled_change"):
        assert not subscription.HasField(unset), unset
    assert not subscription.access.HasField("access_ends_at")


async def test_get_subscription_by_customer_returns_the_same_subscription(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    clock.set(MID_PERIOD)
    by_id = (await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=SUB_ID))).subscription
    by_customer = (await stub.GetSubscription(pb.GetSubscriptionRequest(customer_id=CUSTOMER_ID))).subscription
    assert by_customer == by_id


async def test_get_subscription_shows_when_a_trial_ends(webhooks: WebhookPoster, stub: Stub, clock: FakeClock) -> None:
    trial_end = CREATED + 14 * DAY
    await deliver(
        webhooks,
        subscription_event("subscription.active", timestamp=CREATED, trial_period_days=14, next_billing_date=trial_end),
    )
    clock.set(CREATED + DAY)
    subscription = (await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=SUB_ID))).subscription
    assert subscription.trial_ends_at == ts(trial_end)
    assert subscription.current_period_end == ts(trial_end)
    assert subscription.access == pb.AccessDecision(allowed=True, reason=pb.ACCESS_REASON_TRIALING)


async def test_get_subscription_shows_a_cancellation(webhooks: WebhookPoster, stub: Stub, clock: FakeClock) -> None:
    await deliver(webhooks, load_event("subscription_active"), load_event("subscription_cancelled"))
    clock.set(utc("2026-09-21T00:00:00Z"))
    subscription = (await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=SUB_ID))).subscription
    expected = pb.Subscription()
    expected.CopyFrom(PRO_FROM_FIXTURE)
    expected.status = "cancelled"
    expected.cancelled_at.CopyFrom(ts("2026-09-20T14:30:00.120045Z"))
    expected.access.CopyFrom(pb.AccessDecision(allowed=False, reason=pb.ACCESS_REASON_SUBSCRIPTION_INACTIVE))
    assert without_volatile_fields(subscription) == expected


async def test_get_subscription_shows_a_cancellation_at_period_end_and_a_scheduled_change(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    change_at = PERIOD_END
    await deliver(
        webhooks,
        subscription_event(
            "subscription.updated",
            timestamp=CREATED + DAY,
            cancel_at_next_billing_date=True,
            scheduled_change={
                "id": "spc_4Rt7Yu1Io3Pa6Sd9Fg2Hj",
                "product_id": TEAM,
                "product_name": "Team",
                "product_description": None,
                "quantity": 3,
                "effective_at": change_at.isoformat(),
                "created_at": (CREATED + DAY).isoformat(),
                "addons": [],
            },
        ),
    )
    clock.set(MID_PERIOD)
    subscription = (await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=SUB_ID))).subscription
    assert subscription.cancel_at_period_end
    assert subscription.access == pb.AccessDecision(
        allowed=True, reason=pb.ACCESS_REASON_CANCELLATION_SCHEDULED, access_ends_at=ts(PERIOD_END)
    )
    assert subscription.scheduled_change == pb.ScheduledChange(product_id=TEAM, quantity=3, effective_at=ts(change_at))


async def test_get_subscription_by_customer_prefers_a_granting_subscription_over_a_newer_denied_one(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await deliver(
        webhooks,
        load_event("subscription_active"),
        subscription_event(
            "subscription.expired",
            timestamp=CREATED + 5 * DAY,
            subscription_id=SECOND_SUB,
            product_id=TEAM,
            status="expired",
            created_at=CREATED + 2 * DAY,
        ),
    )
    clock.set(MID_PERIOD)
    subscription = (await stub.GetSubscription(pb.GetSubscriptionRequest(customer_id=CUSTOMER_ID))).subscription
    assert (subscription.subscription_id, subscription.access.allowed) == (SUB_ID, True)


async def test_get_subscription_by_customer_prefers_the_newest_among_granting_subscriptions(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await deliver(
        webhooks,
        load_event("subscription_active"),
        subscription_event(
            "subscription.active",
            timestamp=CREATED + 5 * DAY,
            subscription_id=SECOND_SUB,
            product_id=TEAM,
            created_at=CREATED + 2 * DAY,
        ),
    )
    clock.set(MID_PERIOD)
    subscription = (await stub.GetSubscription(pb.GetSubscriptionRequest(customer_id=CUSTOMER_ID))).subscription
    assert (subscription.subscription_id, subscription.product_id) == (SECOND_SUB, TEAM)


async def test_get_subscription_by_customer_falls_back_to_the_newest_when_nothing_grants(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await deliver(
        webhooks,
        subscription_event("subscription.expired", timestamp=CREATED + 5 * DAY, status="expired"),
        subscription_event(
            "subscription.failed",
            timestamp=CREATED + 5 * DAY,
            subscription_id=SECOND_SUB,
            product_id=TEAM,
            status="failed",
            created_at=CREATED + 2 * DAY,
        ),
    )
    clock.set(MID_PERIOD)
    subscription = (await stub.GetSubscription(pb.GetSubscriptionRequest(customer_id=CUSTOMER_ID))).subscription
    assert (subscription.subscription_id, subscription.status) == (SECOND_SUB, "failed")


# Errors


@pytest.mark.parametrize(
    ("customer_id", "feature", "named"),
    [
        ("", "dashboard", "customer_id"),
        (CUSTOMER_ID, "", "feature"),
        (CUSTOMER_ID, "teleportation", "teleportation"),
    ],
)
async def test_check_access_rejects_an_incomplete_or_unknown_request(
    stub: Stub, customer_id: str, feature: str, named: str
) -> None:
    error = await rpc_error(stub.CheckAccess(pb.CheckAccessRequest(customer_id=customer_id, feature=feature)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (error.details() or "")


async def test_get_subscription_without_a_selector_is_invalid(stub: Stub) -> None:
    error = await rpc_error(stub.GetSubscription(pb.GetSubscriptionRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert "subscription_id" in details
    assert "customer_id" in details


@pytest.mark.parametrize(
    "request_",
    [
        pb.GetSubscriptionRequest(subscription_id="sub_0Nn0Nn0Nn0Nn0Nn0Nn0Nn"),
        pb.GetSubscriptionRequest(customer_id=UNKNOWN_CUSTOMER),
    ],
    ids=["unknown-subscription", "customer-without-subscriptions"],
)
async def test_get_subscription_of_nothing_is_not_found(
    webhooks: WebhookPoster, stub: Stub, request_: pb.GetSubscriptionRequest
) -> None:
    await deliver(webhooks, load_event("subscription_active"))  # someone else's data must not be found instead
    error = await rpc_error(stub.GetSubscription(request_))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    selector = request_.WhichOneof("selector")
    assert selector is not None
    assert getattr(request_, selector) in (error.details() or "")


async def test_postgres_unreachable_is_unavailable_without_leaking_internals(
    database_url: str, clock: FakeClock, catalog: Catalog
) -> None:
    unreachable = Database.from_url(UNREACHABLE_DATABASE, connect_timeout=1)
    async with second_service(make_settings(database_url), clock=clock, catalog=catalog, db=unreachable) as stub:
        # A deadline well above connect_timeout: the answer must be a prompt UNAVAILABLE, not DEADLINE_EXCEEDED.
        check = await rpc_error(
            stub.CheckAccess(
                pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="dashboard"), metadata=AUTH, timeout=10
            )
        )
        get = await rpc_error(
            stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=SUB_ID), metadata=AUTH, timeout=10)
        )
    for error in (check, get):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert_no_internals(error)


async def test_an_unexpected_failure_is_internal_not_unknown_and_says_nothing_of_its_cause(
    database_url: str, catalog: Catalog
) -> None:
    def broken_clock() -> datetime:
        raise RuntimeError("clock failure in /srv/entitlements/secret.py")

    own_db = Database.from_url(database_url, pool_size=4)
    async with second_service(make_settings(database_url), clock=broken_clock, catalog=catalog, db=own_db) as stub:
        error = await rpc_error(
            stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="dashboard"), metadata=AUTH)
        )
    assert error.code() == grpc.StatusCode.INTERNAL
    assert_no_internals(error)
    assert "secret" not in (error.details() or "")


# Authentication, health, reflection


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer not-the-token"),),
        (("authorization", f"Basic {API_TOKEN}"),),
        (("authorization", API_TOKEN),),
        (("authorization", "Bearer "),),
        (("x-api-key", API_TOKEN),),
    ],
    ids=["no-token", "wrong-token", "basic-scheme", "no-scheme", "empty-bearer", "other-header"],
)
async def test_calls_without_a_valid_bearer_token_are_unauthenticated(
    anonymous_channel: grpc.aio.Channel, metadata: Metadata
) -> None:
    stub = pb_grpc.EntitlementServiceStub(anonymous_channel)
    check = await rpc_error(
        stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="dashboard"), metadata=metadata)
    )
    get = await rpc_error(stub.GetSubscription(pb.GetSubscriptionRequest(customer_id=CUSTOMER_ID), metadata=metadata))
    for error in (check, get):
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "token" in (error.details() or "")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])  # RFC 7235: the scheme is case-insensitive
async def test_a_call_with_the_right_bearer_token_is_answered(anonymous_channel: grpc.aio.Channel, scheme: str) -> None:
    stub = pb_grpc.EntitlementServiceStub(anonymous_channel)
    response = await stub.CheckAccess(
        pb.CheckAccessRequest(customer_id=UNKNOWN_CUSTOMER, feature="dashboard"),
        metadata=(("authorization", f"{scheme} {API_TOKEN}"),),
    )
    assert response.reason == pb.ACCESS_REASON_NO_SUBSCRIPTION


async def test_every_configured_token_is_accepted_so_tokens_can_be_rotated(
    database_url: str, clock: FakeClock, catalog: Catalog
) -> None:
    settings = make_settings(database_url, ENTITLEMENTS_API_TOKENS="old-token-7, new-token-8")
    own_db = Database.from_url(database_url, pool_size=4)
    async with second_service(settings, clock=clock, catalog=catalog, db=own_db) as stub:
        request = pb.CheckAccessRequest(customer_id=UNKNOWN_CUSTOMER, feature="dashboard")
        for token in ("old-token-7", "new-token-8"):
            response = await stub.CheckAccess(request, metadata=(("authorization", f"Bearer {token}"),))
            assert response.reason == pb.ACCESS_REASON_NO_SUBSCRIPTION
        error = await rpc_error(stub.CheckAccess(request, metadata=AUTH))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("service_name", ["", SERVICE_NAME])
async def test_health_check_needs_no_token_and_reports_serving(
    anonymous_channel: grpc.aio.Channel, service_name: str
) -> None:
    check = anonymous_channel.unary_unary(
        HEALTH_CHECK,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    response = await check(health_pb2.HealthCheckRequest(service=service_name))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_without_configured_tokens_calls_need_no_token(
    database_url: str, clock: FakeClock, catalog: Catalog
) -> None:
    settings = make_settings(database_url, ENTITLEMENTS_API_TOKENS="")
    own_db = Database.from_url(database_url, pool_size=4)
    async with second_service(settings, clock=clock, catalog=catalog, db=own_db) as stub:
        response = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=UNKNOWN_CUSTOMER, feature="dashboard"))
    assert response.reason == pb.ACCESS_REASON_NO_SUBSCRIPTION


def reflection(
    channel: grpc.aio.Channel,
) -> grpc.aio.StreamStreamMultiCallable[
    reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse
]:
    # reflection_pb2_grpc.ServerReflectionStub is typed for sync channels only; the method path is the same.
    return channel.stream_stream(
        REFLECTION_INFO,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )


async def test_reflection_lists_and_describes_the_entitlement_service(anonymous_channel: grpc.aio.Channel) -> None:
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
    ]
    reflect = reflection(anonymous_channel)
    listed, described = [response async for response in reflect(iter(requests), metadata=AUTH)]

    names = {service.name for service in listed.list_services_response.service}
    assert {"entitlements.v1.EntitlementService", "grpc.health.v1.Health"} <= names

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    contract = next(file for file in files if file.package == "entitlements.v1")
    assert contract.name == "entitlements/v1/entitlements.proto"
    assert "CheckAccess" in {method.name for method in contract.service[0].method}


async def test_reflection_is_not_open_without_a_token(anonymous_channel: grpc.aio.Channel) -> None:
    reflect = reflection(anonymous_channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [response async for response in reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
