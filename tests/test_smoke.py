from __future__ import annotations

from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from tests.support import CUSTOMER_ID, WebhookPoster, load_event


async def test_active_subscription_grants_its_plan_features(
    webhooks: WebhookPoster, stub: pb_grpc.EntitlementServiceAsyncStub
) -> None:
    status, body = await webhooks.send(load_event("subscription_active"))
    assert (status, body) == (200, {"status": "applied"})
    response = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="dashboard"))
    assert response.allowed
    assert response.reason == pb.ACCESS_REASON_ACTIVE


async def test_plan_grant_can_be_consumed_and_replayed(
    webhooks: WebhookPoster, stub: pb_grpc.EntitlementServiceAsyncStub
) -> None:
    await webhooks.send(load_event("subscription_active"))
    check = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="ai_tokens"))
    assert (check.allowed, check.balance) == (True, "10000")
    request = pb.ConsumeCreditsRequest(customer_id=CUSTOMER_ID, credit="ai_tokens", amount="0.25", idempotency_key="k1")
    first = await stub.ConsumeCredits(request)
    again = await stub.ConsumeCredits(request)
    assert (first.balance_after, first.replayed) == ("9999.75", False)
    assert (again.entry_id, again.replayed) == (first.entry_id, True)
    ledger = await stub.ListCreditLedger(pb.ListCreditLedgerRequest(customer_id=CUSTOMER_ID, credit="ai_tokens"))
    assert [e.kind for e in ledger.entries] == ["consumption", "plan_grant"]
