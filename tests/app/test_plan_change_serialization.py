"""Dodo mutations of one subscription go one at a time (issue 9 item 5): while a ChangePlan for a subscription is in
flight, another with a different idempotency key, from any caller, is FAILED_PRECONDITION PLAN_CHANGE_IN_PROGRESS
and Dodo is not asked anything; concurrent calls with one key reach Dodo once; and idempotency keys are the
caller's own (issue 9 item 8). Through the real server, the real SDK and the fake Dodo, and the claim itself
against real Postgres transactions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import TypeAlias

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from service.app.dodo_gateway import DodoGateway
from service.domain.catalog import Catalog
from service.server import Running, start
from storage.engine import Database
from storage.repositories.plan_changes import ClaimOutcome, PlanChangeRepository, PlanChangeStatus
from tests.fakedodo import FakeDodo, RecordedRequest
from tests.support import DODO_API_KEY, STARTER, TEAM, BearerToken, FakeClock, error_info, make_settings

Stub: TypeAlias = "pb_grpc.EntitlementServiceAsyncStub"

CHANGE_PLAN = "POST /subscriptions/*/change-plan"
CALLERS = "shop:tok-shop:billing,backoffice:tok-backoffice:billing"
LEASE = timedelta(seconds=60)


@pytest.fixture(autouse=True)
def dodo_time(fake_dodo: FakeDodo, clock: FakeClock) -> None:
    fake_dodo.frozen_now = clock.now


@pytest.fixture
async def running(
    database_url: str, db: Database, clock: FakeClock, catalog: Catalog, fake_dodo: FakeDodo
) -> AsyncIterator[Running]:
    """The server with two billing callers, `shop` and `backoffice`."""
    server = await start(
        make_settings(database_url, ENTITLEMENTS_CALLERS=CALLERS, ENTITLEMENTS_API_TOKENS=""),
        clock=clock,
        catalog=catalog,
        db=Database.from_url(database_url, pool_size=10),
        dodo=DodoGateway(DODO_API_KEY, fake_dodo.base_url, timeout=5.0, read_max_retries=0),
    )
    yield server
    await server.stop(0)


@pytest.fixture
async def shop(running: Running) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{running.grpc_port}", interceptors=[BearerToken("tok-shop")]
    ) as channel:
        yield pb_grpc.EntitlementServiceStub(channel)


@pytest.fixture
async def backoffice(running: Running) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{running.grpc_port}", interceptors=[BearerToken("tok-backoffice")]
    ) as channel:
        yield pb_grpc.EntitlementServiceStub(channel)


def change(subscription_id: str, product_id: str, key: str) -> pb.ChangePlanRequest:
    return pb.ChangePlanRequest(subscription_id=subscription_id, product_id=product_id, idempotency_key=key)


def in_background(call: Awaitable[pb.ChangePlanResponse]) -> asyncio.Task[pb.ChangePlanResponse]:
    """A call running while the test goes on (a grpc call object is awaitable, not a coroutine)."""

    async def run() -> pb.ChangePlanResponse:
        return await call

    return asyncio.create_task(run())


def change_plan_requests(fake: FakeDodo) -> list[RecordedRequest]:
    return fake.requests_matching(CHANGE_PLAN)


async def until(condition: Callable[[], object], *, seconds: float = 5.0) -> None:
    """Wait for `condition()` to hold (the fake Dodo recording a request, say)."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110  # the fake records requests in a list: nothing to await
            await asyncio.sleep(0.01)


def assert_in_progress(error: BaseException) -> None:
    assert isinstance(error, grpc.aio.AioRpcError), error
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
    info = error_info(error)
    assert (info.reason, info.domain) == ("PLAN_CHANGE_IN_PROGRESS", "entitlements.v1")


# --------------------------------------------------------------------------------------------- one in flight


@pytest.mark.parametrize("who", ["same-caller", "other-caller"])
async def test_a_change_with_another_key_while_one_is_in_flight_is_in_progress_and_dodo_is_not_asked(
    fake_dodo: FakeDodo, shop: Stub, backoffice: Stub, who: str
) -> None:
    sub = fake_dodo.add_subscription()
    subscription_id = sub["subscription_id"]
    fake_dodo.latency = 0.5  # the first change is still at Dodo while the second arrives
    first = in_background(shop.ChangePlan(change(subscription_id, TEAM, "order-1")))
    await until(lambda: change_plan_requests(fake_dodo))
    asked = len(fake_dodo.requests)

    second = backoffice if who == "other-caller" else shop
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await second.ChangePlan(change(subscription_id, STARTER, "order-2"))

    assert_in_progress(refused.value)
    assert len(fake_dodo.requests) == asked  # not even a read
    assert (await first).subscription.product_id == TEAM
    assert len(change_plan_requests(fake_dodo)) == 1
    fake_dodo.latency = 0.0
    # Once the first has finished, the next change goes through.
    assert (await second.ChangePlan(change(subscription_id, STARTER, "order-2"))).subscription.product_id == STARTER


async def test_a_change_on_another_subscription_is_not_held_up(fake_dodo: FakeDodo, shop: Stub) -> None:
    busy, free = fake_dodo.add_subscription(), fake_dodo.add_subscription()
    fake_dodo.latency = 0.3
    first = in_background(shop.ChangePlan(change(busy["subscription_id"], TEAM, "order-3")))
    await until(lambda: change_plan_requests(fake_dodo))

    other = await shop.ChangePlan(change(free["subscription_id"], TEAM, "order-4"))

    assert other.subscription.product_id == TEAM
    assert (await first).subscription.product_id == TEAM


async def test_an_unknown_outcome_holds_other_keys_off_while_its_own_retry_completes_it(
    db: Database, fake_dodo: FakeDodo, shop: Stub, backoffice: Stub
) -> None:
    sub = fake_dodo.add_subscription()
    subscription_id = sub["subscription_id"]
    fake_dodo.apply_then_fail()  # Dodo applies it, the answer is lost: the record stays `unknown`
    lost = change(subscription_id, TEAM, "order-5")
    with pytest.raises(grpc.aio.AioRpcError) as unavailable:
        await shop.ChangePlan(lost)
    assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
    asked = len(fake_dodo.requests)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await backoffice.ChangePlan(change(subscription_id, STARTER, "order-6"))
    assert_in_progress(refused.value)
    assert len(fake_dodo.requests) == asked

    retried = await shop.ChangePlan(lost)
    assert retried.subscription.product_id == TEAM
    assert len(change_plan_requests(fake_dodo)) == 1
    assert (await backoffice.ChangePlan(change(subscription_id, STARTER, "order-6"))).subscription.product_id == STARTER


async def test_an_unknown_outcome_older_than_one_lease_no_longer_holds_other_keys_off(
    db: Database, fake_dodo: FakeDodo, shop: Stub, backoffice: Stub
) -> None:
    sub = fake_dodo.add_subscription()
    subscription_id = sub["subscription_id"]
    fake_dodo.fail_next(CHANGE_PLAN, 502)  # outcome unknown; Dodo did not apply it
    with pytest.raises(grpc.aio.AioRpcError):
        await shop.ChangePlan(change(subscription_id, TEAM, "order-7"))
    async with db.tx() as connection:
        await connection.execute("UPDATE plan_change_requests SET updated_at = now() - interval '61 seconds'")

    response = await backoffice.ChangePlan(change(subscription_id, STARTER, "order-8"))

    assert response.subscription.product_id == STARTER


@pytest.mark.parametrize(
    ("lease", "held_off"),
    [(timedelta(seconds=30), True), (timedelta(seconds=-1), False)],
    ids=["lease-live", "lease-run-out"],
)
async def test_a_record_left_sending_holds_other_keys_off_until_its_lease_runs_out(
    db: Database, fake_dodo: FakeDodo, backoffice: Stub, lease: timedelta, held_off: bool
) -> None:
    sub = fake_dodo.add_subscription()
    subscription_id = sub["subscription_id"]
    async with db.tx() as connection:
        await connection.execute(
            """
            INSERT INTO plan_change_requests
                (caller, idempotency_key, subscription_id, fingerprint, status, lease_until, attempts)
            VALUES ('shop', 'order-9', $1, 'f', 'sending', now() + $2::interval, 1)
            """,
            subscription_id,
            lease,
        )

    request = backoffice.ChangePlan(change(subscription_id, STARTER, "order-10"))

    if held_off:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await request
        assert_in_progress(refused.value)
        assert fake_dodo.requests == []
    else:
        assert (await request).subscription.product_id == STARTER


async def test_a_refused_change_leaves_no_record_for_its_key(
    db: Database, fake_dodo: FakeDodo, shop: Stub, backoffice: Stub
) -> None:
    sub = fake_dodo.add_subscription()
    fake_dodo.latency = 0.3
    first = in_background(shop.ChangePlan(change(sub["subscription_id"], TEAM, "order-11")))
    await until(lambda: change_plan_requests(fake_dodo))
    with pytest.raises(grpc.aio.AioRpcError):
        await backoffice.ChangePlan(change(sub["subscription_id"], STARTER, "order-12"))
    await first

    async with db.tx() as connection:
        keys = await connection.fetch("SELECT caller, idempotency_key FROM plan_change_requests")

    assert [tuple(row) for row in keys] == [("shop", "order-11")]


# --------------------------------------------------------------------------------------------- keys per caller


async def test_two_callers_may_use_the_same_idempotency_key_without_colliding(
    fake_dodo: FakeDodo, shop: Stub, backoffice: Stub
) -> None:
    first, second = fake_dodo.add_subscription(), fake_dodo.add_subscription()

    by_shop = await shop.ChangePlan(change(first["subscription_id"], TEAM, "order-1"))
    by_backoffice = await backoffice.ChangePlan(change(second["subscription_id"], STARTER, "order-1"))

    assert (by_shop.replayed, by_backoffice.replayed) == (False, False)
    assert (by_shop.subscription.product_id, by_backoffice.subscription.product_id) == (TEAM, STARTER)
    assert len(change_plan_requests(fake_dodo)) == 2
    replay = await backoffice.ChangePlan(change(second["subscription_id"], STARTER, "order-1"))
    assert (replay.replayed, replay.subscription.subscription_id) == (True, second["subscription_id"])
    assert len(change_plan_requests(fake_dodo)) == 2


async def test_a_caller_reusing_its_own_key_with_other_parameters_is_still_refused_as_reused(
    fake_dodo: FakeDodo, shop: Stub
) -> None:
    sub = fake_dodo.add_subscription()
    await shop.ChangePlan(change(sub["subscription_id"], TEAM, "order-1"))

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await shop.ChangePlan(change(sub["subscription_id"], STARTER, "order-1"))

    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(refused.value).reason == "IDEMPOTENCY_KEY_REUSED"
    assert len(change_plan_requests(fake_dodo)) == 1


# ------------------------------------------------------------------------------------------------ concurrency


async def test_concurrent_changes_with_different_keys_on_one_subscription_reach_dodo_once(
    fake_dodo: FakeDodo, shop: Stub, backoffice: Stub
) -> None:
    sub = fake_dodo.add_subscription()
    fake_dodo.latency = 0.3
    stubs = [shop, backoffice] * 4
    products = [TEAM, STARTER] * 4

    results = await asyncio.gather(
        *(
            stub.ChangePlan(change(sub["subscription_id"], product, f"order-{index}"))
            for index, (stub, product) in enumerate(zip(stubs, products, strict=True))
        ),
        return_exceptions=True,
    )

    answered = [result for result in results if isinstance(result, pb.ChangePlanResponse)]
    assert len(answered) == 1
    assert len(change_plan_requests(fake_dodo)) == 1
    for result in results:
        if not isinstance(result, pb.ChangePlanResponse):
            assert_in_progress(result)
    assert fake_dodo.subscriptions[sub["subscription_id"]]["product_id"] == answered[0].subscription.product_id


async def test_many_concurrent_calls_with_one_key_send_one_change_plan_and_the_rest_wait_or_replay(
    fake_dodo: FakeDodo, shop: Stub
) -> None:
    sub = fake_dodo.add_subscription()
    fake_dodo.latency = 0.2
    request = change(sub["subscription_id"], TEAM, "order-13")

    first_wave = await asyncio.gather(*(shop.ChangePlan(request) for _ in range(12)), return_exceptions=True)
    fake_dodo.latency = 0.0
    after = await shop.ChangePlan(request)

    assert len(change_plan_requests(fake_dodo)) == 1
    fresh = [result for result in first_wave if isinstance(result, pb.ChangePlanResponse) and not result.replayed]
    assert len(fresh) == 1
    for result in first_wave:
        if isinstance(result, pb.ChangePlanResponse):
            assert result.subscription.product_id == TEAM
        else:
            assert isinstance(result, grpc.aio.AioRpcError), result
            assert result.code() == grpc.StatusCode.UNAVAILABLE  # this key is in progress: retry
    assert after.replayed
    assert after.subscription.product_id == TEAM


# --------------------------------------------------------------------------------------------------- the claim


async def test_two_claims_for_one_subscription_in_open_transactions_let_exactly_one_through(db: Database) -> None:
    """The advisory lock: the second claim waits for the first transaction, then sees its record."""
    pool = await db.pool()
    async with pool.acquire() as first, pool.acquire() as second:
        first_tx = first.transaction()
        await first_tx.start()
        taken = await PlanChangeRepository(first).claim(
            caller="shop", key="order-a", subscription_id="sub_1", fingerprint="fa", lease=LEASE
        )

        async def claim_second() -> ClaimOutcome:
            async with second.transaction():
                claim = await PlanChangeRepository(second).claim(
                    caller="backoffice", key="order-b", subscription_id="sub_1", fingerprint="fb", lease=LEASE
                )
                return claim.outcome

        pending = asyncio.create_task(claim_second())
        await asyncio.sleep(0.3)
        waited = not pending.done()
        await first_tx.commit()
        outcome = await pending

    assert taken.outcome is ClaimOutcome.TAKEN
    assert waited, "the second claim must wait for the first one's transaction"
    assert outcome is ClaimOutcome.SUBSCRIPTION_BUSY


async def test_claims_for_different_subscriptions_do_not_wait_for_each_other(db: Database) -> None:
    pool = await db.pool()
    async with pool.acquire() as first, pool.acquire() as second, first.transaction():
        await PlanChangeRepository(first).claim(
            caller="shop", key="order-a", subscription_id="sub_1", fingerprint="fa", lease=LEASE
        )
        async with asyncio.timeout(0.5), second.transaction():
            other = await PlanChangeRepository(second).claim(
                caller="shop", key="order-b", subscription_id="sub_2", fingerprint="fb", lease=LEASE
            )

    assert other.outcome is ClaimOutcome.TAKEN


async def test_the_same_key_of_two_callers_is_two_records(db: Database) -> None:
    async with db.tx() as connection:
        repository = PlanChangeRepository(connection)
        shops = await repository.claim(caller="shop", key="k", subscription_id="sub_1", fingerprint="f1", lease=LEASE)
        await repository.finish("shop", "k", PlanChangeStatus.COMPLETED)
        others = await repository.claim(
            caller="backoffice", key="k", subscription_id="sub_2", fingerprint="f2", lease=LEASE
        )
        again = await repository.claim(caller="shop", key="k", subscription_id="sub_1", fingerprint="f1", lease=LEASE)

    assert (shops.outcome, others.outcome, again.outcome) == (
        ClaimOutcome.TAKEN,
        ClaimOutcome.TAKEN,
        ClaimOutcome.COMPLETED,
    )
    assert others.record.caller == "backoffice"
