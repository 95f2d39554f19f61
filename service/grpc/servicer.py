"""entitlements.v1.EntitlementService: request validation lives in the use cases, conversion in conversion.py."""

from __future__ import annotations

from typing import Any

import grpc
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from service.app.credit_service import CreditService
from service.app.entitlement_reader import EntitlementReader
from service.app.plan_changer import PlanChanger
from service.grpc import conversion as convert
from service.grpc.interceptors import current_caller

Context = grpc.aio.ServicerContext[Any, Any]


class EntitlementServicer(pb_grpc.EntitlementServiceServicer):
    def __init__(self, reader: EntitlementReader, credits: CreditService, plans: PlanChanger) -> None:
        self.reader = reader
        self.credits = credits
        self.plans = plans

    async def CheckAccess(self, request: pb.CheckAccessRequest, context: Context) -> pb.CheckAccessResponse:
        decision = await self.reader.check_access(request.customer_id, request.feature)
        return convert.check_access_response(decision)

    async def GetSubscription(self, request: pb.GetSubscriptionRequest, context: Context) -> pb.GetSubscriptionResponse:
        view = await self.reader.get_subscription(
            subscription_id=request.subscription_id, customer_id=request.customer_id
        )
        return pb.GetSubscriptionResponse(subscription=convert.subscription(view))

    async def ChangePlan(self, request: pb.ChangePlanRequest, context: Context) -> pb.ChangePlanResponse:
        # Idempotency keys are scoped per caller: the name the auth interceptor authenticated this call as.
        result = await self.plans.change(convert.plan_change(request, caller=current_caller()))
        return convert.plan_change_response(result)

    async def ConsumeCredits(self, request: pb.ConsumeCreditsRequest, context: Context) -> pb.ConsumeCreditsResponse:
        result = await self.credits.consume(convert.consume_request(request))
        return convert.consume_response(result)

    async def ListCreditLedger(
        self, request: pb.ListCreditLedgerRequest, context: Context
    ) -> pb.ListCreditLedgerResponse:
        page = await self.credits.ledger(request.customer_id, request.credit, request.page_size, request.page_token)
        return convert.ledger_page(page)
