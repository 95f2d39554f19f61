"""`watch()` of the Python client (issue 13): WatchEntitlements as typed events against the real server, resumed
from the last cursor across broken streams (a real UNAVAILABLE or WATCH_SUBSCRIBER_TOO_SLOW on the wire from a
grpc.aio front, and a replica that goes away) with nothing lost or repeated, typed errors for cursors the server
refuses, the blocking flavour and the CLI."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import grpc
import pytest
from entitlements_client import (
    CursorExpired,
    EntitlementEvent,
    EntitlementEventKind,
    EntitlementsClient,
    EntitlementWatch,
    FailedPrecondition,
    InvalidArgument,
    InvalidCursor,
    ReconnectPolicy,
    ResourceExhausted,
    SubscriberTooSlow,
    SyncEntitlementsClient,
    Unavailable,
)
from entitlements_client.cli import main

from service.domain.catalog import Catalog
from service.server import Running, start
from storage.engine import Database
from tests.clients.python_client_support import Cut, Flaky, flaky_front, pro_customer
from tests.support import API_TOKEN, CUSTOMER_ID, SUB_ID, FakeClock, WebhookPoster, make_settings

QUICK = ReconnectPolicy(initial_backoff=0.01, max_backoff=0.05)
# Generous for a loaded machine: only a failure waits this long.
PATIENCE = 20.0
Kind = EntitlementEventKind
OTHER_CUSTOMER = "cus_0Zz9Yy8Xx7Ww6Vv5Uu4Tt"


@pytest.fixture
def target(service: Running) -> str:
    return f"127.0.0.1:{service.grpc_port}"


@pytest.fixture
async def client(target: str) -> AsyncIterator[EntitlementsClient]:
    async with EntitlementsClient(target, token=API_TOKEN) as opened:
        yield opened


@pytest.fixture
async def front(target: str) -> AsyncIterator[Flaky]:
    async with flaky_front(target) as opened:
        yield opened


async def next_event(watch: EntitlementWatch) -> EntitlementEvent:
    return await asyncio.wait_for(anext(watch), PATIENCE)


async def caught_up(watch: EntitlementWatch) -> EntitlementEvent:
    """Read up to the first heartbeat (the watch must yield heartbeats); the events before it."""
    while True:
        event = await next_event(watch)
        if event.is_heartbeat:
            return event


async def changes(watch: EntitlementWatch, count: int) -> list[EntitlementEvent]:
    """The next `count` events that are not heartbeats."""
    seen: list[EntitlementEvent] = []
    while len(seen) < count:
        event = await next_event(watch)
        if not event.is_heartbeat:
            seen.append(event)
    return seen


async def consume(client: EntitlementsClient, times: int) -> None:
    """`times` credit consumptions of the fixture customer: one CREDITS_CHANGED event each (at least)."""
    for _ in range(times):
        await client.consume_credits(CUSTOMER_ID, "ai_tokens", "1", f"watch-{uuid.uuid4().hex}")


async def settled_cursor(client: EntitlementsClient) -> str:
    """A cursor after every event committed so far: that of a marker change watched for (a change made just before
    a watch "from now" may still come to it as a live event)."""
    marker = f"org_mark_{uuid.uuid4().hex[:12]}"
    async with client.watch(heartbeats=True) as watch:
        await caught_up(watch)
        await client.link_customer(marker, OTHER_CUSTOMER)
        while True:
            event = await next_event(watch)
            if event.customer_ref == marker:
                return event.cursor


async def reference(client: EntitlementsClient, after: str, count: int) -> list[str]:
    """The cursors of the first `count` changes after `after`, read by one unbroken watch (the truth)."""
    async with client.watch(after_cursor=after) as watch:
        return [event.cursor for event in await changes(watch, count)]


async def test_watch_yields_typed_events_then_replays_the_same_ones_from_a_cursor(
    client: EntitlementsClient, webhooks: WebhookPoster
) -> None:
    async with client.watch(heartbeats=True) as watch:
        first = await caught_up(watch)
        assert (watch.cursor, watch.live) == (first.cursor, True)
        await pro_customer(webhooks)
        await consume(client, 2)
        live = await changes_until(watch, lambda seen: balances(seen)[-2:] == [Decimal(9999), Decimal(9998)])

    assert first.kind is Kind.HEARTBEAT
    assert first.cursor
    assert not first.customer_id
    subscription = next(event for event in live if event.kind is Kind.SUBSCRIPTION_CHANGED)
    assert subscription.customer_id == CUSTOMER_ID
    assert subscription.subscription is not None
    assert (subscription.subscription.subscription_id, subscription.subscription.access.allowed) == (SUB_ID, True)
    assert all(event.credit == "ai_tokens" for event in live if event.kind is Kind.CREDITS_CHANGED)
    assert all(event.occurred_at is not None and event.occurred_at.tzinfo for event in live)
    assert len({event.cursor for event in live}) == len(live)

    async with client.watch(after_cursor=first.cursor) as again:
        replayed = await changes(again, len(live))
    assert [event.cursor for event in replayed] == [event.cursor for event in live]
    assert replayed == live


def balances(events: list[EntitlementEvent]) -> list[Decimal | None]:
    return [event.balance for event in events if event.kind is Kind.CREDITS_CHANGED]


async def changes_until(
    watch: EntitlementWatch, done: Callable[[list[EntitlementEvent]], bool]
) -> list[EntitlementEvent]:
    seen: list[EntitlementEvent] = []
    while not done(seen):
        event = await next_event(watch)
        if not event.is_heartbeat:
            seen.append(event)
    return seen


async def test_an_event_is_json_with_its_kind_by_proto_name(
    client: EntitlementsClient, webhooks: WebhookPoster
) -> None:
    async with client.watch(heartbeats=True) as watch:
        await caught_up(watch)
        await pro_customer(webhooks)
        (event,) = await changes(watch, 1)

    as_json = event.to_dict()
    assert as_json["kind"].startswith("ENTITLEMENT_EVENT_KIND_")
    assert as_json["customer_id"] == CUSTOMER_ID
    json.dumps(as_json)


async def test_watching_one_customer_sees_only_that_customers_events(
    client: EntitlementsClient, webhooks: WebhookPoster
) -> None:
    async with (
        client.watch([OTHER_CUSTOMER], heartbeats=True) as other,
        client.watch([CUSTOMER_ID], heartbeats=True) as mine,
    ):
        await caught_up(other)
        await caught_up(mine)
        await pro_customer(webhooks)
        await client.link_customer("org_other", OTHER_CUSTOMER)
        mine_first = (await changes(mine, 1))[0]
        other_first = (await changes(other, 1))[0]

    assert mine_first.customer_id == CUSTOMER_ID
    assert (other_first.kind, other_first.customer_id, other_first.customer_ref) == (
        Kind.CUSTOMER_LINKED,
        OTHER_CUSTOMER,
        "org_other",
    )


@pytest.mark.parametrize(
    "cut",
    [Cut(after=3), Cut(after=2, code=grpc.StatusCode.RESOURCE_EXHAUSTED, reason="WATCH_SUBSCRIBER_TOO_SLOW")],
    ids=["unavailable", "subscriber-too-slow"],
)
async def test_watch_resumes_from_its_cursor_across_broken_streams_losing_and_repeating_nothing(
    cut: Cut, client: EntitlementsClient, front: Flaky, webhooks: WebhookPoster
) -> None:
    await pro_customer(webhooks)
    async with client.watch(heartbeats=True) as probe:
        start_cursor = (await caught_up(probe)).cursor
    # More than four cut streams can carry (each cut after at most 3 messages): all four cuts happen.
    total = 20
    front.cuts = [cut] * 4
    async with (
        EntitlementsClient(front.target, token=API_TOKEN) as through_front,
        through_front.watch(after_cursor=start_cursor, reconnect=QUICK) as watch,
    ):
        writer = asyncio.create_task(consume(client, total))
        seen = await changes(watch, total)
        await writer
        reconnects = watch.reconnects
    truth = await reference(client, start_cursor, total)

    assert [event.cursor for event in seen] == truth
    assert reconnects == 4
    assert front.attempts["WatchEntitlements"] == 5
    # Each stream resumed right after the last cursor the one before it delivered.
    assert all(stream for stream in front.forwarded)


async def test_watch_resumes_on_another_replica_when_its_replica_goes_away(
    service: Running,
    client: EntitlementsClient,
    front: Flaky,
    webhooks: WebhookPoster,
    database_url: str,
    clock: FakeClock,
    catalog: Catalog,
) -> None:
    other = await start(
        make_settings(database_url), clock=clock, catalog=catalog, db=Database.from_url(database_url, pool_size=4)
    )
    try:
        await pro_customer(webhooks)
        async with EntitlementsClient(f"127.0.0.1:{other.grpc_port}", token=API_TOKEN) as on_other:
            start_cursor = await settled_cursor(on_other)
            async with (
                EntitlementsClient(front.target, token=API_TOKEN) as through_front,
                through_front.watch(after_cursor=start_cursor, reconnect=QUICK) as watch,
            ):
                await consume(client, 3)
                before = await changes(watch, 3)
                # The replica serving the stream goes away; the front reaches only the other one from now.
                front.upstream = f"127.0.0.1:{other.grpc_port}"
                await service.stop(0)
                await consume(on_other, 3)
                after = await changes(watch, 3)
            truth = await reference(on_other, start_cursor, 6)
    finally:
        await other.stop(0)

    assert [event.cursor for event in before + after] == truth
    assert front.attempts["WatchEntitlements"] >= 2
    assert front.forwarded[0][: len(before)] != []


async def test_a_cursor_the_server_never_issued_is_invalid_cursor_and_not_retried(client: EntitlementsClient) -> None:
    watch = client.watch(after_cursor="not-a-cursor", reconnect=QUICK)
    with pytest.raises(InvalidCursor) as caught:
        await next_event(watch)

    assert isinstance(caught.value, InvalidArgument)
    assert (caught.value.reason, caught.value.field) == ("FIELD_INVALID", "after_cursor")
    assert watch.closed
    with pytest.raises(StopAsyncIteration):
        await anext(watch)


async def test_cursor_expired_from_the_wire_is_typed_with_its_reason(front: Flaky) -> None:
    front.cuts = [Cut(after=0, code=grpc.StatusCode.FAILED_PRECONDITION, reason="CURSOR_EXPIRED")]
    async with EntitlementsClient(front.target, token=API_TOKEN) as through_front:
        watch = through_front.watch(reconnect=QUICK)
        with pytest.raises(CursorExpired) as caught:
            await next_event(watch)

    assert caught.value.reason == "CURSOR_EXPIRED"
    assert front.attempts["WatchEntitlements"] == 1


async def test_a_watch_gives_up_after_its_policys_attempts_with_the_last_failure(front: Flaky) -> None:
    front.fail_first = 1000
    async with EntitlementsClient(front.target, token=API_TOKEN) as through_front:
        watch = through_front.watch(reconnect=ReconnectPolicy(initial_backoff=0.01, max_backoff=0.02, max_attempts=3))
        with pytest.raises(Unavailable):
            await next_event(watch)

    assert front.attempts["WatchEntitlements"] == 3


async def test_a_silent_stream_is_given_up_after_heartbeat_timeout_and_resumed(
    client: EntitlementsClient, front: Flaky, webhooks: WebhookPoster
) -> None:
    """The one wait here is the watchdog's own bound (0.3 s, a lower bound only)."""
    front.mute = 1
    async with (
        EntitlementsClient(front.target, token=API_TOKEN) as through_front,
        through_front.watch(heartbeats=True, reconnect=QUICK, heartbeat_timeout=0.3) as watch,
    ):
        first = await next_event(watch)  # then the stream goes quiet
        second = await next_event(watch)  # the heartbeat of the stream it reopened
        await pro_customer(webhooks)
        (change,) = await changes(watch, 1)
        reconnects, failure = watch.reconnects, watch.last_error

    assert (first.is_heartbeat, second.is_heartbeat) == (True, True)
    assert change.customer_id == CUSTOMER_ID
    assert reconnects == 1
    assert isinstance(failure, Unavailable)
    assert "no message" in failure.message
    assert front.attempts["WatchEntitlements"] == 2


async def test_the_blocking_watch_gives_up_a_silent_stream_too(front: Flaky) -> None:
    front.mute = 1

    def two_heartbeats() -> tuple[int, str]:
        with (
            SyncEntitlementsClient(front.target, token=API_TOKEN) as sync,
            sync.watch(heartbeats=True, reconnect=QUICK, heartbeat_timeout=0.3) as watch,
        ):
            assert next(watch).is_heartbeat
            assert next(watch).is_heartbeat  # from the reopened stream
            return watch.reconnects, str(watch.last_error)

    reconnects, failure = await asyncio.wait_for(asyncio.to_thread(two_heartbeats), PATIENCE)

    assert reconnects == 1
    assert "no message" in failure
    assert front.attempts["WatchEntitlements"] == 2


def test_subscriber_too_slow_is_still_a_resource_exhausted() -> None:
    assert issubclass(SubscriberTooSlow, ResourceExhausted)
    assert issubclass(CursorExpired, FailedPrecondition)


def test_a_single_customer_id_string_is_refused_before_anything_is_sent() -> None:
    client = SyncEntitlementsClient("127.0.0.1:1")
    try:
        with pytest.raises(TypeError, match="customer_ids"):
            client.watch(CUSTOMER_ID)
    finally:
        client.close()


async def test_the_blocking_watch_follows_changes_and_resumes(
    target: str, client: EntitlementsClient, front: Flaky, webhooks: WebhookPoster
) -> None:
    front.cuts = [Cut(after=2)]

    def follow(ready: asyncio.Event, loop: asyncio.AbstractEventLoop) -> list[EntitlementEvent]:
        with SyncEntitlementsClient(front.target, token=API_TOKEN) as sync:
            watch = sync.watch(heartbeats=True, reconnect=QUICK)
            seen: list[EntitlementEvent] = []
            try:
                for event in watch:
                    if event.is_heartbeat:
                        loop.call_soon_threadsafe(ready.set)
                        continue
                    seen.append(event)
                    if len(seen) == 4:
                        return seen
            finally:
                watch.close()
        return seen

    ready = asyncio.Event()
    following = asyncio.create_task(asyncio.to_thread(follow, ready, asyncio.get_running_loop()))
    await asyncio.wait_for(ready.wait(), PATIENCE)
    await pro_customer(webhooks)
    await consume(client, 4)
    seen = await asyncio.wait_for(following, PATIENCE)

    assert len({event.cursor for event in seen}) == 4
    assert seen[0].customer_id == CUSTOMER_ID
    assert front.attempts["WatchEntitlements"] >= 2


async def test_the_cli_prints_one_json_line_per_event(
    target: str, client: EntitlementsClient, webhooks: WebhookPoster
) -> None:
    async with client.watch(heartbeats=True) as probe:
        start_cursor = (await caught_up(probe)).cursor
    await pro_customer(webhooks)
    await consume(client, 1)
    out, err = io.StringIO(), io.StringIO()
    argv = ["--target", target, "--token", API_TOKEN, "watch", "--customer-id", CUSTOMER_ID]
    argv += ["--after-cursor", start_cursor, "--max-events", "2"]
    code = await asyncio.to_thread(main, argv, environ={}, stdout=out, stderr=err)

    assert (code, err.getvalue()) == (0, "")
    lines: list[dict[str, Any]] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 2
    assert all(line["customer_id"] == CUSTOMER_ID and line["cursor"] for line in lines)
