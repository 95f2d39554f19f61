"""The CheckAccess cache: invalidated across processes by LISTEN/NOTIFY, time-correct from cached snapshots, never
caching a load that a concurrent change overtook, and bypassed while its invalidation channel is down."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from service.app.background import BackgroundTasks
from service.app.entitlement_cache import LISTENER_NAME, EntitlementCache
from service.domain.values import CustomerEntitlements
from service.server import Running
from storage.engine import Connection, Database, plain_url
from storage.repositories.customers import load_customer
from tests.support import (
    API_TOKEN,
    CUSTOMER_ID,
    REPO_ROOT,
    WEBHOOK_SECRET,
    FakeClock,
    WebhookPoster,
    deliver,
    subscription_event,
    utc,
)

ROOT = REPO_ROOT  # where a second `serve` process runs from
ACTIVE_AT = utc("2026-09-01T10:15:40Z")
PERIOD_END = utc("2026-10-01T10:15:02.481233Z")


def check(customer_id: str = CUSTOMER_ID, feature: str = "dashboard") -> pb.CheckAccessRequest:
    return pb.CheckAccessRequest(customer_id=customer_id, feature=feature)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class _WithToken:
    def __init__(self, stub: pb_grpc.EntitlementServiceAsyncStub, metadata: tuple[tuple[str, str], ...]) -> None:
        self._stub = stub
        self._metadata = metadata

    async def CheckAccess(self, request: pb.CheckAccessRequest) -> pb.CheckAccessResponse:
        return await self._stub.CheckAccess(request, metadata=self._metadata)


@pytest.fixture
async def other_replica(database_url: str, service: Running) -> AsyncIterator[_WithToken]:
    """A second service process on the same database: the way replicas run behind a load balancer."""
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "DODO_PAYMENTS_WEBHOOK_KEY": WEBHOOK_SECRET,
        "ENTITLEMENTS_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
        "ENTITLEMENTS_HTTP_ADDR": f"127.0.0.1:{http_port}",
        "ENTITLEMENTS_API_TOKENS": API_TOKEN,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"http://127.0.0.1:{http_port}/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the second replica never became ready")
        metadata = (("authorization", f"Bearer {API_TOKEN}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.EntitlementServiceStub(channel)
            # Wait until its invalidation listener is connected: until then it does not cache at all.
            for _ in range(200):
                await stub.CheckAccess(check(customer_id="cus_warming_up"), metadata=metadata)
                if await _replica_listening(database_url):
                    break
                await asyncio.sleep(0.05)
            yield _WithToken(stub, metadata)
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=15)


async def _replica_listening(database_url: str) -> bool:
    connection = await asyncpg.connect(plain_url(database_url))
    try:
        listeners = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
            LISTENER_NAME,
        )
    finally:
        await connection.close()
    return int(listeners) >= 2


async def eventually_allowed(replica: _WithToken, allowed: bool, within: float = 0.1) -> None:
    """The replica answers `allowed` within `within` seconds of the change having committed."""
    committed = time.monotonic()
    while (await replica.CheckAccess(check())).allowed is not allowed:
        assert time.monotonic() - committed < within, "the other replica still answers from a stale cache"
        await asyncio.sleep(0.002)


async def wait_listening(service: Running) -> None:
    for _ in range(250):
        if service.cache.listening:
            return
        await asyncio.sleep(0.02)
    pytest.fail("the cache's invalidation listener never connected")


async def test_a_change_made_through_one_replica_is_visible_in_another_within_100_ms(
    webhooks: WebhookPoster, other_replica: _WithToken, clock: FakeClock
) -> None:
    clock.set(ACTIVE_AT + timedelta(days=1))
    await deliver(webhooks, subscription_event("subscription.active", timestamp=ACTIVE_AT))
    # The other replica caches the customer as allowed (it uses the wall clock: the period is in the past
    # there, but an active subscription stays allowed until a renewal or cancellation arrives).
    await eventually_allowed(other_replica, True)
    assert (await other_replica.CheckAccess(check())).allowed, "served from its cache now"

    cancelled_at = ACTIVE_AT + timedelta(days=2)
    await deliver(
        webhooks,
        subscription_event(
            "subscription.cancelled", timestamp=cancelled_at, status="cancelled", cancelled_at=cancelled_at
        ),
    )
    await eventually_allowed(other_replica, False)
    denied = await other_replica.CheckAccess(check())
    assert (denied.allowed, denied.reason) == (False, pb.ACCESS_REASON_SUBSCRIPTION_INACTIVE)


async def test_cached_snapshot_stays_time_correct_without_any_event(
    webhooks: WebhookPoster, stub: pb_grpc.EntitlementServiceAsyncStub, service: Running, clock: FakeClock
) -> None:
    await deliver(
        webhooks, subscription_event("subscription.active", timestamp=ACTIVE_AT, cancel_at_next_billing_date=True)
    )
    await wait_listening(service)
    clock.set(PERIOD_END - timedelta(seconds=1))
    await stub.CheckAccess(check())
    await asyncio.sleep(0.2)  # let the delivery's own notice arrive and settle
    before = await stub.CheckAccess(check())
    assert (before.allowed, before.reason) == (True, pb.ACCESS_REASON_CANCELLATION_SCHEDULED)
    assert len(service.cache) == 1
    misses = service.cache.misses
    clock.set(PERIOD_END)
    after = await stub.CheckAccess(check())
    assert (after.allowed, after.reason) == (False, pb.ACCESS_REASON_SUBSCRIPTION_INACTIVE)
    assert service.cache.misses == misses, "access ended by comparison on the cached snapshot, not by a reload"


async def test_a_load_overtaken_by_a_change_notice_is_not_cached(
    webhooks: WebhookPoster, db: Database, clock: FakeClock
) -> None:
    """A load that read Postgres before a change committed must not be cached once the change's notice came in."""
    clock.set(ACTIVE_AT + timedelta(days=1))
    await deliver(webhooks, subscription_event("subscription.active", timestamp=ACTIVE_AT))
    overtake = True

    async def load_then_notice(connection: Connection, customer_id: str) -> CustomerEntitlements:
        entry = await load_customer(connection, customer_id)
        if overtake:
            cache.invalidate(customer_id)  # the notice arrives while this load's answer is on its way
        return entry

    cache = EntitlementCache(db, loader=load_then_notice)
    tasks = BackgroundTasks()
    cache.start(tasks)
    try:
        for _ in range(250):
            if cache.listening:
                break
            await asyncio.sleep(0.02)
        assert cache.listening, "otherwise nothing would be cached at all and the test could not fail"
        overtaken = await cache.get(CUSTOMER_ID)
        assert [s.status for s in overtaken.subscriptions] == ["active"], "the overtaken load answers what it read"
        assert len(cache) == 0
        overtake = False
        await cache.get(CUSTOMER_ID)
        assert len(cache) == 1, "a load nobody overtook is cached"
    finally:
        await tasks.stop()


async def test_losing_the_invalidation_channel_bypasses_the_cache_until_it_is_back(
    webhooks: WebhookPoster,
    stub: pb_grpc.EntitlementServiceAsyncStub,
    service: Running,
    database_url: str,
    clock: FakeClock,
) -> None:
    clock.set(ACTIVE_AT + timedelta(days=1))
    await deliver(webhooks, subscription_event("subscription.active", timestamp=ACTIVE_AT))
    await wait_listening(service)
    await asyncio.sleep(0.2)  # let the delivery's own notice arrive and settle
    assert (await stub.CheckAccess(check())).allowed
    assert len(service.cache) == 1

    admin = await asyncpg.connect(plain_url(database_url))
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = $1",
            LISTENER_NAME,
        )
    finally:
        await admin.close()
    assert killed == 1
    for _ in range(100):
        if not service.cache.listening:
            break
        await asyncio.sleep(0.01)
    misses = service.cache.misses
    assert (await stub.CheckAccess(check())).allowed
    assert (await stub.CheckAccess(check())).allowed
    assert service.cache.misses == misses + 2, "whatever was cached may miss notices now: every read goes to Postgres"
    assert len(service.cache) == 1, "nothing new is cached while notices cannot arrive (the old entry is last-known)"

    await wait_listening(service)  # it reconnects by itself, and starts from empty
    assert len(service.cache) == 0
    assert (await stub.CheckAccess(check())).allowed
    assert len(service.cache) == 1
    misses = service.cache.misses
    assert (await stub.CheckAccess(check())).allowed
    assert service.cache.misses == misses, "served from the cache again"


async def test_a_consumption_through_one_replica_shows_in_the_others_balance_within_100_ms(
    webhooks: WebhookPoster,
    stub: pb_grpc.EntitlementServiceAsyncStub,
    other_replica: _WithToken,
    clock: FakeClock,
) -> None:
    # The other replica reads the wall clock: the period must contain the real now for its grant to count.
    now = datetime.now(UTC)
    clock.set(now)
    event = subscription_event(
        "subscription.active",
        timestamp=now - timedelta(hours=1),
        created_at=now - timedelta(days=1),
        previous_billing_date=now - timedelta(days=1),
        next_billing_date=now + timedelta(days=29),
    )
    await deliver(webhooks, event)
    tokens = check(feature="ai_tokens")
    started = time.monotonic()
    while (await other_replica.CheckAccess(tokens)).balance != "10000":
        assert time.monotonic() - started < 0.1, "the grant never showed in the other replica"
        await asyncio.sleep(0.002)
    spent = await stub.ConsumeCredits(
        pb.ConsumeCreditsRequest(customer_id=CUSTOMER_ID, credit="ai_tokens", amount="1.5", idempotency_key="k1")
    )
    assert spent.balance_after == "9998.5"
    committed = time.monotonic()
    while (await other_replica.CheckAccess(tokens)).balance != "9998.5":
        assert time.monotonic() - committed < 0.1, "the other replica still shows the old balance"
        await asyncio.sleep(0.002)


async def test_a_clean_shutdown_logs_no_bypass_warning(service: Running, caplog: pytest.LogCaptureFixture) -> None:
    await wait_listening(service)
    caplog.set_level(logging.WARNING)
    await service.stop(0)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("cache.")] == []


async def test_fresh_answers_from_memory_only_what_get_would_answer_from_memory(
    webhooks: WebhookPoster, db: Database, clock: FakeClock
) -> None:
    """CheckAccess's synchronous first try: a hit exactly when `get` would hit, None otherwise (then `lookup`)."""
    clock.set(ACTIVE_AT + timedelta(days=1))
    await deliver(webhooks, subscription_event("subscription.active", timestamp=ACTIVE_AT))
    cache = EntitlementCache(db)
    assert cache.fresh(CUSTOMER_ID) is None, "not listening: nothing cached may be trusted"
    tasks = BackgroundTasks()
    cache.start(tasks)
    try:
        for _ in range(250):
            if cache.listening:
                break
            await asyncio.sleep(0.02)
        assert cache.listening
        assert cache.fresh(CUSTOMER_ID, balances=False) is None, "not cached yet"
        await cache.get(CUSTOMER_ID, balances=False)
        hits = cache.hits
        found = cache.fresh(CUSTOMER_ID, balances=False)
        assert found is not None
        assert not found.stale
        assert [s.status for s in found.customer.subscriptions] == ["active"]
        assert cache.hits == hits + 1
        cache.invalidate(CUSTOMER_ID, balances_only=True)  # a consumption elsewhere: subscriptions still hold
        assert cache.fresh(CUSTOMER_ID, balances=False) is not None
        assert cache.fresh(CUSTOMER_ID, balances=True) is None, "balances not loaded: get would read them"
        await cache.get(CUSTOMER_ID, balances=True)
        assert cache.fresh(CUSTOMER_ID, balances=True) is not None
        cache.invalidate(CUSTOMER_ID)
        assert cache.fresh(CUSTOMER_ID, balances=False) is None, "a change notice drops it"
    finally:
        await tasks.stop()
