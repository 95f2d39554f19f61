"""ConsumeCredits isolation (DESIGN §12): one caller, one customer or one stuck row never fails or stalls the
others. A bad request fails alone, a locked account waits in its own lane, callers that gave up are not executed,
the queue is bounded, and several writers (replicas) over one Postgres still never overspend."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from typing import Any, TypeAlias

import asyncpg
import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from service.app.background import BackgroundTasks
from service.app.credit_service import ConsumeRequest, ConsumeResult, CreditService
from service.app.entitlement_cache import EntitlementCache
from service.domain.catalog import Catalog
from service.domain.errors import AccountBusy, ConsumeQueueFull
from service.server import Running
from storage.engine import Database, plain_url
from tests.support import (
    CUSTOMER_ID,
    FakeClock,
    WebhookPoster,
    deliver,
    stored_account,
    subscription_event,
    utc,
)

Stub: TypeAlias = "pb_grpc.EntitlementServiceAsyncStub"

ACTIVE_AT = utc("2026-09-01T10:15:40Z")


def customer(n: int) -> str:
    return f"cus_neighbour_{n:03d}"


async def fund(webhooks: WebhookPoster, clock: FakeClock, *customers: str) -> None:
    """An active Pro subscription per customer: each gets exactly 10000 ai_tokens from its period grant."""
    clock.set(ACTIVE_AT + timedelta(days=1))
    for number, customer_id in enumerate(customers):
        event = subscription_event("subscription.active", timestamp=ACTIVE_AT)
        event["data"] = copy.deepcopy(event["data"])
        event["data"]["customer"]["customer_id"] = customer_id
        event["data"]["subscription_id"] = f"sub_iso_{number:03d}_{customer_id[-6:]}"
        await deliver(webhooks, event)
    await asyncio.sleep(0.2)  # change notices reach every cache before the tests warm their own


def consumption(key: str, customer_id: str = CUSTOMER_ID, amount: str = "1") -> ConsumeRequest:
    return ConsumeRequest(customer_id=customer_id, credit="ai_tokens", amount=amount, idempotency_key=key)


async def ledger_keys(db: Database) -> set[str]:
    async with db.connection() as connection:
        rows = await connection.fetch("SELECT idempotency_key FROM credit_ledger WHERE kind = 'consumption'")
    return {row["idempotency_key"] for row in rows}


async def until(condition: Any, what: str, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


class Outside:
    """Another Postgres session (an operator's psql, another service) holding locks for as long as a test wants."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection
        self.transaction = connection.transaction()

    async def lock_ledger_table(self) -> None:
        await self.transaction.start()
        await self.connection.execute("LOCK TABLE credit_ledger IN EXCLUSIVE MODE")

    async def lock_account(self, customer_id: str, credit: str = "ai_tokens") -> None:
        await self.transaction.start()
        locked = await self.connection.fetchval(
            "SELECT 1 FROM credit_balances WHERE customer_id = $1 AND credit = $2 FOR UPDATE", customer_id, credit
        )
        assert locked == 1

    async def someone_waits(self) -> bool:
        waiting = await self.connection.fetchval(
            "SELECT count(*) FROM pg_locks WHERE NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return bool(waiting)

    async def release(self) -> None:
        await self.transaction.rollback()


@pytest.fixture
async def outside(database_url: str) -> AsyncIterator[Outside]:
    connection = await asyncpg.connect(plain_url(database_url))
    yield Outside(connection)
    await connection.close()


@pytest.fixture
async def patient_credits(database_url: str, catalog: Catalog, clock: FakeClock) -> AsyncIterator[CreditService]:
    """The use case on its own, over a database whose lock waits last 30 s: a test decides when a wait ends."""
    db = Database.from_url(database_url, lock_timeout_ms=30_000)
    tasks = BackgroundTasks()
    cache = EntitlementCache(db)
    cache.start(tasks)
    service = CreditService(db, catalog, clock, cache, max_queued=3)
    service.start(tasks)

    async def listening() -> bool:
        return cache.listening

    await until(listening, "the cache listens")
    yield service
    await tasks.stop()
    await db.close()


async def test_a_request_failing_inside_a_batch_fails_alone_and_the_rest_commit(
    webhooks: WebhookPoster, service: Running, clock: FakeClock, db: Database
) -> None:
    poisoned = customer(999)
    neighbours = [customer(n) for n in range(8)]
    await fund(webhooks, clock, poisoned, *neighbours)
    credit_service: CreditService = service_credits(service)
    async with db.connection() as connection:
        # A Postgres failure that only this customer's rows meet: the kind of surprise validation cannot foresee.
        await connection.execute(
            """
            CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'poisoned row'; END $$;
            CREATE TRIGGER poison BEFORE INSERT ON credit_ledger FOR EACH ROW
            WHEN (NEW.customer_id = 'cus_neighbour_999') EXECUTE FUNCTION poison();
            """
        )
    try:
        for customer_id in (poisoned, *neighbours):
            await credit_service.cache.get(customer_id)  # warm: every call below queues without waiting
        calls = [
            credit_service.consume(consumption(f"n{n}-{i}", c)) for i in range(3) for n, c in enumerate(neighbours)
        ]
        calls.insert(5, credit_service.consume(consumption("poison", poisoned)))
        results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        async with db.connection() as connection:
            await connection.execute("DROP TRIGGER poison ON credit_ledger; DROP FUNCTION poison()")

    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1
    assert isinstance(failed[0], asyncpg.RaiseError)
    assert all(isinstance(r, ConsumeResult) for r in results[:5] + results[6:])
    assert await ledger_keys(db) == {f"n{n}-{i}" for i in range(3) for n in range(8)}
    for customer_id in neighbours:
        account = await stored_account(db, customer_id, "ai_tokens")
        assert (account.balance, account.ledger_sum) == (Decimal(9997), Decimal(9997))


def service_credits(running: Running) -> CreditService:
    servicer = running.credit_service
    assert isinstance(servicer, CreditService)
    return servicer


async def test_a_locked_account_waits_in_its_own_lane_while_everyone_else_is_served(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock, db: Database, outside: Outside
) -> None:
    neighbours = [customer(n) for n in range(10)]
    await fund(webhooks, clock, CUSTOMER_ID, *neighbours)
    await outside.lock_account(CUSTOMER_ID)

    stuck = [
        asyncio.ensure_future(stub.ConsumeCredits(pb.ConsumeCreditsRequest(**as_fields(consumption(f"s{i}")))))
        for i in range(3)
    ]
    others = await asyncio.gather(
        *(
            stub.ConsumeCredits(pb.ConsumeCreditsRequest(**as_fields(consumption(f"o{n}-{i}", c))), timeout=5)
            for i in range(3)
            for n, c in enumerate(neighbours)
        )
    )
    assert all(not r.replayed for r in others), "everyone else is served while the row is locked"
    assert not all(call.done() for call in stuck), "the locked customer's consumptions wait for the lock"

    outcomes = await asyncio.gather(*stuck, return_exceptions=True)
    for outcome in outcomes:
        assert isinstance(outcome, grpc.aio.AioRpcError)
        assert outcome.code() is grpc.StatusCode.UNAVAILABLE  # after lock_timeout (1 s), safe to retry
    await outside.release()

    retried = await stub.ConsumeCredits(pb.ConsumeCreditsRequest(**as_fields(consumption("s0"))))
    assert (retried.replayed, retried.balance_after) == (False, "9999")
    assert (await stored_account(db, CUSTOMER_ID, "ai_tokens")).ledger_rows == 2  # the grant and one consumption


def as_fields(request: ConsumeRequest) -> dict[str, Any]:
    return {
        "customer_id": request.customer_id,
        "credit": request.credit,
        "amount": request.amount,
        "idempotency_key": request.idempotency_key,
    }


async def test_a_caller_that_gave_up_before_its_transaction_is_not_executed(
    webhooks: WebhookPoster, patient_credits: CreditService, clock: FakeClock, db: Database, outside: Outside
) -> None:
    await fund(webhooks, clock, CUSTOMER_ID)
    await patient_credits.cache.get(CUSTOMER_ID)
    await outside.lock_ledger_table()
    first = asyncio.ensure_future(patient_credits.consume(consumption("first")))
    await until(outside.someone_waits, "the writer's batch waits on the locked table")

    gone = asyncio.ensure_future(patient_credits.consume(consumption("gone")))
    await asyncio.sleep(0.05)
    gone.cancel()  # its deadline passed, or the caller hung up
    await outside.release()

    assert isinstance(await first, ConsumeResult)
    after = await patient_credits.consume(consumption("after"))
    assert not after.replayed
    assert await ledger_keys(db) == {"first", "after"}


async def test_the_queue_is_bounded_and_refuses_at_once_past_its_bound(
    webhooks: WebhookPoster, patient_credits: CreditService, clock: FakeClock, outside: Outside
) -> None:
    await fund(webhooks, clock, CUSTOMER_ID)
    await patient_credits.cache.get(CUSTOMER_ID)
    await outside.lock_ledger_table()
    first = asyncio.ensure_future(patient_credits.consume(consumption("first")))
    await until(outside.someone_waits, "the writer's batch waits on the locked table")
    queued = [asyncio.ensure_future(patient_credits.consume(consumption(f"q{n}"))) for n in range(3)]
    await asyncio.sleep(0.05)

    with pytest.raises(ConsumeQueueFull):
        await patient_credits.consume(consumption("one too many"))

    await outside.release()
    results = await asyncio.gather(first, *queued)
    assert sorted(r.balance_after for r in results) == [Decimal(9996), Decimal(9997), Decimal(9998), Decimal(9999)]


async def test_a_lock_wait_that_runs_out_answers_unavailable_for_that_account_only(
    webhooks: WebhookPoster, service: Running, clock: FakeClock, outside: Outside
) -> None:
    await fund(webhooks, clock, CUSTOMER_ID, customer(1))
    credit_service = service_credits(service)
    await outside.lock_account(CUSTOMER_ID)
    stuck, free = await asyncio.gather(
        credit_service.consume(consumption("stuck")),
        credit_service.consume(consumption("free", customer(1))),
        return_exceptions=True,
    )
    await outside.release()
    assert isinstance(stuck, AccountBusy)
    assert isinstance(free, ConsumeResult)
