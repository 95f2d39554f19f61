"""A thin typed Python client for entitlements.v1: plain values in, generated messages out.

async with EntitlementsClient("127.0.0.1:50051", token="…") as client:
    decision = await client.check_access("cus_123", "dashboard")
    if decision.allowed: ...
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

import grpc
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

__all__ = ["EntitlementsClient", "pb"]


class EntitlementsClient:
    def __init__(self, target: str, *, token: str | None = None, timeout: float = 5.0) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub: pb_grpc.EntitlementServiceAsyncStub = pb_grpc.EntitlementServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout

    async def __aenter__(self) -> EntitlementsClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def check_access(self, customer_id: str, feature: str) -> pb.CheckAccessResponse:
        request = pb.CheckAccessRequest(customer_id=customer_id, feature=feature)
        return await self._stub.CheckAccess(request, metadata=self._metadata, timeout=self._timeout)

    async def get_subscription(self, *, subscription_id: str = "", customer_id: str = "") -> pb.Subscription:
        if subscription_id:
            request = pb.GetSubscriptionRequest(subscription_id=subscription_id)
        else:
            request = pb.GetSubscriptionRequest(customer_id=customer_id)
        response = await self._stub.GetSubscription(request, metadata=self._metadata, timeout=self._timeout)
        return response.subscription

    async def consume_credits(
        self,
        customer_id: str,
        credit: str,
        amount: str,
        idempotency_key: str,
        *,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> pb.ConsumeCreditsResponse:
        request = pb.ConsumeCreditsRequest(
            customer_id=customer_id,
            credit=credit,
            amount=amount,
            idempotency_key=idempotency_key,
            description=description,
            metadata=dict(metadata or {}),
        )
        return await self._stub.ConsumeCredits(request, metadata=self._metadata, timeout=self._timeout)

    async def change_plan(self, request: pb.ChangePlanRequest) -> pb.ChangePlanResponse:
        return await self._stub.ChangePlan(request, metadata=self._metadata, timeout=self._timeout)
