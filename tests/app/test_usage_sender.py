"""The usage sender, driven from outside: events recorded through gRPC reach the fake Dodo exactly once after every
fault injected (5xx, 429, timeouts, an answer lost after Dodo applied it, a sender killed between send and mark, a
second replica), events Dodo refuses are `rejected` with its message, and events that cannot reach Dodo within its
1 h window are `expired` (logged, counted, in GetUsage)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from datetime import timedelta

import aiohttp
import pytest
from dodopayments.types.event_input_param import EventInputParam

from service.app.dodo_gateway import DodoGateway
from service.app.reconciler import RateLimiter
from service.app.usage_sender import UsageSender, dodo_event_id
from service.domain.errors import DodoRefused, DodoUnavailable
from service.server import Running
from storage.engine import Database
from tests.app.test_usage import (
    CUSTOMER,
    ScriptedGateway,
    Stub,
    advance,
    delivered,
    event,
    record,
    service,
    stored,
    usage,
    wait_until,
)
from tests.fakedodo import FakeDodo
from tests.support import DODO_API_KEY, FakeClock

__all__ = ["service"]  # the module's server fixture (fast sender, the fake on the test clock)

INGEST = "POST /events/ingest"


def sent_ids(fake: FakeDodo) -> list[str]:
    """Every event id in every ingest request the fake received (answered or not)."""
    return [e["event_id"] for r in fake.requests_matching(INGEST) for e in (r.json or {}).get("events", [])]


def exactly_once(fake: FakeDodo, *event_ids: str, customer_id: str = CUSTOMER) -> None:
    assert set(fake.ingested) == {dodo_event_id(customer_id, e) for e in event_ids}


async def test_events_reach_dodo_as_json_numbers_with_our_timestamp(
    stub: Stub, db: Database, fake_dodo: FakeDodo, clock: FakeClock
) -> None:
    await record(stub, event("e1", tokens=1532, cost=0.25, model="m-large", cached=True))
    await delivered(db, 1)
    sent = fake_dodo.ingested[dodo_event_id(CUSTOMER, "e1")]
    assert (sent["customer_id"], sent["event_name"]) == (CUSTOMER, "api.tokens")
    assert sent["metadata"] == {"tokens": 1532, "cost": 0.25, "model": "m-large", "cached": True}
    assert isinstance(sent["metadata"]["tokens"], int), "an integral double goes as a JSON integer"
    assert sent["timestamp"].startswith(clock.now.strftime("%Y-%m-%dT%H:%M:%S"))
    row = (await stored(db))[(CUSTOMER, "e1")]
    assert (row.status, row.sent_at, row.attempts) == ("delivered", clock.now, 1)


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_a_5xx_is_retried_and_the_event_lands_once(
    stub: Stub, db: Database, fake_dodo: FakeDodo, status: int
) -> None:
    fake_dodo.fail_next(INGEST, status, times=2)
    await record(stub, event("e1"), event("e2"))
    await delivered(db, 2)
    exactly_once(fake_dodo, "e1", "e2")
    assert len(fake_dodo.requests_matching(INGEST)) == 3


async def test_an_answer_lost_after_dodo_ingested_only_resends_ids_dodo_ignores(
    stub: Stub, db: Database, fake_dodo: FakeDodo
) -> None:
    fake_dodo.apply_then_fail(INGEST, 502)
    await record(stub, event("e1"), event("e2"))
    await delivered(db, 2)
    exactly_once(fake_dodo, "e1", "e2")
    assert Counter(sent_ids(fake_dodo)) == {dodo_event_id(CUSTOMER, "e1"): 2, dodo_event_id(CUSTOMER, "e2"): 2}


async def test_a_timeout_is_retried(stub: Stub, db: Database, fake_dodo: FakeDodo) -> None:
    fake_dodo.hang_seconds = 2.0  # above the gateway's 1 s timeout
    fake_dodo.apply_then_fail(INGEST, timeout=True)
    await record(stub, event("e1"))
    await delivered(db, 1)
    exactly_once(fake_dodo, "e1")


async def test_429_backs_off_exponentially_then_delivers(stub: Stub, db: Database, fake_dodo: FakeDodo) -> None:
    fake_dodo.fail_next(INGEST, 429, times=3)
    started = time.monotonic()
    await record(stub, event("e1"))
    await delivered(db, 1)
    # Equal jitter: at least half of 0.5 s, 1 s and 2 s.
    assert time.monotonic() - started >= 1.75
    assert len(fake_dodo.requests_matching(INGEST)) == 4
    exactly_once(fake_dodo, "e1")


async def test_a_sender_killed_between_send_and_mark_is_replaced_and_dodo_ignores_the_resend(
    service: Running, stub: Stub, db: Database, fake_dodo: FakeDodo, clock: FakeClock
) -> None:
    gateway = service.dodo
    assert isinstance(gateway, ScriptedGateway)
    killed = asyncio.Event()

    async def die() -> None:
        gateway.after_ingest = None
        killed.set()
        raise asyncio.CancelledError  # the process dies with Dodo's 2xx in hand, before the mark

    gateway.after_ingest = die
    await record(stub, event("e1"), event("e2"))
    await asyncio.wait_for(killed.wait(), 5)
    await wait_until(lambda: _gone(service, "usage-sender"))
    rows = await stored(db)
    assert {row.status for row in rows.values()} == {"pending"}
    exactly_once(fake_dodo, "e1", "e2")

    # The replacement (a restart, or another replica) leaves the dead sender's claim alone until its lease ends.
    replacement = UsageSender(db, gateway, clock, wake=asyncio.Event(), limiter=RateLimiter(60_000))
    assert await replacement.run_once() == (0, True)
    advance(clock, fake_dodo, seconds=61)
    assert await replacement.run_once() == (2, True)
    assert {row.status for row in (await stored(db)).values()} == {"delivered"}
    exactly_once(fake_dodo, "e1", "e2")
    assert Counter(sent_ids(fake_dodo)).most_common(1)[0][1] == 2, "resent once, and Dodo ignored it"


async def _gone(running: Running, name: str) -> bool:
    return name not in running.tasks.running


async def test_replicas_on_one_database_send_each_event_once(
    service: Running, stub: Stub, db: Database, fake_dodo: FakeDodo, clock: FakeClock
) -> None:
    # Two more senders (other replicas) besides the server's own, all polling the same outbox.
    gateway = DodoGateway(DODO_API_KEY, fake_dodo.base_url, timeout=1.0, read_max_retries=0)
    wake = asyncio.Event()
    for index in range(2):
        UsageSender(
            db, gateway, clock, wake=wake, limiter=RateLimiter(60_000), batch_size=300, poll_interval=0.01
        ).start(service.tasks, name=f"replica-{index}")
    ids = [f"e{i}" for i in range(3000)]
    await asyncio.gather(
        *(record(stub, *[event(e) for e in ids[start : start + 1000]]) for start in range(0, 3000, 1000))
    )
    wake.set()
    await delivered(db, 3000)
    exactly_once(fake_dodo, *ids)
    sent = sent_ids(fake_dodo)
    assert len(sent) == len(set(sent)) == 3000, "no event was sent twice"
    assert all(len(r.json["events"]) <= 1000 for r in fake_dodo.requests_matching(INGEST))
    await gateway.close()


async def test_events_dodo_refuses_are_rejected_with_its_message_and_the_rest_delivered(
    stub: Stub, db: Database, fake_dodo: FakeDodo
) -> None:
    # Dodo fails the whole request for one unknown customer: the batch is split until that event is alone.
    await record(stub, event("good1"), event("good2"), event("good3"))
    await record(stub, event("bad"), customer_id="cus_unknown_to_dodo")
    await wait_until(lambda: _settled(db, 4))
    rows = await stored(db)
    bad = rows[("cus_unknown_to_dodo", "bad")]
    assert bad.status == "rejected"
    assert "Customer cus_unknown_to_dodo not found" in (bad.last_error or "")
    assert {rows[(CUSTOMER, e)].status for e in ("good1", "good2", "good3")} == {"delivered"}
    exactly_once(fake_dodo, "good1", "good2", "good3")


async def _settled(db: Database, count: int) -> bool:
    rows = await stored(db)
    return len(rows) == count and all(row.status != "pending" for row in rows.values())


async def test_a_400_for_a_single_event_is_never_retried(stub: Stub, db: Database, fake_dodo: FakeDodo) -> None:
    fake_dodo.fail_next(INGEST, 422, body={"code": "INVALID_REQUEST_BODY", "message": "event_name unknown"})
    await record(stub, event("e1"))
    await wait_until(lambda: _settled(db, 1))
    row = (await stored(db))[(CUSTOMER, "e1")]
    assert (row.status, row.last_error) == ("rejected", "HTTP 422 INVALID_REQUEST_BODY: event_name unknown")
    await asyncio.sleep(0.2)
    assert len(fake_dodo.requests_matching(INGEST)) == 1
    answer = await usage(stub)
    assert (answer.count, answer.delivery.rejected) == (1, 1)


async def test_events_not_delivered_within_the_hour_expire_loudly(
    service: Running,
    stub: Stub,
    db: Database,
    fake_dodo: FakeDodo,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="entitlements.usage")
    fake_dodo.fail_next(INGEST, 503, times=100_000)
    await record(stub, event("e1"), event("e2"))
    await wait_until(lambda: _attempted(db))
    await wait_until(lambda: _backlog_is(service, 2))
    advance(clock, fake_dodo, minutes=59, seconds=1)  # past the hour less the sender's 1 min safety margin
    await wait_until(lambda: _settled(db, 2))
    rows = await stored(db)
    assert {row.status for row in rows.values()} == {"expired"}
    assert all("1 h window" in (row.last_error or "") for row in rows.values())
    assert any(record.getMessage() == "usage.expired" for record in caplog.records)
    answer = await usage(stub)
    assert (answer.count, answer.delivery.expired, answer.delivery.pending) == (2, 2, 0)
    await wait_until(lambda: _backlog_is(service, 0))
    fake_dodo.clear_failures()
    await asyncio.sleep(0.2)
    assert fake_dodo.ingested == {}, "never sent after it expired"


async def _attempted(db: Database) -> bool:
    return all(row.attempts > 0 for row in (await stored(db)).values())


async def _backlog(running: Running) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{running.http_port}/metrics") as response,
    ):
        text = await response.text()
    for line in text.splitlines():
        if line.startswith('entitlements_outbox_backlog{kind="usage_events"}'):
            return float(line.split()[-1])
    raise AssertionError("no usage_events backlog in /metrics")


async def _backlog_is(running: Running, value: float) -> bool:
    return await _backlog(running) == value


# --- the gateway ----------------------------------------------------------------------------------------------


async def test_the_gateway_maps_ingest_failures(fake_dodo: FakeDodo) -> None:
    fake_dodo.customers.add(CUSTOMER)
    gateway = DodoGateway(DODO_API_KEY, fake_dodo.base_url, timeout=1.0, read_max_retries=2)
    one: list[EventInputParam] = [{"event_id": "x1", "customer_id": CUSTOMER, "event_name": "n"}]
    try:
        fake_dodo.fail_next(INGEST, 429)
        with pytest.raises(DodoUnavailable) as busy:
            await gateway.ingest_events(one)
        assert (busy.value.status, busy.value.outcome_unknown) == (429, False)
        assert len(fake_dodo.requests_matching(INGEST)) == 1, "retries are the sender's, never the SDK's"
        fake_dodo.fail_next(INGEST, 503)
        with pytest.raises(DodoUnavailable) as down:
            await gateway.ingest_events(one)
        assert down.value.outcome_unknown
        with pytest.raises(DodoRefused) as refused:
            await gateway.ingest_events(one + one)
        assert refused.value.status == 400
        assert "Duplicate event_id" in refused.value.dodo_message
        assert await gateway.ingest_events(one) == 1
        assert await gateway.ingest_events(one) == 0, "an id already ingested is ignored"
    finally:
        await gateway.close()


@pytest.mark.parametrize(
    ("minutes", "accepted"), [(-61, False), (-59, True), (4, True), (6, False)], ids=["old", "recent", "ahead", "far"]
)
async def test_the_fake_applies_dodos_timestamp_window_to_the_whole_request(
    fake_dodo: FakeDodo, clock: FakeClock, minutes: int, accepted: bool
) -> None:
    fake_dodo.frozen_now = clock.now
    fake_dodo.customers.add(CUSTOMER)
    gateway = DodoGateway(DODO_API_KEY, fake_dodo.base_url, timeout=1.0, read_max_retries=0)
    at = (clock.now + timedelta(minutes=minutes)).isoformat()
    events: list[EventInputParam] = [
        {"event_id": "fine", "customer_id": CUSTOMER, "event_name": "n"},
        {"event_id": "edge", "customer_id": CUSTOMER, "event_name": "n", "timestamp": at},
    ]
    try:
        if accepted:
            assert await gateway.ingest_events(events) == 2
        else:
            with pytest.raises(DodoRefused):
                await gateway.ingest_events(events)
            assert fake_dodo.ingested == {}
    finally:
        await gateway.close()
