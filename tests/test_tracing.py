"""OpenTelemetry traces (DESIGN §14): with an exporter configured, a gRPC call, a webhook delivery and the Postgres
statements under them are spans; without one, nothing is instrumented at all."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from service.domain.catalog import Catalog
from service.server import Running, start
from storage.engine import Database
from tests.support import API_TOKEN, CUSTOMER_ID, BearerToken, FakeClock, WebhookPoster, load_event, make_settings


@pytest.fixture
async def traced(
    database_url: str, db: Database, clock: FakeClock, catalog: Catalog
) -> AsyncIterator[tuple[Running, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    running = await start(
        make_settings(database_url),
        clock=clock,
        catalog=catalog,
        db=Database.from_url(database_url),
        span_exporter=exporter,
    )
    yield running, exporter
    await running.stop(0)


async def test_grpc_calls_webhooks_and_their_statements_are_spans(
    traced: tuple[Running, InMemorySpanExporter],
) -> None:
    running, exporter = traced
    async with aiohttp.ClientSession() as session:
        poster = WebhookPoster(f"http://127.0.0.1:{running.http_port}/webhooks/dodo", session)
        status, _ = await poster.send(load_event("subscription_active"))
    assert status == 200
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{running.grpc_port}", interceptors=[BearerToken(API_TOKEN)]
    ) as channel:
        stub = pb_grpc.EntitlementServiceStub(channel)
        await stub.GetSubscription(pb.GetSubscriptionRequest(customer_id=CUSTOMER_ID))

    spans = exporter.get_finished_spans()
    servers = {span.name for span in spans if span.kind is SpanKind.SERVER}
    assert "/entitlements.v1.EntitlementService/GetSubscription" in servers
    assert any(name.startswith("POST") and "webhooks/dodo" in name for name in servers), servers
    grpc_span = next(s for s in spans if s.name == "/entitlements.v1.EntitlementService/GetSubscription")
    statements = [
        s for s in spans if s.kind is SpanKind.CLIENT and (s.attributes or {}).get("db.system") == "postgresql"
    ]
    assert any(s.parent is not None and s.parent.span_id == grpc_span.context.span_id for s in statements), (
        "the Postgres statements of the call are children of its span"
    )


async def test_tracing_is_off_unless_configured_and_undone_on_stop(
    traced: tuple[Running, InMemorySpanExporter], service: Running
) -> None:
    running, _ = traced
    assert getattr(asyncpg.Connection.execute, "__wrapped__", None) is not None, "instrumented while traced runs"
    await running.stop(0)
    assert getattr(asyncpg.Connection.execute, "__wrapped__", None) is None, "the driver is left as it was"
