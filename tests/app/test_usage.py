"""RecordUsage and GetUsage through the real gRPC stub, a real Postgres and the real usage sender talking to the fake
Dodo (DESIGN §12, §13): durable before OK, duplicates inside and across requests, every input limit, counts, sums
and delivery figures."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeAlias

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from entitlements_client import EntitlementsClient
from entitlements_client import UsageEvent as ClientEvent
from entitlements_client.cli import main
from google.protobuf.struct_pb2 import ListValue, NullValue, Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select

from service.app.dodo_gateway import DodoGateway
from service.domain.catalog import Catalog
from service.server import Running, start
from storage.engine import Database
from storage.models import UsageEvent
from tests.fakedodo import FakeDodo
from tests.support import (
    API_TOKEN,
    CUSTOMER_ID,
    DODO_API_KEY,
    FakeClock,
    WebhookPoster,
    deliver,
    error_info,
    load_event,
    make_settings,
    utc,
)

Stub: TypeAlias = "pb_grpc.EntitlementServiceAsyncStub"
CUSTOMER = "cus_Usage0Customer0One"
OTHER = "cus_Usage0Customer0Two"


class ScriptedGateway(DodoGateway):
    """The real gateway, with a hook run after a successful ingest (to play a crash between send and mark)."""

    after_ingest: Callable[[], Awaitable[None]] | None = None

    async def ingest_events(self, events: Any) -> int:
        count = await super().ingest_events(events)
        if self.after_ingest is not None:
            await self.after_ingest()
        return count


@pytest.fixture
async def service(
    database_url: str, db: Database, clock: FakeClock, catalog: Catalog, fake_dodo: FakeDodo
) -> AsyncIterator[Running]:
    """The server as `serve` builds it; the sender polls fast and the rate limit is out of the way. The fake Dodo
    keeps the service's (test) clock, so Dodo's 1 h window is judged on the same time."""
    fake_dodo.frozen_now = clock.now
    fake_dodo.customers.update({CUSTOMER, OTHER, CUSTOMER_ID})
    dodo = ScriptedGateway(DODO_API_KEY, fake_dodo.base_url, timeout=1.0, read_max_retries=0)
    settings = make_settings(
        database_url, ENTITLEMENTS_USAGE_RATE_PER_MINUTE="60000", ENTITLEMENTS_USAGE_POLL_SECONDS="0.05"
    )
    running = await start(settings, clock=clock, catalog=catalog, db=db, dodo=dodo)
    yield running
    if not running.stopped.is_set():
        await running.stop(0)


def advance(clock: FakeClock, fake: FakeDodo, **delta: float) -> None:
    clock.advance(**delta)
    fake.frozen_now = clock.now


async def wait_until(check: Callable[[], Awaitable[bool]], *, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def stamp(value: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


def event(event_id: str, name: str = "api.tokens", at: datetime | None = None, **properties: Any) -> pb.UsageEvent:
    values: dict[str, Value] = {}
    for key, value in properties.items():
        if isinstance(value, Value):
            values[key] = value
        elif isinstance(value, bool):
            values[key] = Value(bool_value=value)
        elif isinstance(value, int | float):
            values[key] = Value(number_value=value)
        else:
            values[key] = Value(string_value=value)
    return pb.UsageEvent(
        event_id=event_id, event_name=name, timestamp=stamp(at) if at is not None else None, properties=values
    )


async def record(stub: Stub, *events: pb.UsageEvent, customer_id: str = CUSTOMER, **named: str) -> Any:
    return await stub.RecordUsage(
        pb.RecordUsageRequest(customer_id="" if named else customer_id, events=list(events), **named)
    )


async def stored(db: Database) -> dict[tuple[str, str], UsageEvent]:
    async with db.session() as session:
        rows = (await session.execute(select(UsageEvent))).scalars().all()
    return {(row.customer_id, row.event_id): row for row in rows}


async def usage(stub: Stub, name: str = "api.tokens", customer_id: str = CUSTOMER, **fields: Any) -> Any:
    return await stub.GetUsage(pb.GetUsageRequest(customer_id=customer_id, event_name=name, **fields))


async def delivered(db: Database, count: int) -> None:
    async def check() -> bool:
        rows = await stored(db)
        return sum(1 for row in rows.values() if row.status == "delivered") >= count

    await wait_until(check)


# --- RecordUsage ----------------------------------------------------------------------------------------------


async def test_recorded_events_are_stored_before_the_answer(stub: Stub, db: Database, clock: FakeClock) -> None:
    answer = await record(stub, event("e1", tokens=1532, model="m-large"), event("e2", at=clock.now, ok=True))
    assert (answer.accepted, answer.duplicates) == (2, 0)
    rows = await stored(db)  # read right after the answer: committed
    assert set(rows) == {(CUSTOMER, "e1"), (CUSTOMER, "e2")}
    assert rows[(CUSTOMER, "e1")].properties == {"tokens": 1532, "model": "m-large"}
    assert rows[(CUSTOMER, "e1")].occurred_at == clock.now  # unset timestamp: now


async def test_an_event_id_already_recorded_counts_as_a_duplicate_and_keeps_its_first_values(
    stub: Stub, db: Database, fake_dodo: FakeDodo
) -> None:
    await record(stub, event("e1", tokens=1), event("e2", tokens=2))
    await delivered(db, 2)
    again = await record(stub, event("e1", tokens=100), event("e3", tokens=3))
    assert (again.accepted, again.duplicates) == (1, 1)
    await delivered(db, 3)
    assert (await stored(db))[(CUSTOMER, "e1")].properties == {"tokens": 1}
    assert fake_dodo.ingested[f"{CUSTOMER}:e1"]["metadata"] == {"tokens": 1}
    sent = [e["event_id"] for r in fake_dodo.requests_matching("POST /events/ingest") for e in r.json["events"]]
    assert sorted(sent) == sorted(f"{CUSTOMER}:{i}" for i in ("e1", "e2", "e3")), "nothing was sent twice"


async def test_an_event_id_repeated_inside_one_request_refuses_the_whole_request(stub: Stub, db: Database) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await record(stub, event("e1"), event("e2"), event("e1"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "events[2].event_id"
    assert await stored(db) == {}


async def test_concurrent_requests_sharing_event_ids_record_each_once(stub: Stub, db: Database) -> None:
    ids = [f"e{i:03d}" for i in range(200)]
    answers = await asyncio.gather(
        record(stub, *[event(e) for e in ids]),
        record(stub, *[event(e) for e in reversed(ids)]),
        record(stub, *[event(e) for e in ids[50:150]]),
    )
    assert sum(a.accepted for a in answers) == 200
    assert sum(a.duplicates for a in answers) == 300
    assert len(await stored(db)) == 200


async def test_two_customers_may_use_the_same_event_id_and_both_reach_dodo(
    stub: Stub, db: Database, fake_dodo: FakeDodo
) -> None:
    await record(stub, event("same", tokens=1))
    await record(stub, event("same", tokens=2), customer_id=OTHER)
    await delivered(db, 2)
    assert {k: v["metadata"]["tokens"] for k, v in fake_dodo.ingested.items()} == {
        f"{CUSTOMER}:same": 1,
        f"{OTHER}:same": 2,
    }


async def test_a_ref_not_linked_is_not_found(stub: Stub) -> None:
    for call in (
        record(stub, event("e1"), customer_ref="org_nobody"),
        stub.GetUsage(pb.GetUsageRequest(customer_ref="org_nobody", event_name="api.tokens")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(caught.value).reason == "CUSTOMER_REF_NOT_LINKED"


async def test_a_linked_ref_records_for_its_customer(stub: Stub, db: Database) -> None:
    await stub.LinkCustomer(pb.LinkCustomerRequest(customer_ref="org_42", customer_id=CUSTOMER))
    assert (await record(stub, event("e1", tokens=5), customer_ref="org_42")).accepted == 1
    assert (CUSTOMER, "e1") in await stored(db)
    by_ref = await stub.GetUsage(pb.GetUsageRequest(customer_ref="org_42", event_name="api.tokens"))
    assert (by_ref.count, dict(by_ref.sums)) == (1, {"tokens": "5"})


def with_properties(properties: dict[str, Any]) -> pb.UsageEvent:
    return event("e1", **properties)


def _many(count: int) -> list[pb.UsageEvent]:
    return [event(f"e{i}") for i in range(count)]


NOW = datetime(2026, 9, 10, tzinfo=UTC)  # the FakeClock's start


@pytest.mark.parametrize(
    ("events", "named", "field"),
    [
        pytest.param([], {}, "events", id="no-events"),
        pytest.param(_many(1001), {}, "events", id="over-1000-events"),
        pytest.param([event("")], {}, "events[0].event_id", id="empty-event-id"),
        pytest.param([event("x" * 256)], {}, "events[0].event_id", id="long-event-id"),
        pytest.param([event("a\x01b")], {}, "events[0].event_id", id="control-in-event-id"),
        pytest.param([event("e1", name="")], {}, "events[0].event_name", id="empty-event-name"),
        pytest.param([event("e1", name="n" * 256)], {}, "events[0].event_name", id="long-event-name"),
        pytest.param(
            [with_properties({f"k{i}": i for i in range(51)})], {}, "events[0].properties", id="over-50-properties"
        ),
        pytest.param([with_properties({"k" * 41: 1})], {}, "events[0].properties", id="long-key"),
        pytest.param([with_properties({"a\x00": 1})], {}, "events[0].properties", id="nul-in-key"),
        pytest.param([event("e1", v="x" * 501)], {}, "events[0].properties", id="long-value"),
        pytest.param([event("e1", v="a\x07b")], {}, "events[0].properties", id="control-in-value"),
        pytest.param([event("e1", v=Value(null_value=NullValue.NULL_VALUE))], {}, "events[0].properties", id="null"),
        pytest.param([event("e1", v=Value(struct_value=Struct()))], {}, "events[0].properties", id="struct"),
        pytest.param([event("e1", v=Value(list_value=ListValue()))], {}, "events[0].properties", id="list"),
        pytest.param([event("e1", v=Value())], {}, "events[0].properties", id="unset-value"),
        pytest.param([event("e1", v=float("nan"))], {}, "events[0].properties", id="nan"),
        pytest.param([event("e1", v=float("inf"))], {}, "events[0].properties", id="infinity"),
        pytest.param(
            [event("e1", at=NOW + timedelta(minutes=5, seconds=1))], {}, "events[0].timestamp", id="too-far-ahead"
        ),
        pytest.param([event("e1", at=NOW - timedelta(hours=1, seconds=1))], {}, "events[0].timestamp", id="too-old"),
        pytest.param([event("ok"), event("e1", v=Value())], {}, "events[1].properties", id="second-event"),
        pytest.param(
            [event("e1")], {"customer_id": CUSTOMER, "customer_ref": "org_42"}, "customer_ref", id="both-customers"
        ),
        pytest.param([event("e1")], {"customer_id": ""}, "customer_id", id="no-customer"),
        pytest.param([event("e1")], {"customer_id": "c" * 256}, "customer_id", id="long-customer-id"),
    ],
)
async def test_each_input_limit_is_invalid_argument_naming_its_field(
    stub: Stub, db: Database, events: list[pb.UsageEvent], named: dict[str, str], field: str
) -> None:
    request = pb.RecordUsageRequest(events=events, **(named or {"customer_id": CUSTOMER}))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RecordUsage(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    info = error_info(caught.value)
    assert (info.reason, info.metadata["field"]) == ("FIELD_INVALID", field)
    assert len(caught.value.details() or "") < 400, "messages quote at most 64 characters of input"
    assert await stored(db) == {}, "nothing is written when any event is refused"


async def test_limits_at_their_edge_are_accepted(stub: Stub, clock: FakeClock) -> None:
    edge = event(
        "x" * 255,
        name="n" * 255,
        at=clock.now - timedelta(minutes=59),
        **{f"k{i:02d}" + "k" * 37: "v\tw\n" + "x" * 496 for i in range(50)},
    )
    ahead = event("ahead", at=clock.now + timedelta(minutes=5))
    assert (await record(stub, edge, ahead)).accepted == 2
    assert (await record(stub, *[event(f"b{i}") for i in range(1000)])).accepted == 1000


# --- GetUsage -------------------------------------------------------------------------------------------------


async def test_get_usage_counts_sums_and_delivery_from_our_store(
    stub: Stub, db: Database, clock: FakeClock, fake_dodo: FakeDodo
) -> None:
    await record(
        stub,
        event("e1", tokens=1532, cost=0.1, model="m-large", cached=True),
        event("e2", tokens=8, cost=0.2),
        event("e3", name="other.event", tokens=1000),
    )
    await record(stub, event("e4", tokens=2), customer_id=OTHER)
    await delivered(db, 4)
    answer = await usage(stub)
    assert answer.count == 2
    assert dict(answer.sums) == {"tokens": "1540", "cost": "0.3"}  # exact: never through float
    assert (answer.delivery.pending, answer.delivery.delivered) == (0, 2)
    assert (answer.delivery.rejected, answer.delivery.expired) == (0, 0)

    fake_dodo.fail_next("POST /events/ingest", 503, times=1000)
    await record(stub, event("e5", at=clock.now - timedelta(minutes=5), tokens=10))
    pending = await usage(stub)
    assert (pending.count, pending.delivery.pending, dict(pending.sums)["tokens"]) == (3, 1, "1550")

    window = await usage(stub, start=stamp(clock.now - timedelta(minutes=10)), end=stamp(clock.now))
    assert (window.count, dict(window.sums)) == (1, {"tokens": "10"}), "end is exclusive: events at now are outside"


async def test_get_usage_defaults_to_the_current_billing_period_else_the_last_30_days(
    stub: Stub, db: Database, webhooks: WebhookPoster
) -> None:
    await deliver(webhooks, load_event("subscription_active"))  # CUSTOMER_ID, period 2026-09-01 -> 2026-10-01
    async with db.session() as session:
        for customer_id in (CUSTOMER_ID, OTHER):
            for event_id, at in (("before", "2026-08-20T00:00:00Z"), ("inside", "2026-09-02T00:00:00Z")):
                session.add(
                    UsageEvent(customer_id=customer_id, event_id=event_id, event_name="api.tokens", occurred_at=utc(at))
                )
    assert (await usage(stub, customer_id=CUSTOMER_ID)).count == 1, "the subscription's current period"
    assert (await usage(stub, customer_id=OTHER)).count == 2, "no subscription: the last 30 days"


async def test_get_usage_for_an_unknown_customer_is_not_found(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await usage(stub, customer_id="cus_never_seen")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_get_usage_checks_its_fields(stub: Stub, clock: FakeClock) -> None:
    await record(stub, event("e1"))
    for fields, field in (
        ({"name": ""}, "event_name"),
        ({"start": stamp(clock.now), "end": stamp(clock.now)}, "end"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await usage(stub, **fields)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).metadata["field"] == field


# --- the Python client and its CLI ------------------------------------------------------------------------------


async def test_the_python_client_records_and_reads_usage(service: Running, db: Database, clock: FakeClock) -> None:
    async with EntitlementsClient(f"127.0.0.1:{service.grpc_port}", token=API_TOKEN) as client:
        events = [
            ClientEvent("c1", "api.tokens", clock.now, {"tokens": 7, "model": "m"}),
            ClientEvent("c2", "api.tokens"),
        ]
        first = await client.record_usage(CUSTOMER, events)
        again = await client.record_usage(CUSTOMER, events[:1])
        assert (first.accepted, first.duplicates, again.accepted, again.duplicates) == (2, 0, 0, 1)
        await delivered(db, 2)
        report = await client.get_usage(CUSTOMER, "api.tokens")
    assert (report.count, dict(report.sums), report.delivery.delivered) == (2, {"tokens": Decimal(7)}, 2)


async def test_the_cli_records_and_reads_usage(service: Running) -> None:
    connect = ["--target", f"127.0.0.1:{service.grpc_port}", "--token", API_TOKEN]

    async def cli(*argv: str) -> tuple[int, Any]:
        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(main, [*connect, *argv], environ={}, stdout=out, stderr=err)
        return code, json.loads(out.getvalue()) if code == 0 else err.getvalue()

    recorded = await cli(
        "record-usage", "--customer-id", CUSTOMER, "--event-id", "cli-1", "--event-name", "api.tokens",
        "--property", "tokens=12", "--property", "model=m-large", "--property", "cached=true",
    )  # fmt: skip
    assert recorded == (0, {"accepted": 1, "duplicates": 0})
    code, report = await cli("get-usage", "--customer-id", CUSTOMER, "--event-name", "api.tokens")
    assert (code, report["count"], report["sums"]) == (0, 1, {"tokens": "12"})
