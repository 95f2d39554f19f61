"""entitlements.v1.EntitlementService: request validation lives in the use cases, conversion in conversion.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import grpc
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from service.app.charges import Charges
from service.app.checkouts import Checkouts
from service.app.credit_service import CreditService
from service.app.customers import Customers
from service.app.entitlement_reader import EntitlementReader
from service.app.plan_changer import PlanChanger
from service.app.plan_listing import PlanListing
from service.app.portal_sessions import PortalSessions
from service.app.subscription_lifecycle import SubscriptionLifecycle
from service.app.usage import Usage
from service.app.watch_hub import WatchHub
from service.grpc import conversion as convert
from service.grpc.interceptors import current_caller
from service.grpc.watch_stream import WatchStream

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class UseCases:
    """Everything the servicer calls: one use case per concept (service/app)."""

    reader: EntitlementReader
    credits: CreditService
    plans: PlanChanger
    customers: Customers
    checkouts: Checkouts
    portal: PortalSessions
    lifecycle: SubscriptionLifecycle
    listing: PlanListing
    usage: Usage
    charges: Charges
    watch: WatchHub


class EntitlementServicer(pb_grpc.EntitlementServiceServicer):
    def __init__(self, use: UseCases) -> None:
        self.use = use
        self._watch = WatchStream(use.watch, use.reader)

    async def CheckAccess(self, request: pb.CheckAccessRequest, context: Context) -> pb.CheckAccessResponse:
        decision = await self.use.reader.check_access(request.customer_id, request.feature, request.customer_ref)
        return convert.check_access_response(decision, request.customer_id)

    async def GetSubscription(self, request: pb.GetSubscriptionRequest, context: Context) -> pb.GetSubscriptionResponse:
        view = await self.use.reader.get_subscription(
            subscription_id=request.subscription_id,
            customer_id=request.customer_id,
            customer_ref=request.customer_ref,
        )
        return pb.GetSubscriptionResponse(subscription=convert.subscription(view))

    async def ChangePlan(self, request: pb.ChangePlanRequest, context: Context) -> pb.ChangePlanResponse:
        # Idempotency keys are scoped per caller: the name the auth interceptor authenticated this call as.
        result = await self.use.plans.change(convert.plan_change(request, caller=current_caller()))
        return convert.plan_change_response(result)

    async def ConsumeCredits(self, request: pb.ConsumeCreditsRequest, context: Context) -> pb.ConsumeCreditsResponse:
        result = await self.use.credits.consume(convert.consume_request(request))
        return convert.consume_response(result)

    async def ListCreditLedger(
        self, request: pb.ListCreditLedgerRequest, context: Context
    ) -> pb.ListCreditLedgerResponse:
        page = await self.use.credits.ledger(
            request.customer_id, request.credit, request.page_size, request.page_token, request.customer_ref
        )
        return convert.ledger_page(page)

    async def CreateCheckout(self, request: pb.CreateCheckoutRequest, context: Context) -> pb.CreateCheckoutResponse:
        result = await self.use.checkouts.create(convert.checkout_request(request, caller=current_caller()))
        return convert.checkout_response(result)

    async def CreatePortalSession(
        self, request: pb.CreatePortalSessionRequest, context: Context
    ) -> pb.CreatePortalSessionResponse:
        session = await self.use.portal.open(
            customer_id=request.customer_id,
            customer_ref=request.customer_ref,
            return_url=request.return_url,
            send_email=request.send_email,
        )
        return convert.portal_response(session)

    async def CancelSubscription(
        self, request: pb.CancelSubscriptionRequest, context: Context
    ) -> pb.CancelSubscriptionResponse:
        done = await self.use.lifecycle.cancel(convert.cancellation(request, caller=current_caller()))
        return pb.CancelSubscriptionResponse(
            subscription=convert.subscription(done.subscription), replayed=done.replayed
        )

    async def ResumeSubscription(
        self, request: pb.ResumeSubscriptionRequest, context: Context
    ) -> pb.ResumeSubscriptionResponse:
        done = await self.use.lifecycle.resume(convert.resumption(request, caller=current_caller()))
        return pb.ResumeSubscriptionResponse(
            subscription=convert.subscription(done.subscription), replayed=done.replayed
        )

    async def ListPlans(self, request: pb.ListPlansRequest, context: Context) -> pb.ListPlansResponse:
        return convert.plans_response(await self.use.listing.plans())

    async def LinkCustomer(self, request: pb.LinkCustomerRequest, context: Context) -> pb.LinkCustomerResponse:
        await self.use.customers.link(request.customer_ref, request.customer_id)
        return pb.LinkCustomerResponse(customer_ref=request.customer_ref, customer_id=request.customer_id)

    async def RecordUsage(self, request: pb.RecordUsageRequest, context: Context) -> pb.RecordUsageResponse:
        result = await self.use.usage.record(convert.record_usage_request(request))
        return pb.RecordUsageResponse(accepted=result.accepted, duplicates=result.duplicates)

    async def GetUsage(self, request: pb.GetUsageRequest, context: Context) -> pb.GetUsageResponse:
        report = await self.use.usage.report(
            customer_id=request.customer_id,
            customer_ref=request.customer_ref,
            event_name=request.event_name,
            start=request.start.ToDatetime(UTC) if request.HasField("start") else None,
            end=request.end.ToDatetime(UTC) if request.HasField("end") else None,
        )
        return convert.usage_response(report)

    async def CreateCharge(self, request: pb.CreateChargeRequest, context: Context) -> pb.CreateChargeResponse:
        result = await self.use.charges.create(convert.charge_request(request, caller=current_caller()))
        return convert.charge_response(result)

    async def GetCharge(self, request: pb.GetChargeRequest, context: Context) -> pb.GetChargeResponse:
        found = await self.use.charges.get(
            caller=current_caller(), charge_id=request.charge_id, idempotency_key=request.idempotency_key
        )
        return pb.GetChargeResponse(charge=convert.charge(found))

    async def WatchEntitlements(
        self, request: pb.WatchEntitlementsRequest, context: Context
    ) -> AsyncIterator[pb.EntitlementEvent]:
        async for event in self._watch.serve(request, context):
            yield event
