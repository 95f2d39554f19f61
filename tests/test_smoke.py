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
