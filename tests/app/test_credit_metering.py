"""A credit that names `dodo_meter_event` records each consumption as a usage event too (issue 12): in the
consumption's own transaction, the ledger entry id as event id, so Dodo's meter sees each exactly once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from service.domain.catalog import EXAMPLE_CATALOG, Catalog, parse_catalog
from service.server import Running, start
from storage.engine import Database
from tests.support import (
    API_TOKEN,
    CUSTOMER_ID,
    BearerToken,
    FakeClock,
    WebhookPoster,
    deliver,
    load_event,
    make_settings,
)

METER = "ai.tokens.used"


def metered_catalog() -> Catalog:
    import tomllib

    raw = tomllib.loads(EXAMPLE_CATALOG.read_text())
    raw["credits"]["ai_tokens"]["dodo_meter_event"] = METER
    return parse_catalog(raw, source="metered")


@pytest.fixture
async def metered(database_url: str, db: Database, clock: FakeClock) -> AsyncIterator[Running]:
    running = await start(make_settings(database_url), clock=clock, catalog=metered_catalog(), db=db)
    yield running
    await running.stop(0)


async def test_each_consumption_of_a_metered_credit_is_also_a_usage_event(
    metered: Running, webhooks: WebhookPoster, db: Database
) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{metered.grpc_port}", interceptors=[BearerToken(API_TOKEN)]
    ) as channel:
        stub = pb_grpc.EntitlementServiceStub(channel)

        def consume(amount: str, key: str) -> pb.ConsumeCreditsRequest:
            return pb.ConsumeCreditsRequest(
                customer_id=CUSTOMER_ID, credit="ai_tokens", amount=amount, idempotency_key=key
            )

        first = await stub.ConsumeCredits(consume("25", "m1"))
        half = await stub.ConsumeCredits(consume("0.5", "m2"))
        replay = await stub.ConsumeCredits(consume("25", "m1"))
        assert replay.replayed
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ConsumeCredits(consume("99999", "too-much"))
    async with db.connection() as connection:
        rows = await connection.fetch(
            "SELECT customer_id, event_id, event_name, properties FROM usage_events ORDER BY id"
        )
    assert [(r["customer_id"], r["event_id"], r["event_name"]) for r in rows] == [
        (CUSTOMER_ID, first.entry_id, METER),
        (CUSTOMER_ID, half.entry_id, METER),
    ], "one event per consumption; a replay or a refusal records none"
    assert [r["properties"]["amount"] for r in rows] == [25, 0.5]


def test_a_meter_event_name_must_be_text() -> None:
    import tomllib

    from service.domain.catalog import CatalogError

    raw = tomllib.loads(EXAMPLE_CATALOG.read_text())
    raw["credits"]["ai_tokens"]["dodo_meter_event"] = ""
    with pytest.raises(CatalogError, match="dodo_meter_event"):
        parse_catalog(raw)
