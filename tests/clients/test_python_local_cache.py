"""`client.local()` (issue 13): CheckAccess answered in the caller's process from answers the WatchEntitlements
stream keeps right, against the real server. A grpc.aio front in front of the service counts every CheckAccess
that reaches the wire (so a hit is proven to make no RPC) and can hold an answer back (the fill race). The
service's clock is the cache's clock, so expiry at `access_ends_at` and the staleness bound are exact."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import grpc
import pytest
from entitlements_client import (
    AccessReason,
    CheckAccessResult,
    CursorExpired,
    EntitlementsClient,
    LocalEntitlements,
    Policy,
    ReconnectPolicy,
    StreamState,
    SyncEntitlementsClient,
    Unavailable,
)

from service.server import Running
from tests.clients.local_check_timing import time_local_checks
from tests.clients.python_client_support import Cut, Flaky, flaky_front, pro_customer
from tests.support import API_TOKEN, CUSTOMER_ID, FakeClock, WebhookPoster, deliver, subscription_event, utc

QUICK = ReconnectPolicy(initial_backoff=0.01, max_backoff=0.05)
PATIENCE = 20.0
ACTIVE_AT = utc("2026-09-01T10:15:40Z")
PERIOD_END = utc("2026-10-01T10:15:02.481233Z")
REF = "org_local_1"
STRANGER = "cus_0Zz9Yy8Xx7Ww6Vv5Uu4Tt"
MARKER_CUSTOMER = "cus_1Mk7Rr2Pp9Qq4Ww8Ee6Tt"


@pytest.fixture
def target(service: Running) -> str:
    return f"127.0.0.1:{service.grpc_port}"


@pytest.fixture
async def front(target: str) -> AsyncIterator[Flaky]:
    async with flaky_front(target) as opened:
        yield opened


@pytest.fixture
async def client(front: Flaky) -> AsyncIterator[EntitlementsClient]:
    """A client whose every call crosses the counting front."""
    async with EntitlementsClient(front.target, token=API_TOKEN) as opened:
        yield opened


async def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never: {what}")
        await asyncio.sleep(0.002)


async def cached(local: LocalEntitlements, customer_id: str, feature: str) -> CheckAccessResult:
    """The answer once it is served from memory (events of a change just made may still be arriving)."""
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        hits = local.stats().hits
        answer = await local.check_access(customer_id, feature)
        if local.stats().hits > hits:
            return answer
        await asyncio.sleep(0.01)
    pytest.fail(f"{customer_id}/{feature} never cached")


async def synced(local: LocalEntitlements, client: EntitlementsClient) -> None:
    """Until the cache has applied every event committed so far (a change made just before it started may still
    be on its way as a live event): a marker ref's cached answer is dropped by its CUSTOMER_LINKED, which comes
    after them all in commit order."""
    marker = f"org_sync_{uuid.uuid4().hex[:12]}"
    await local.check_access(customer_ref=marker, feature="dashboard")
    assert local.peek(customer_ref=marker, feature="dashboard") is not None, "the marker was cached"
    await client.link_customer(marker, MARKER_CUSTOMER)
    await eventually(lambda: local.peek(customer_ref=marker, feature="dashboard") is None, "the marker dropped")


def local_cache(client: EntitlementsClient, clock: FakeClock, **options: object) -> LocalEntitlements:
    return client.local(clock=clock, reconnect=QUICK, **options)  # type: ignore[arg-type]


async def test_a_cached_answer_is_served_from_memory_without_an_rpc(
    client: EntitlementsClient, front: Flaky, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    await pro_customer(webhooks)
    async with local_cache(client, clock) as local:
        await local.wait_live(PATIENCE)
        first = await local.check_access(CUSTOMER_ID, "dashboard")
        rpcs = front.attempts["CheckAccess"]
        again = [await local.check_access(CUSTOMER_ID, "dashboard") for _ in range(100)]
        stats = local.stats()

    assert (first.allowed, first.reason) == (True, AccessReason.ACTIVE)
    assert rpcs == 1
    assert front.attempts["CheckAccess"] == 1, "a hit makes no RPC"
    assert all(answer == first for answer in again)
    assert (stats.hits, stats.misses, stats.fills, stats.stream) == (100, 1, 1, StreamState.LIVE)


async def test_any_event_for_the_customer_invalidates_and_the_next_check_asks_again(
    client: EntitlementsClient, front: Flaky, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    async with local_cache(client, clock) as local:
        await local.wait_live(PATIENCE)
        before = await local.check_access(CUSTOMER_ID, "dashboard")
        other = await local.check_access(STRANGER, "dashboard")
        await pro_customer(webhooks)
        await eventually(lambda: local.stats().invalidations >= 1, "the customer's answer dropped")
        after = await local.check_access(CUSTOMER_ID, "dashboard")
        other_again = await local.check_access(STRANGER, "dashboard")
        stats = local.stats()

    assert before.reason == AccessReason.NO_SUBSCRIPTION
    assert (after.allowed, after.reason) == (True, AccessReason.ACTIVE)
    assert other_again == other
    # Two first checks and one after the event; the stranger's answer stayed cached.
    assert front.attempts["CheckAccess"] == 3
    assert stats.invalidations == 1


async def test_answers_by_ref_follow_the_link_and_the_resolved_customer(
    client: EntitlementsClient, front: Flaky, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    await pro_customer(webhooks)
    # settle=0: cache even right after a change (this test waits for every event it causes).
    async with local_cache(client, clock, settle=0) as local:
        await local.wait_live(PATIENCE)
        unlinked = await local.check_access(customer_ref=REF, feature="dashboard")
        assert (await local.check_access(customer_ref=REF, feature="dashboard")) == unlinked
        # CUSTOMER_LINKED names the ref: its answer is dropped.
        await client.link_customer(REF, CUSTOMER_ID)
        await eventually(lambda: local.stats().entries == 0, "the unlinked answer dropped")
        linked = await local.check_access(customer_ref=REF, feature="dashboard")
        tokens = await local.check_access(customer_ref=REF, feature="ai_tokens")
        assert (await local.check_access(customer_ref=REF, feature="ai_tokens")) == tokens
        rpcs = front.attempts["CheckAccess"]
        # A change of the resolved customer (named by id only) drops the answers asked for by ref.
        await client.consume_credits(CUSTOMER_ID, "ai_tokens", "5", "local-ref-1")
        await eventually(lambda: local.stats().entries == 0, "the ref's answers dropped")
        tokens_after = await local.check_access(customer_ref=REF, feature="ai_tokens")

    assert (unlinked.allowed, unlinked.reason, unlinked.customer_id) == (False, AccessReason.NO_SUBSCRIPTION, "")
    assert (linked.allowed, linked.customer_id) == (True, CUSTOMER_ID)
    assert rpcs == 3  # unlinked (once), linked, tokens (once)
    assert tokens.balance is not None
    assert tokens_after.balance == tokens.balance - 5


async def test_an_answer_expires_at_its_access_ends_at_without_waiting_for_an_event(
    client: EntitlementsClient, front: Flaky, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    await deliver(
        webhooks, subscription_event("subscription.active", timestamp=ACTIVE_AT, cancel_at_next_billing_date=True)
    )
    async with local_cache(client, clock, settle=0) as local:
        await local.wait_live(PATIENCE)
        await synced(local, client)
        clock.set(PERIOD_END - timedelta(seconds=1))
        rpcs_before = front.attempts["CheckAccess"]
        before = await local.check_access(CUSTOMER_ID, "dashboard")
        still = await local.check_access(CUSTOMER_ID, "dashboard")
        rpcs = front.attempts["CheckAccess"]
        clock.set(PERIOD_END)
        # No await between moving the clock and the check's lookup: no event could have arrived.
        lookup = local.check_access(CUSTOMER_ID, "dashboard")
        expirations = local.stats().expirations
        after = await lookup
        stats = local.stats()

    assert (before.allowed, before.reason, before.access_ends_at) == (
        True,
        AccessReason.CANCELLATION_SCHEDULED,
        PERIOD_END,
    )
    assert still == before
    assert rpcs - rpcs_before == 1
    assert expirations == 0  # the coroutine had not run yet
    assert (after.allowed, after.reason) == (False, AccessReason.SUBSCRIPTION_INACTIVE)
    assert stats.expirations == 1
    assert front.attempts["CheckAccess"] - rpcs_before == 2


async def test_an_answer_overtaken_by_an_event_while_in_flight_is_not_cached(
    client: EntitlementsClient, front: Flaky, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    # settle=0: only the per-customer generations keep the overtaken answer out.
    async with local_cache(client, clock, settle=0) as local:
        await local.wait_live(PATIENCE)
        # The server answers NO_SUBSCRIPTION now, but the answer is held back on its way...
        front.hold = asyncio.Event()
        in_flight = asyncio.create_task(local.check_access(CUSTOMER_ID, "dashboard"))
        await eventually(lambda: front.attempts["CheckAccess"] == 1, "the RPC reached the server")
        await asyncio.sleep(0.05)  # the server has answered and the front holds it (nothing here depends on it)
        # ...until the customer's subscription has changed and the cache has heard of it.
        await pro_customer(webhooks)
        await eventually(lambda: local.stats().events >= 1, "the event reached the cache")
        front.hold.set()
        stale = await in_flight
        front.hold = None
        right_after = local.stats()
        fresh = await local.check_access(CUSTOMER_ID, "dashboard")

    assert stale.reason == AccessReason.NO_SUBSCRIPTION, "the caller gets the answer it asked for"
    assert (right_after.entries, right_after.fills, right_after.fills_discarded) == (0, 0, 1), "but not cached"
    assert (fresh.allowed, fresh.reason) == (True, AccessReason.ACTIVE)


@pytest.mark.parametrize("policy", [Policy.FAIL_CLOSED, Policy.FAIL_OPEN])
async def test_with_the_stream_down_each_policy_does_what_it_says(
    policy: Policy, target: str, service: Running, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    await pro_customer(webhooks)
    async with EntitlementsClient(target, token=API_TOKEN, timeout=2) as direct:
        local = direct.local(
            clock=clock, reconnect=QUICK, policies={"dashboard": policy}, default_policy=Policy.FAIL_CLOSED
        )
        async with local:
            await local.wait_live(PATIENCE)
            await synced(local, direct)
            answer = await cached(local, CUSTOMER_ID, "dashboard")
            await cached(local, CUSTOMER_ID, "projects")  # FAIL_CLOSED by default
            await service.stop(0)
            await eventually(lambda: local.stats().stream is not StreamState.LIVE, "the stream seen down")

            outcomes: list[object] = []
            for _ in range(2):
                try:
                    outcomes.append(await local.check_access(CUSTOMER_ID, "dashboard"))
                except Unavailable as error:
                    outcomes.append(error)
            with pytest.raises(Unavailable):
                await local.check_access(CUSTOMER_ID, "projects")
            # Past the staleness bound even a FAIL_OPEN feature asks the (unreachable) server.
            clock.advance(seconds=31)
            with pytest.raises(Unavailable):
                await local.check_access(CUSTOMER_ID, "dashboard")
            stats = local.stats()

    if policy is Policy.FAIL_OPEN:
        assert outcomes == [answer, answer]
        assert stats.stale_hits == 2
    else:
        assert [type(outcome) for outcome in outcomes] == [Unavailable, Unavailable]
        assert stats.stale_hits == 0
    assert stats.stream is not StreamState.LIVE
    assert stats.staleness is not None
    assert stats.staleness >= 31


async def test_the_cache_keeps_at_most_max_entries_least_recently_used_first_out(
    client: EntitlementsClient, front: Flaky, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    await pro_customer(webhooks)
    async with local_cache(client, clock, max_entries=2, settle=0) as local:
        await local.wait_live(PATIENCE)
        await synced(local, client)
        start = front.attempts["CheckAccess"]
        evicted = local.stats().evictions
        for feature in ("dashboard", "projects", "dashboard", "ai_tokens"):
            await local.check_access(CUSTOMER_ID, feature)
        rpcs = front.attempts["CheckAccess"] - start
        await local.check_access(CUSTOMER_ID, "dashboard")  # kept: used more recently than projects
        kept = front.attempts["CheckAccess"] - start
        await local.check_access(CUSTOMER_ID, "projects")  # evicted
        stats = local.stats()

    assert (rpcs, kept, front.attempts["CheckAccess"] - start) == (3, 3, 4)
    assert stats.entries == 2
    assert stats.evictions - evicted == 2


async def test_a_webhook_driven_change_reaches_the_local_cache_within_100_ms(
    target: str, service: Running, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    clock.set(ACTIVE_AT + timedelta(days=1))
    await deliver(webhooks, subscription_event("subscription.active", timestamp=ACTIVE_AT))
    await server_cache_listening(service)
    async with EntitlementsClient(target, token=API_TOKEN) as direct, direct.local(clock=clock) as local:
        await local.wait_live(PATIENCE)
        await synced(local, direct)
        assert (await cached(local, CUSTOMER_ID, "dashboard")).allowed, "from memory now"
        cancelled_at = ACTIVE_AT + timedelta(days=2)
        body = subscription_event(
            "subscription.cancelled", timestamp=cancelled_at, status="cancelled", cancelled_at=cancelled_at
        )
        before = local.stats()
        status, reply = await webhooks.send(body)
        acknowledged = time.perf_counter()
        assert (status, reply) == (200, {"status": "applied"})
        invalidated: float | None = None
        while True:
            answer = await local.check_access(CUSTOMER_ID, "dashboard")
            if invalidated is None and local.stats().misses > before.misses:
                invalidated = time.perf_counter() - acknowledged
            if not answer.allowed:
                break
            if time.perf_counter() - acknowledged > PATIENCE:
                pytest.fail("the change never reached the local cache")
            # A caller checking every millisecond; spinning would starve the server, which shares this loop.
            await asyncio.sleep(0.001)
        lag = time.perf_counter() - acknowledged
        served = local.stats().hits - before.hits

    print(
        f"webhook 200 -> local cache answering the new decision: {lag * 1000:.1f} ms "
        f"(first miss after {1000 * (invalidated or lag):.1f} ms; {served} hits from memory before)"
    )
    assert lag < 0.1


async def server_cache_listening(service: Running) -> None:
    """The service's own CheckAccess cache hears invalidations (else its RPC answer could lag, not ours)."""
    await eventually(lambda: bool(service.cache.listening), "the service's cache listening")


async def test_the_blocking_local_cache_serves_from_memory_and_is_invalidated(
    front: Flaky, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    def in_thread(step: Callable[[], object]) -> Awaitable[object]:
        return asyncio.to_thread(step)

    sync = SyncEntitlementsClient(front.target, token=API_TOKEN)
    local = sync.local(clock=clock, reconnect=QUICK)
    try:
        await in_thread(local.start)
        await in_thread(lambda: local.wait_live(PATIENCE))
        before = await in_thread(lambda: local.check_access(CUSTOMER_ID, "dashboard"))
        await in_thread(lambda: local.check_access(CUSTOMER_ID, "dashboard"))
        rpcs = front.attempts["CheckAccess"]
        await pro_customer(webhooks)
        await eventually(lambda: local.stats().invalidations >= 1, "the answer dropped")
        after = await in_thread(lambda: local.check_access(CUSTOMER_ID, "dashboard"))
        stats = local.stats()
    finally:
        await in_thread(local.close)
        sync.close()

    assert rpcs == 1
    assert getattr(before, "reason", None) == AccessReason.NO_SUBSCRIPTION
    assert getattr(after, "reason", None) == AccessReason.ACTIVE
    assert (stats.hits, stats.invalidations) == (1, 1)


def test_policies_and_bounds_are_checked_when_the_cache_is_made() -> None:
    client = SyncEntitlementsClient("127.0.0.1:1")
    try:
        with pytest.raises(ValueError, match="max_entries"):
            client.local(max_entries=0)
        with pytest.raises(ValueError, match="max_staleness"):
            client.local(max_staleness=-1)
        with pytest.raises(TypeError, match="Policy"):
            client.local(policies={"dashboard": "open"})  # type: ignore[dict-item]
        local = client.local()
        with pytest.raises(ValueError, match="exactly one"):
            local.check_access(CUSTOMER_ID, "dashboard", customer_ref=REF)
    finally:
        client.close()


async def test_a_cached_check_costs_microseconds_in_the_caller(
    target: str, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    """Not a timing assertion: the figure is printed (`-s`) for the report and `make bench`; only its hits count."""
    await pro_customer(webhooks)
    async with EntitlementsClient(target, token=API_TOKEN) as direct, direct.local(clock=clock) as local:
        await local.wait_live(PATIENCE)
        await cached(local, CUSTOMER_ID, "dashboard")
        cost = await time_local_checks(local, CUSTOMER_ID, "dashboard", calls=20_000)

    print(f"local check: p50 {cost.p50_ns / 1000:.2f} us, p99 {cost.p99_ns / 1000:.2f} us over {cost.calls} calls")
    assert cost.hits == cost.calls


async def test_a_cursor_past_retention_empties_the_cache_and_it_watches_again_from_now(
    client: EntitlementsClient, front: Flaky, clock: FakeClock
) -> None:
    # The first stream breaks after its heartbeat and one event; resuming, the cursor is refused as expired.
    front.cuts = [Cut(after=2), Cut(after=0, code=grpc.StatusCode.FAILED_PRECONDITION, reason="CURSOR_EXPIRED")]
    async with local_cache(client, clock, settle=0) as local:
        await local.wait_live(PATIENCE)
        held = await local.check_access(STRANGER, "dashboard")
        assert local.peek(STRANGER, "dashboard") == held
        await client.link_customer("org_expiry_1", MARKER_CUSTOMER)
        await eventually(lambda: isinstance(local.last_error, CursorExpired), "the expired cursor seen")
        emptied = local.peek(STRANGER, "dashboard")
        await local.wait_live(PATIENCE)
        streams = front.attempts["WatchEntitlements"]

    assert emptied is None, "nothing the stream could not vouch for is kept"
    assert streams == 3  # cut, refused, then from now
    assert front.forwarded[2][:1] != []
