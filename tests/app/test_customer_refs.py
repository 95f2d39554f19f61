"""Customers by the company's own id (DESIGN §13): `customer_ref` on every customer-addressed request, linked by
webhook metadata and LinkCustomer (and CreateCheckout, tested with it), served from the cache on the hot path."""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any, TypeAlias

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from service.server import Running
from tests.support import CUSTOMER_ID, WebhookPoster, deliver, error_info, load_event

Stub: TypeAlias = "pb_grpc.EntitlementServiceAsyncStub"
REF = "org_42"


def with_ref(event: dict[str, Any], ref: str, *, on_customer: bool = False) -> dict[str, Any]:
    moved = copy.deepcopy(event)
    data = moved["data"]
    if on_customer:
        data["customer"]["metadata"] = {"customer_ref": ref}
    else:
        data["metadata"] = {**(data.get("metadata") or {}), "customer_ref": ref}
    return moved


async def check(stub: Stub, *, customer_ref: str = REF, feature: str = "dashboard") -> pb.CheckAccessResponse:
    return await stub.CheckAccess(pb.CheckAccessRequest(customer_ref=customer_ref, feature=feature))


async def test_an_unlinked_ref_checks_as_no_subscription(stub: Stub) -> None:
    answer = await check(stub, customer_ref="org_nobody")
    assert (answer.allowed, answer.reason) == (False, pb.ACCESS_REASON_NO_SUBSCRIPTION)


@pytest.mark.parametrize("on_customer", [False, True], ids=["subscription-metadata", "customer-metadata"])
async def test_a_subscription_webhook_carrying_the_ref_links_it(
    webhooks: WebhookPoster, stub: Stub, on_customer: bool
) -> None:
    await deliver(webhooks, with_ref(load_event("subscription_active"), REF, on_customer=on_customer))
    answer = await check(stub)
    assert (answer.allowed, answer.reason, answer.subscription_id) == (
        True,
        pb.ACCESS_REASON_ACTIVE,
        load_event("subscription_active")["data"]["subscription_id"],
    )
    by_ref = await stub.GetSubscription(pb.GetSubscriptionRequest(customer_ref=REF))
    assert (by_ref.subscription.customer_id, by_ref.subscription.customer_ref) == (CUSTOMER_ID, REF)


async def test_a_payment_webhook_carrying_the_ref_links_it(webhooks: WebhookPoster, stub: Stub) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    status, body = await webhooks.send(with_ref(load_event("payment_succeeded"), REF))
    assert (status, body) == (200, {"status": "recorded"})
    assert (await check(stub)).allowed


async def test_link_customer_links_and_only_it_moves_a_ref_linked_elsewhere(
    webhooks: WebhookPoster, stub: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    linked = await stub.LinkCustomer(pb.LinkCustomerRequest(customer_ref=REF, customer_id="cus_other"))
    assert (linked.customer_ref, linked.customer_id) == (REF, "cus_other")
    assert (await check(stub)).reason == pb.ACCESS_REASON_NO_SUBSCRIPTION  # cus_other has nothing

    caplog.set_level(logging.INFO, logger="entitlements.customers")
    await deliver(webhooks, with_ref(load_event("subscription_renewed"), REF))  # a webhook does not move it
    assert (await check(stub)).reason == pb.ACCESS_REASON_NO_SUBSCRIPTION
    assert any(r.getMessage() == "customer_ref.conflict" for r in caplog.records)

    await stub.LinkCustomer(pb.LinkCustomerRequest(customer_ref=REF, customer_id=CUSTOMER_ID))
    assert (await check(stub)).allowed, "LinkCustomer moves it, and the cached resolution is forgotten at once"
    assert any(r.getMessage() == "customer_ref.moved" for r in caplog.records)


async def test_a_cached_check_by_ref_costs_no_round_trip(webhooks: WebhookPoster, stub: Stub, service: Running) -> None:
    await deliver(webhooks, with_ref(load_event("subscription_active"), REF))
    for _ in range(100):
        if service.cache.listening:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert (await check(stub)).allowed
    misses = service.cache.misses
    for _ in range(5):
        assert (await check(stub)).allowed
    assert service.cache.misses == misses


async def test_credits_by_ref_consume_and_page_the_linked_customers_account(
    webhooks: WebhookPoster, stub: Stub
) -> None:
    await deliver(webhooks, with_ref(load_event("subscription_active"), REF))
    request = pb.ConsumeCreditsRequest(customer_ref=REF, credit="ai_tokens", amount="25", idempotency_key="r1")
    spent = await stub.ConsumeCredits(request)
    by_id = await stub.ConsumeCredits(
        pb.ConsumeCreditsRequest(customer_id=CUSTOMER_ID, credit="ai_tokens", amount="25", idempotency_key="r1")
    )
    assert (by_id.entry_id, by_id.replayed) == (spent.entry_id, True), "one customer, one idempotency space"
    ledger = await stub.ListCreditLedger(pb.ListCreditLedgerRequest(customer_ref=REF, credit="ai_tokens"))
    assert ledger.entries[0].entry_id == spent.entry_id
    empty = await stub.ListCreditLedger(pb.ListCreditLedgerRequest(customer_ref="org_nobody", credit="ai_tokens"))
    assert list(empty.entries) == []


async def test_consuming_for_an_unlinked_ref_is_denied_as_no_subscription(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stub.ConsumeCredits(
            pb.ConsumeCreditsRequest(customer_ref="org_nobody", credit="ai_tokens", amount="1", idempotency_key="k")
        )
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert error_info(denied.value).reason == "ACCESS_REASON_NO_SUBSCRIPTION"


async def test_get_subscription_for_an_unlinked_ref_is_not_found(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetSubscription(pb.GetSubscriptionRequest(customer_ref="org_nobody"))
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    assert error_info(missing.value).reason == "CUSTOMER_REF_NOT_LINKED"


@pytest.mark.parametrize(
    "request_",
    [
        pb.CheckAccessRequest(customer_id=CUSTOMER_ID, customer_ref=REF, feature="dashboard"),
        pb.CheckAccessRequest(customer_ref="org\x00", feature="dashboard"),
        pb.CheckAccessRequest(customer_ref="o" * 256, feature="dashboard"),
    ],
    ids=["both", "nul", "too-long"],
)
async def test_a_bad_or_doubled_customer_name_is_invalid_argument(stub: Stub, request_: pb.CheckAccessRequest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CheckAccess(request_)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused.value).metadata["field"] in ("customer_ref", "customer_id")


@pytest.mark.parametrize(
    "request_",
    [
        pb.LinkCustomerRequest(customer_ref="", customer_id=CUSTOMER_ID),
        pb.LinkCustomerRequest(customer_ref=REF, customer_id=""),
        pb.LinkCustomerRequest(customer_ref="r\x01", customer_id=CUSTOMER_ID),
        pb.LinkCustomerRequest(customer_ref=REF, customer_id="c" * 300),
    ],
)
async def test_link_customer_refuses_bad_ids(stub: Stub, request_: pb.LinkCustomerRequest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.LinkCustomer(request_)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
