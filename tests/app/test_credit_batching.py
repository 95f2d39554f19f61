"""Group commit of ConsumeCredits: requests decided together in one transaction still get one answer each, in
arrival order, with no overspend, one effect per idempotency key, and balance = sum of the ledger."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import timedelta
from decimal import Decimal

import asyncpg
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from service.app.background import BackgroundTasks
from service.app.credit_service import ConsumeRequest, ConsumeResult, CreditService
from service.app.entitlement_cache import EntitlementCache
from service.domain.catalog import Catalog
from service.domain.errors import IdempotencyKeyReused, InsufficientCredits, PermissionDenied
from storage.engine import Database, plain_url
from storage.errors import is_database_unavailable
from tests.support import CUSTOMER_ID, FakeClock, WebhookPoster, deliver, stored_account, subscription_event, utc

ACTIVE_AT = utc("2026-09-01T10:15:40Z")


@pytest.fixture
async def credits_service(db: Database, catalog: Catalog, clock: FakeClock) -> AsyncIterator[CreditService]:
    """The use case on its own (same database as the running service), so a test decides what shares a batch."""
    tasks = BackgroundTasks()
    cache = EntitlementCache(db)
    cache.start(tasks)
    for _ in range(250):
        if cache.listening:
            break
        await asyncio.sleep(0.02)
    # A listening cache answers warm customers without awaiting anything, so calls queue in the order made.
    assert cache.listening
    credit_service = CreditService(db, catalog, clock, cache)
    credit_service.start(tasks)
    yield credit_service
    await tasks.stop()


async def _pro_customer(webhooks: WebhookPoster, clock: FakeClock) -> None:
    """An active Pro subscription: its period grant puts exactly 10000 ai_tokens on the account."""
    clock.set(ACTIVE_AT + timedelta(days=1))
    await deliver(webhooks, subscription_event("subscription.active", timestamp=ACTIVE_AT))
    await asyncio.sleep(0.2)  # its change notice reaches every cache before the test warms its own


def request(key: str, amount: str = "1", customer_id: str = CUSTOMER_ID) -> ConsumeRequest:
    return ConsumeRequest(customer_id=customer_id, credit="ai_tokens", amount=amount, idempotency_key=key)


async def settle(calls: Sequence[Awaitable[ConsumeResult]]) -> list[ConsumeResult | BaseException]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


async def transactions_of_consumptions(database_url: str) -> int:
    """How many transactions wrote the consumption rows (rows of one transaction share their xmin)."""
    connection = await asyncpg.connect(plain_url(database_url))
    try:
        count = await connection.fetchval(
            "SELECT count(DISTINCT xmin::text) FROM credit_ledger WHERE kind = 'consumption'"
        )
    finally:
        await connection.close()
    return int(count)


async def test_requests_queued_together_commit_in_one_transaction_with_one_answer_each(
    webhooks: WebhookPoster, credits_service: CreditService, db: Database, database_url: str, clock: FakeClock
) -> None:
    await _pro_customer(webhooks, clock)
    await credits_service.cache.get(CUSTOMER_ID)  # warm: every call below queues without waiting
    calls = [asyncio.ensure_future(credits_service.consume(request(f"k{i}", "2.5"))) for i in range(40)]
    results = await settle(calls)
    assert all(isinstance(r, ConsumeResult) and not r.replayed for r in results)
    balances = sorted((r.balance_after for r in results if isinstance(r, ConsumeResult)), reverse=True)
    # Decided in arrival order: each answer is the balance right after its own consumption.
    assert balances == [Decimal(10000) - Decimal("2.5") * (i + 1) for i in range(40)]
    assert [r.balance_after for r in results if isinstance(r, ConsumeResult)] == balances
    assert await transactions_of_consumptions(database_url) == 1
    account = await stored_account(db, CUSTOMER_ID, "ai_tokens")
    assert account.balance == account.ledger_sum == Decimal(9900)


async def test_a_batch_decides_replays_reuse_shortfalls_and_denials_request_by_request(
    webhooks: WebhookPoster, credits_service: CreditService, db: Database, database_url: str, clock: FakeClock
) -> None:
    await _pro_customer(webhooks, clock)
    await credits_service.cache.get(CUSTOMER_ID)
    await credits_service.cache.get("cus_without_subscription")
    batch = [
        request("first", "6000"),
        request("first", "6000"),  # the same request again: the answer of the first, replayed
        request("first", "7"),  # the same key, other parameters
        request("second", "6000"),  # only 4000 left after the first
        request("third", "4000"),
        request("fourth", "1", customer_id="cus_without_subscription"),
    ]
    results = await settle([asyncio.ensure_future(credits_service.consume(r)) for r in batch])
    first, replay, reused, short, third, denied = results
    assert isinstance(first, ConsumeResult)
    assert (first.balance_after, first.replayed) == (Decimal(4000), False)
    assert isinstance(replay, ConsumeResult)
    assert (replay.entry_id, replay.balance_after, replay.replayed) == (first.entry_id, Decimal(4000), True)
    assert isinstance(reused, IdempotencyKeyReused)
    assert isinstance(short, InsufficientCredits)
    assert short.metadata["balance"] == "4000"
    assert isinstance(third, ConsumeResult)
    assert third.balance_after == 0
    assert isinstance(denied, PermissionDenied)
    assert denied.reason == "ACCESS_REASON_NO_SUBSCRIPTION"
    assert await transactions_of_consumptions(database_url) == 1
    account = await stored_account(db, CUSTOMER_ID, "ai_tokens")
    assert (account.balance, account.ledger_sum, account.ledger_rows) == (Decimal(0), Decimal(0), 3)


async def test_a_key_committed_elsewhere_during_the_batch_is_replayed_after_a_retry_of_the_whole_batch(
    webhooks: WebhookPoster, credits_service: CreditService, db: Database, database_url: str, clock: FakeClock
) -> None:
    """Another replica commits the same key while this batch is deciding: the unique index refuses this batch's
    row, the batch is retried as a whole, and every request ends with exactly one effect."""
    await _pro_customer(webhooks, clock)
    await credits_service.cache.get(CUSTOMER_ID)
    other = await asyncpg.connect(plain_url(database_url))
    try:
        transaction = other.transaction()
        await transaction.start()
        # Another replica's consumption of the same key on another credit, not yet committed.
        await other.execute(
            "INSERT INTO credit_ledger (entry_id, customer_id, credit, amount, balance_after, kind, source,"
            " idempotency_key, fingerprint) VALUES ('cle_elsewhere', $1, 'api_calls', -1, -1, 'consumption', 'race',"
            " 'race', 'another-fingerprint')",
            CUSTOMER_ID,
        )
        calls = [
            asyncio.ensure_future(credits_service.consume(request("race", "5"))),
            asyncio.ensure_future(credits_service.consume(request("calm", "5"))),
        ]
        await asyncio.sleep(0.5)  # the batch now waits on the unique index behind the open transaction
        assert not any(call.done() for call in calls)
        await transaction.commit()
    finally:
        await other.close()
    raced, calm = await settle(calls)
    assert isinstance(raced, IdempotencyKeyReused), "the key was taken elsewhere with other parameters"
    assert isinstance(calm, ConsumeResult)
    assert (calm.balance_after, calm.replayed) == (Decimal(9995), False)
    account = await stored_account(db, CUSTOMER_ID, "ai_tokens")
    assert (account.balance, account.ledger_sum, account.ledger_rows) == (Decimal(9995), Decimal(9995), 2)


async def test_a_hot_account_over_grpc_commits_many_consumptions_per_transaction(
    webhooks: WebhookPoster,
    stub: pb_grpc.EntitlementServiceAsyncStub,
    db: Database,
    database_url: str,
    clock: FakeClock,
) -> None:
    await _pro_customer(webhooks, clock)
    calls = [
        stub.ConsumeCredits(
            pb.ConsumeCreditsRequest(customer_id=CUSTOMER_ID, credit="ai_tokens", amount="1", idempotency_key=f"h{i}")
        )
        for i in range(200)
    ]
    results = await asyncio.gather(*calls)
    assert sorted(int(r.balance_after) for r in results) == list(range(9800, 10000))
    assert len({r.entry_id for r in results}) == 200
    assert await transactions_of_consumptions(database_url) < 100, "concurrent consumptions share commits"
    account = await stored_account(db, CUSTOMER_ID, "ai_tokens")
    assert account.balance == account.ledger_sum == Decimal(9800)


async def test_a_batch_whose_connection_dies_fails_every_request_as_unavailable_and_writes_nothing(
    webhooks: WebhookPoster, credits_service: CreditService, db: Database, database_url: str, clock: FakeClock
) -> None:
    await _pro_customer(webhooks, clock)
    await credits_service.cache.get(CUSTOMER_ID)
    admin = await asyncpg.connect(plain_url(database_url))
    try:
        transaction = admin.transaction()
        await transaction.start()
        await admin.execute("LOCK TABLE credit_balances IN ACCESS EXCLUSIVE MODE")
        calls = [asyncio.ensure_future(credits_service.consume(request(f"k{i}"))) for i in range(3)]
        await asyncio.sleep(0.3)
        killer = await asyncpg.connect(plain_url(database_url))
        try:
            killed = await killer.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%credit_balances%'"
            )
        finally:
            await killer.close()
        assert killed == 1, "the batch was waiting on the account lock"
        await transaction.rollback()
    finally:
        await admin.close()
    results = await settle(calls)
    assert all(isinstance(r, Exception) and is_database_unavailable(r) for r in results), results
    account = await stored_account(db, CUSTOMER_ID, "ai_tokens")
    assert (account.balance, account.ledger_rows) == (Decimal(10000), 1), "only the plan grant"
