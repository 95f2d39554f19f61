"""`GET /metrics` (DESIGN §14): the Prometheus families an operator needs, each named for its subject, with the
figures of what actually happened; and a webhook for a product the catalog lacks is loud (log and metric)."""

from __future__ import annotations

import logging
import re

import aiohttp
import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from service.server import Running
from storage.engine import Budget
from tests.fakedodo import FakeDodo
from tests.support import CUSTOMER_ID, TEAM, WebhookPoster, deliver, load_event, subscription_event, utc

FAMILIES = {
    "entitlements_rpc_requests": "counter",
    "entitlements_rpc_duration_seconds": "histogram",
    "entitlements_webhook_deliveries": "counter",
    "entitlements_webhook_unknown_products": "counter",
    "entitlements_cache_hits": "counter",
    "entitlements_cache_misses": "counter",
    "entitlements_cache_entries": "gauge",
    "entitlements_credit_batch_size": "histogram",
    "entitlements_dodo_requests": "counter",
    "entitlements_dodo_request_duration_seconds": "histogram",
    "entitlements_outbox_backlog": "gauge",
    "entitlements_pool_connections_in_use": "gauge",
    "entitlements_pool_connections_budget": "gauge",
}


async def scrape(service: Running) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{service.http_port}/metrics") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    families = {family.name: family.type for family in text_string_to_metric_families(text)}
    for name, kind in FAMILIES.items():
        assert families.get(name) == kind, f"{name} missing or not a {kind}"
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_what_happened_by_method_code_type_and_outcome(
    service: Running, stub: pb_grpc.EntitlementServiceAsyncStub, webhooks: WebhookPoster, fake_dodo: FakeDodo
) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    status, _ = await webhooks.send({"type": "subscription.active"})  # signed, but no data
    assert status == 400
    for _ in range(3):
        await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="dashboard"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.CheckAccess(pb.CheckAccessRequest(customer_id="", feature="dashboard"))
    await stub.ConsumeCredits(
        pb.ConsumeCreditsRequest(customer_id=CUSTOMER_ID, credit="ai_tokens", amount="1", idempotency_key="m1")
    )
    sub = fake_dodo.add_subscription()
    await stub.ChangePlan(
        pb.ChangePlanRequest(subscription_id=sub["subscription_id"], product_id=TEAM, idempotency_key="m2")
    )

    samples = await scrape(service)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("entitlements_rpc_requests_total", method="CheckAccess", code="OK") == 3
    assert value("entitlements_rpc_requests_total", method="CheckAccess", code="INVALID_ARGUMENT") == 1
    assert value("entitlements_rpc_duration_seconds_count", method="CheckAccess", code="OK") == 3
    assert value("entitlements_rpc_requests_total", method="ConsumeCredits", code="OK") == 1
    assert value("entitlements_webhook_deliveries_total", type="subscription.active", outcome="applied") == 1
    assert value("entitlements_webhook_deliveries_total", type="", outcome="malformed") == 1
    assert value("entitlements_cache_hits_total") >= 2
    assert value("entitlements_cache_misses_total") >= 1
    assert value("entitlements_cache_entries", kind="customer") == 1
    assert value("entitlements_credit_batch_size_count") == 1
    assert value("entitlements_dodo_requests_total", endpoint="get_subscription", status="ok") >= 2
    assert value("entitlements_dodo_requests_total", endpoint="change_plan", status="ok") == 1
    assert value("entitlements_pool_connections_budget", budget="read") == service.db.budgets[Budget.READ]
    assert ("entitlements_pool_connections_in_use", (("budget", "probe"),)) in samples


async def test_a_webhook_for_a_product_missing_from_the_catalog_is_loud(
    service: Running, webhooks: WebhookPoster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="entitlements.webhooks")
    event = subscription_event(
        "subscription.active", timestamp=utc("2026-09-01T10:15:40Z"), product_id="pdt_not_in_catalog"
    )
    status, body = await webhooks.send(event)
    assert (status, body) == (200, {"status": "applied"})  # Dodo's truth is stored all the same

    loud = [r for r in caplog.records if r.getMessage() == "webhook.unknown_product"]
    assert loud
    assert loud[0].__dict__["product_id"] == "pdt_not_in_catalog"
    samples = await scrape(service)
    key = ("entitlements_webhook_unknown_products_total", (("product_id", "pdt_not_in_catalog"),))
    assert samples[key] == 1


async def test_metrics_need_no_token_and_list_no_customer_ids(service: Running, webhooks: WebhookPoster) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{service.http_port}/metrics") as response,
    ):
        text = await response.text()
    assert response.status == 200
    assert not re.search(r"cus_[A-Za-z0-9]+", text)
