"""WatchEntitlements from outside (DESIGN §13): a real server (or two on one database), generated stubs, signed
webhooks, ConsumeCredits; the stream's replay, live follow, filters, heartbeats, cursors, retention, back-pressure,
shutdown, and the events time alone makes.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from service.domain.catalog import Catalog
from service.domain.clock import utc_now
from service.server import Running, start
from storage.engine import Database
from tests.support import (
    API_TOKEN,
    CUSTOMER_ID,
    PRO,
    FakeClock,
    WebhookPoster,
    bearer,
    credit_ledger_event,
    error_info,
    in_current_period,
    iso,
    load_event,
    make_settings,
)

Stub: TypeAlias = "pb_grpc.EntitlementServiceAsyncStub"
HEARTBEAT = pb.ENTITLEMENT_EVENT_KIND_HEARTBEAT


def customer_event(customer_id: str, subscription_id: str, *, at: datetime, **data: Any) -> dict[str, Any]:
    """subscription.active for another customer, shaped like the fixture."""
    body = copy.deepcopy(load_event("subscription_active"))
    body["timestamp"] = iso(at)
    body["data"]["subscription_id"] = subscription_id
    body["data"]["customer"]["customer_id"] = customer_id
    for key, value in data.items():
        body["data"][key] = iso(value) if isinstance(value, datetime) else value
    return body


async def read(call: Any, seconds: float = 5.0) -> pb.EntitlementEvent:
    message = await asyncio.wait_for(call.read(), seconds)
    assert message is not grpc.aio.EOF, "the stream ended"
    return message  # type: ignore[no-any-return]


async def changes(call: Any, count: int, *, seconds: float = 5.0) -> list[pb.EntitlementEvent]:
    """The next `count` events that are not heartbeats."""
    got: list[pb.EntitlementEvent] = []
    while len(got) < count:
        message = await read(call, seconds)
        if message.kind != HEARTBEAT:
            got.append(message)
    return got


async def until(
    call: Any, match: Callable[[pb.EntitlementEvent], bool], *, seconds: float = 5.0
) -> pb.EntitlementEvent:
    deadline = time.monotonic() + seconds
    while True:
        message = await read(call, max(0.01, deadline - time.monotonic()))
        if match(message):
            return message


async def opened(stub: Stub, **request: Any) -> tuple[Any, str]:
    """A stream and the cursor of its first heartbeat (the replay has caught up)."""
    call = stub.WatchEntitlements(pb.WatchEntitlementsRequest(**request))
    while True:
        message = await read(call)
        if message.kind == HEARTBEAT:
            return call, message.cursor


async def _read_to_the_end(call: Any) -> None:
    while (await asyncio.wait_for(call.read(), 10)) is not grpc.aio.EOF:
        pass
    pytest.fail("the stream ended without an error")


async def expect_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _read_to_the_end(call)
    return caught.value


async def log_positions(db: Database) -> list[int]:
    async with db.connection() as connection:
        rows = await connection.fetch("SELECT position FROM watch_events ORDER BY position")
    return [row["position"] for row in rows]


# --- the stream's basics ---------------------------------------------------------------------------------------


async def test_a_webhook_reaches_an_open_stream_in_order_with_its_kinds(
    service: Running, stub: Stub, webhooks: WebhookPoster
) -> None:
    call, start_cursor = await opened(stub)
    assert (await webhooks.send(load_event("subscription_active")))[0] == 200
    got = await changes(call, 3)
    assert [m.kind for m in got] == [
        pb.ENTITLEMENT_EVENT_KIND_SUBSCRIPTION_CHANGED,
        pb.ENTITLEMENT_EVENT_KIND_ACCESS_CHANGED,
        pb.ENTITLEMENT_EVENT_KIND_CREDITS_CHANGED,
    ]
    changed, access, credits = got
    assert changed.customer_id == CUSTOMER_ID
    assert changed.subscription.product_id == PRO
    assert access.subscription.access.allowed
    assert access.subscription.access.reason == pb.ACCESS_REASON_ACTIVE
    assert credits.credit == "ai_tokens"
    assert credits.balance == "10000"
    cursors = [m.cursor for m in got]
    assert len(set(cursors)) == 3
    assert start_cursor not in cursors
    call.cancel()


async def replayed(stub: Stub, **request: Any) -> list[pb.EntitlementEvent]:
    """What a new stream replays before its caught-up heartbeat."""
    call = stub.WatchEntitlements(pb.WatchEntitlementsRequest(**request))
    got = []
    while (message := await read(call)).kind != HEARTBEAT:
        got.append(message)
    call.cancel()
    return got


async def test_resuming_from_any_cursor_replays_exactly_what_followed_it(
    service: Running, stub: Stub, webhooks: WebhookPoster
) -> None:
    call, start_cursor = await opened(stub)
    await webhooks.send(load_event("subscription_active"))
    await webhooks.send(load_event("subscription_on_hold"))
    await service.watch_log.sequence()
    first = await changes(call, len(await log_positions(service.db)))
    call.cancel()
    assert len(first) >= 4
    assert await replayed(stub, after_cursor=start_cursor) == first
    for index, seen in enumerate(first):
        assert await replayed(stub, after_cursor=seen.cursor) == first[index + 1 :]
    # A filtered replay skips the others' events but nothing of its own.
    assert await replayed(stub, after_cursor=start_cursor, customer_ids=["cus_nobody"]) == []


async def test_a_filtered_stream_gets_only_its_customers_and_heartbeats_move_its_cursor(
    database_url: str, db: Database, catalog: Catalog, clock: FakeClock, webhooks: WebhookPoster
) -> None:
    running = await start(
        make_settings(database_url, ENTITLEMENTS_WATCH_HEARTBEAT_SECONDS="0.2"), clock=clock, catalog=catalog
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}", interceptors=bearer(API_TOKEN)) as ch:
            stub = pb_grpc.EntitlementServiceStub(ch)
            call, cursor = await opened(stub, customer_ids=["cus_watched"])
            poster = WebhookPoster(f"http://127.0.0.1:{running.http_port}/webhooks/dodo", webhooks.session)
            await poster.send(customer_event("cus_other", "sub_other", at=clock.now))
            await poster.send(customer_event("cus_watched", "sub_watched", at=clock.now))
            got = await changes(call, 3)
            assert {m.customer_id for m in got} == {"cus_watched"}
            # Idle now: the heartbeat's cursor is past every event so far, the other customer's included.
            beat = await until(call, lambda m: m.kind == HEARTBEAT, seconds=2)
            head = (await log_positions(db))[-1]
            assert beat.cursor.endswith(f".{head}")
            assert beat.cursor != cursor
            call.cancel()
    finally:
        await running.stop(0)


@pytest.mark.parametrize(
    "cursor",
    ["nonsense", "w1.000000000000.0", "w1.zzzzzzzzzzzz.1", "w1.abcdefabcdef.99999999999999999999"],
)
async def test_a_cursor_the_service_did_not_issue_is_invalid_argument(
    service: Running, stub: Stub, cursor: str
) -> None:
    error = await expect_error(stub.WatchEntitlements(pb.WatchEntitlementsRequest(after_cursor=cursor)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(error)
    assert info.reason == "FIELD_INVALID"
    assert info.metadata["field"] == "after_cursor"


async def test_a_cursor_beyond_the_head_is_invalid_argument(service: Running, stub: Stub) -> None:
    _, cursor = await opened(stub)
    epoch = cursor.split(".")[1]
    error = await expect_error(stub.WatchEntitlements(pb.WatchEntitlementsRequest(after_cursor=f"w1.{epoch}.5")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_too_many_or_bad_customer_ids_are_invalid_argument(service: Running, stub: Stub) -> None:
    for ids in (["x"] * 1001, [""], ["a\x00b"], ["z" * 256]):
        error = await expect_error(stub.WatchEntitlements(pb.WatchEntitlementsRequest(customer_ids=ids)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(error).metadata["field"] == "customer_ids"


async def test_a_cursor_past_retention_is_cursor_expired(
    service: Running, stub: Stub, webhooks: WebhookPoster, db: Database
) -> None:
    call, old_cursor = await opened(stub)
    await webhooks.send(load_event("subscription_active"))
    await changes(call, 3)
    call.cancel()
    async with db.connection() as connection:
        await connection.execute("UPDATE watch_events SET sequenced_at = sequenced_at - interval '200 hours'")
    service.watch_log._pruned_at = float("-inf")  # the next pass prunes (it does so once a minute)
    await service.watch_log.sequence()
    error = await expect_error(stub.WatchEntitlements(pb.WatchEntitlementsRequest(after_cursor=old_cursor)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(error).reason == "CURSOR_EXPIRED"
    # The newest cursor is still good: nothing after it was pruned.
    assert await log_positions(db) == []
    newest = stub.WatchEntitlements(pb.WatchEntitlementsRequest(after_cursor=old_cursor.rsplit(".", 1)[0] + ".3"))
    assert (await read(newest)).kind == HEARTBEAT
    newest.cancel()


async def test_watching_needs_the_check_scope(database_url: str, db: Database, catalog: Catalog) -> None:
    running = await start(
        make_settings(database_url, ENTITLEMENTS_API_TOKENS="", ENTITLEMENTS_CALLERS="spender:tok-c:consume"),
        catalog=catalog,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}", interceptors=bearer("tok-c")) as ch:
            error = await expect_error(
                pb_grpc.EntitlementServiceStub(ch).WatchEntitlements(pb.WatchEntitlementsRequest())
            )
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error_info(error).reason == "CALLER_SCOPE_MISSING"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as ch:
            error = await expect_error(
                pb_grpc.EntitlementServiceStub(ch).WatchEntitlements(pb.WatchEntitlementsRequest())
            )
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await running.stop(0)


async def test_stopping_the_server_ends_streams_with_unavailable_at_once(
    database_url: str, db: Database, catalog: Catalog
) -> None:
    running = await start(make_settings(database_url), catalog=catalog)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}", interceptors=bearer(API_TOKEN)) as ch:
        call, _ = await opened(pb_grpc.EntitlementServiceStub(ch))
        started = time.monotonic()
        stopping = asyncio.create_task(running.stop(30))
        error = await expect_error(call)
        await stopping
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        # Not held for the 30 s grace: the stream ended as the stop began.
        assert time.monotonic() - started < 10


# --- credits ---------------------------------------------------------------------------------------------------


async def test_credits_low_and_exhausted_fire_once_per_crossing(
    service: Running, stub: Stub, webhooks: WebhookPoster
) -> None:
    await webhooks.send(load_event("subscription_active"))  # Pro grants 10000 ai_tokens; "10%" makes 1000 low
    call, cursor = await opened(stub, customer_ids=[CUSTOMER_ID])

    async def consume(amount: str, key: str) -> None:
        await stub.ConsumeCredits(
            pb.ConsumeCreditsRequest(customer_id=CUSTOMER_ID, credit="ai_tokens", amount=amount, idempotency_key=key)
        )

    await consume("8000", "k1")  # 2000 left: not low
    await consume("1500", "k2")  # 500: low (crossed 1000)
    await consume("100", "k3")  # 400: still low, no second event
    await consume("400", "k4")  # 0: exhausted (no overage for ai_tokens)
    await until(call, lambda m: m.kind == pb.ENTITLEMENT_EVENT_KIND_CREDITS_EXHAUSTED)
    got = [m for m in await replayed(stub, after_cursor=cursor) if m.credit and m.balance != "10000"]
    assert [(m.kind, m.balance) for m in got] == [
        (pb.ENTITLEMENT_EVENT_KIND_CREDITS_CHANGED, "2000"),
        (pb.ENTITLEMENT_EVENT_KIND_CREDITS_CHANGED, "500"),
        (pb.ENTITLEMENT_EVENT_KIND_CREDITS_LOW, "500"),
        (pb.ENTITLEMENT_EVENT_KIND_CREDITS_CHANGED, "400"),
        (pb.ENTITLEMENT_EVENT_KIND_CREDITS_CHANGED, "0"),
        (pb.ENTITLEMENT_EVENT_KIND_CREDITS_EXHAUSTED, "0"),
    ]
    assert got[2].threshold == "1000"
    call.cancel()


async def test_a_link_is_an_event_and_later_events_carry_the_ref(
    service: Running, stub: Stub, webhooks: WebhookPoster
) -> None:
    await webhooks.send(load_event("subscription_active"))
    call, _ = await opened(stub)
    await stub.LinkCustomer(pb.LinkCustomerRequest(customer_ref="acct_42", customer_id=CUSTOMER_ID))
    linked = await until(call, lambda m: m.kind == pb.ENTITLEMENT_EVENT_KIND_CUSTOMER_LINKED)
    # CheckAccess by ref says which customer it resolved to (what a caller-side cache keys its answer by).
    by_ref = await stub.CheckAccess(pb.CheckAccessRequest(customer_ref="acct_42", feature="pro"))
    assert by_ref.customer_id == CUSTOMER_ID
    unlinked = await stub.CheckAccess(pb.CheckAccessRequest(customer_ref="acct_none", feature="pro"))
    assert unlinked.customer_id == ""
    assert unlinked.reason == pb.ACCESS_REASON_NO_SUBSCRIPTION
    assert (linked.customer_id, linked.customer_ref) == (CUSTOMER_ID, "acct_42")
    await stub.ConsumeCredits(
        pb.ConsumeCreditsRequest(customer_ref="acct_42", credit="ai_tokens", amount="1", idempotency_key="k")
    )
    spent = await until(call, lambda m: m.kind == pb.ENTITLEMENT_EVENT_KIND_CREDITS_CHANGED)
    assert spent.customer_ref == "acct_42"
    assert spent.balance == "9999"
    call.cancel()


# --- back-pressure ---------------------------------------------------------------------------------------------


async def test_a_slow_stream_is_cut_off_with_a_resumable_cursor_and_slows_nobody(
    database_url: str, db: Database, catalog: Catalog
) -> None:
    running = await start(make_settings(database_url, ENTITLEMENTS_WATCH_BUFFER_EVENTS="5000"), catalog=catalog)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}", interceptors=bearer(API_TOKEN)) as ch:
            stub = pb_grpc.EntitlementServiceStub(ch)
            # A reader that stops reading: a small flow-control window (no BDP growth), so the server's writes
            # to it block after ~64 KB instead of filling the client's memory.
            slow_channel = grpc.aio.insecure_channel(
                f"127.0.0.1:{running.grpc_port}",
                interceptors=bearer(API_TOKEN),
                options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536)],
            )
            slow, slow_cursor = await opened(pb_grpc.EntitlementServiceStub(slow_channel))
            fast, _ = await opened(stub)
            bursts, size = 40, 500
            total = bursts * size

            async def fast_reader() -> list[pb.EntitlementEvent]:
                return await changes(fast, total, seconds=30)

            reading = asyncio.create_task(fast_reader())
            started = time.monotonic()
            for burst in range(bursts):  # balance changes in commits of 500: the triggers log each one
                async with db.tx() as connection:
                    await connection.execute(
                        "INSERT INTO credit_balances (customer_id, credit, balance) "
                        "SELECT 'cus_' || n, 'ai_tokens', n FROM generate_series($1::int, $2::int) AS n",
                        burst * size + 1,
                        (burst + 1) * size,
                    )
                running.watch_log.wake()
                await asyncio.sleep(0.1)  # 5,000 changes/s: the reading stream (in this process) keeps up
            writing = time.monotonic() - started
            fast_got = await reading
            assert len({m.cursor for m in fast_got}) == total  # the reading stream got everything
            # The writers were never held up by the stream that does not read.
            assert writing < 15
            # The slow one never read: its buffer filled and the stream ended, telling where to resume.
            error = await expect_error(slow)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            info = error_info(error)
            assert info.reason == "WATCH_SUBSCRIBER_TOO_SLOW"
            # What the transport had taken in before the stream blocked was delivered: read it, then resume.
            resume = info.metadata["cursor"]
            assert resume != slow_cursor
            again = stub.WatchEntitlements(pb.WatchEntitlementsRequest(after_cursor=resume))
            position = int(resume.rsplit(".", 1)[1])
            replayed = await changes(again, total - (position - int(slow_cursor.rsplit(".", 1)[1])), seconds=30)
            assert [m.cursor for m in replayed] == [m.cursor for m in fast_got[-len(replayed) :]]
            again.cancel()
            fast.cancel()
            await slow_channel.close()
    finally:
        await running.stop(0)


# --- across replicas -------------------------------------------------------------------------------------------


async def test_no_event_is_lost_or_duplicated_across_a_replica_restart_under_concurrent_writers(
    database_url: str, db: Database, catalog: Catalog
) -> None:
    """Two replicas on one database; writers on both; a watcher on A resumes on B with its cursor when A stops,
    then on a new A. It must see every position of the log exactly once, in order, and every account's last
    balance."""
    replicas = [await start(make_settings(database_url), catalog=catalog) for _ in range(2)]
    customers = [f"cus_w{n}" for n in range(8)]
    now = datetime.now(UTC)
    channels: list[grpc.aio.Channel] = []

    def stub_for(running: Running) -> Stub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}", interceptors=bearer(API_TOKEN))
        channels.append(channel)
        return pb_grpc.EntitlementServiceStub(channel)

    try:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            for n, customer in enumerate(customers):
                poster = WebhookPoster(f"http://127.0.0.1:{replicas[n % 2].http_port}/webhooks/dodo", session)
                event = in_current_period(customer_event(customer, f"sub_w{n}", at=now))
                assert (await poster.send(event))[0] == 200
        stubs = [stub_for(r) for r in replicas]
        call, cursor = await opened(stubs[0])
        received: list[pb.EntitlementEvent] = []
        stop_writing = asyncio.Event()

        async def writer(index: int) -> int:
            done = 0
            while not stop_writing.is_set():
                try:
                    await stubs[index % 2].ConsumeCredits(
                        pb.ConsumeCreditsRequest(
                            customer_id=customers[(index + done) % len(customers)],
                            credit="ai_tokens",
                            amount="1",
                            idempotency_key=f"w{index}-{done}",
                        ),
                        timeout=5,
                    )
                    done += 1
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)  # its replica is stopping or restarting: again, with the same key
            return done

        async def follow(call: Any, want: int) -> None:
            while len(received) < want:
                message = await read(call, 10)
                if message.kind != HEARTBEAT:
                    received.append(message)

        writers = [asyncio.create_task(writer(i)) for i in range(6)]
        # Writers on A (even) fail while it is down and resume on its new instance.
        await follow(call, 150)
        await replicas[0].stop(0)
        with pytest.raises((grpc.aio.AioRpcError, AssertionError)):
            await follow(call, 10**9)
        cursor = received[-1].cursor
        call = stubs[1].WatchEntitlements(pb.WatchEntitlementsRequest(after_cursor=cursor))
        await follow(call, len(received) + 150)
        replicas[0] = await start(make_settings(database_url), catalog=catalog)
        stubs[0] = stub_for(replicas[0])
        call.cancel()
        call = stubs[0].WatchEntitlements(pb.WatchEntitlementsRequest(after_cursor=received[-1].cursor))
        await follow(call, len(received) + 150)
        stop_writing.set()
        await asyncio.gather(*writers)
        for replica in replicas:
            await replica.watch_log.sequence()
        head = (await log_positions(db))[-1]
        while int(received[-1].cursor.rsplit(".", 1)[1]) < head:
            message = await read(call, 10)
            if message.kind != HEARTBEAT:
                received.append(message)
        call.cancel()
        positions = [int(m.cursor.rsplit(".", 1)[1]) for m in received]
        assert positions == sorted(set(positions)), "duplicated or out of order"
        first = positions[0]
        assert positions == list(range(first, head + 1)), "an event was skipped"
        async with db.connection() as connection:
            balances = {
                row["customer_id"]: str(row["balance"])
                for row in await connection.fetch("SELECT customer_id, balance FROM credit_balances")
            }
        last_seen = {m.customer_id: m.balance for m in received if m.kind == pb.ENTITLEMENT_EVENT_KIND_CREDITS_CHANGED}
        assert last_seen == {c: balances[c] for c in last_seen}
        assert len(last_seen) == len(customers)
    finally:
        for channel in channels:
            await channel.close()
        for replica in replicas:
            if not replica.stopped.is_set():
                await replica.stop(0)


# --- time ------------------------------------------------------------------------------------------------------


async def test_trial_end_fires_access_changed_within_a_second_exactly_once_across_replicas(
    database_url: str, db: Database, catalog: Catalog
) -> None:
    replicas = [await start(make_settings(database_url), clock=utc_now, catalog=catalog) for _ in range(2)]
    try:
        import aiohttp

        now = datetime.now(UTC)
        trial_end = now + timedelta(seconds=1.5)
        async with aiohttp.ClientSession() as session:
            poster = WebhookPoster(f"http://127.0.0.1:{replicas[0].http_port}/webhooks/dodo", session)
            event = customer_event(
                "cus_trial",
                "sub_trial",
                at=now,
                trial_period_days=1,
                created_at=trial_end - timedelta(days=1),
                previous_billing_date=trial_end - timedelta(days=1),
                next_billing_date=trial_end + timedelta(days=29),
            )
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{replicas[1].grpc_port}", interceptors=bearer(API_TOKEN)
            ) as ch:
                call, _ = await opened(pb_grpc.EntitlementServiceStub(ch), customer_ids=["cus_trial"])
                assert (await poster.send(event))[0] == 200
                first = await until(call, lambda m: m.kind == pb.ENTITLEMENT_EVENT_KIND_ACCESS_CHANGED)
                assert first.subscription.access.reason == pb.ACCESS_REASON_TRIALING
                ended = await until(call, lambda m: m.kind == pb.ENTITLEMENT_EVENT_KIND_ACCESS_CHANGED, seconds=5)
                received_at = datetime.now(UTC)
                assert ended.occurred_at.ToDatetime(UTC) == trial_end
                assert ended.subscription.access.reason == pb.ACCESS_REASON_ACTIVE
                assert received_at - trial_end < timedelta(seconds=1), received_at - trial_end
                call.cancel()
        await asyncio.sleep(1.2)  # both replicas' clocks have passed the instant; only one emitted it
        for replica in replicas:
            await replica.watch_log.sequence()
        async with db.connection() as connection:
            count = await connection.fetchval(
                "SELECT count(*) FROM watch_events WHERE kind = 'ACCESS_CHANGED' AND occurred_at = $1", trial_end
            )
        assert count == 1
    finally:
        for replica in replicas:
            await replica.stop(0)


async def test_period_end_and_grace_end_fire_when_the_clock_passes_them(
    service: Running, stub: Stub, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    """With the test clock: a cancellation at period end, and a hold whose grace (Pro: 3 days) runs out."""
    base = clock.now
    cancelled = customer_event(
        "cus_cancel",
        "sub_cancel",
        at=base,
        cancel_at_next_billing_date=True,
        next_billing_date=base + timedelta(hours=1),
    )
    held = customer_event("cus_hold", "sub_hold", at=base, status="on_hold")
    held["type"] = "subscription.on_hold"
    call, _ = await opened(stub, customer_ids=["cus_cancel", "cus_hold"])
    await webhooks.send(cancelled)
    await webhooks.send(held)
    granted: dict[str, bool] = {}
    while len(granted) < 2:
        event = await until(call, lambda m: m.kind == pb.ENTITLEMENT_EVENT_KIND_ACCESS_CHANGED)
        granted[event.customer_id] = event.subscription.access.allowed
    assert granted == {"cus_cancel": True, "cus_hold": True}
    clock.advance(hours=2)
    await service.watch_log.sequence()
    ended = await until(call, lambda m: m.kind == pb.ENTITLEMENT_EVENT_KIND_ACCESS_CHANGED)
    assert ended.customer_id == "cus_cancel"
    assert not ended.subscription.access.allowed
    assert ended.occurred_at.ToDatetime(UTC) == base + timedelta(hours=1)
    clock.advance(days=3)
    await service.watch_log.sequence()
    grace = await until(call, lambda m: m.kind == pb.ENTITLEMENT_EVENT_KIND_ACCESS_CHANGED)
    assert grace.customer_id == "cus_hold"
    assert not grace.subscription.access.allowed
    assert grace.occurred_at.ToDatetime(UTC) == base + timedelta(days=3)
    # Passing the instants again emits nothing more.
    clock.advance(days=1)
    await service.watch_log.sequence()
    async with service.db.connection() as connection:
        instants = await connection.fetch(
            "SELECT occurred_at FROM watch_events WHERE kind = 'ACCESS_CHANGED' AND occurred_at > $1 ORDER BY 1",
            base,
        )
    assert [row["occurred_at"] for row in instants] == [base + timedelta(hours=1), base + timedelta(days=3)]
    call.cancel()


async def test_metrics_show_open_streams_and_the_position_read(
    service: Running, stub: Stub, webhooks: WebhookPoster
) -> None:
    call, _ = await opened(stub)
    await webhooks.send(load_event("subscription_active"))
    await changes(call, 3)
    async with webhooks.session.get(f"http://127.0.0.1:{service.http_port}/metrics") as response:
        body = await response.text()
    assert "entitlements_watch_streams 1.0" in body
    assert "entitlements_watch_position 3.0" in body
    assert "entitlements_watch_streams_cut_total 0.0" in body
    call.cancel()


async def test_exhausted_for_a_dodo_linked_credit_uses_the_carts_overage_like_consumption_does(
    service: Running, stub: Stub, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    """api_calls allows 100 below zero in the catalog; this subscription's cart raises it to 300. EXHAUSTED must
    fire where ConsumeCredits and CheckAccess put the end of the headroom (-300), not at the catalog's -100."""
    event = copy.deepcopy(load_event("subscription_active"))
    event["data"]["credit_entitlement_cart"][0].update(overage_enabled=True, overage_limit="300")
    await webhooks.send(event)
    await webhooks.send(credit_ledger_event(entry_id="cle_watch_1", amount="1000", at=clock.now))
    call, cursor = await opened(stub, customer_ids=[CUSTOMER_ID])

    async def consume(amount: str, key: str) -> None:
        await stub.ConsumeCredits(
            pb.ConsumeCreditsRequest(customer_id=CUSTOMER_ID, credit="api_calls", amount=amount, idempotency_key=key)
        )

    await consume("1000", "a1")  # 0: headroom 300 left
    await consume("250", "a2")  # -250: past the catalog's -100, inside the cart's -300
    check = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="api_calls"))
    assert check.allowed
    await consume("50", "a3")  # -300: the headroom is gone
    await until(call, lambda m: m.kind == pb.ENTITLEMENT_EVENT_KIND_CREDITS_EXHAUSTED)
    check = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="api_calls"))
    assert check.reason == pb.ACCESS_REASON_CREDITS_EXHAUSTED
    got = [(m.kind, m.balance) for m in await replayed(stub, after_cursor=cursor) if m.credit == "api_calls"]
    assert (pb.ENTITLEMENT_EVENT_KIND_CREDITS_EXHAUSTED, "-300") in got
    assert [k for k, _ in got].count(pb.ENTITLEMENT_EVENT_KIND_CREDITS_EXHAUSTED) == 1
    call.cancel()
