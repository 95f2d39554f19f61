"""ChangePlan through the Dodo API, on the protocol every subscription mutation shares
(service/app/subscription_mutations.py): never sent twice for one request (keys scoped per caller), one mutation
of a subscription at a time (PLAN_CHANGE_IN_PROGRESS), and entitlements move the moment Dodo accepts. A preview
prices the change and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.app.dodo_gateway import DodoGateway
from service.app.subscription_mutations import SubscriptionMutations
from service.domain import limits
from service.domain.catalog import Catalog
from service.domain.errors import InvalidField, ProductNotInCatalog
from service.domain.plan_change_rules import (
    PlanChange,
    PlanChangeResult,
    check_changeable,
    fingerprint,
    target_quantity,
    took_effect,
)
from service.domain.values import SubscriptionState


@dataclass(frozen=True, slots=True)
class _PlanChangeMutation:
    change: PlanChange
    event = "plan_change"

    @property
    def caller(self) -> str:
        return self.change.caller

    @property
    def idempotency_key(self) -> str:
        return self.change.idempotency_key

    @property
    def subscription_id(self) -> str:
        return self.change.subscription_id

    def fingerprint(self) -> str:
        return fingerprint(self.change)

    def took_effect(self, current: SubscriptionState) -> bool:
        return took_effect(current, self.change)

    def check(self, current: SubscriptionState) -> None:
        check_changeable(current, self.change)

    async def send(self, dodo: DodoGateway, current: SubscriptionState) -> None:
        await dodo.change_plan(
            self.change.subscription_id,
            product_id=self.change.product_id,
            quantity=target_quantity(self.change, current),
            proration_billing_mode=self.change.proration,
            effective_at=self.change.effective_at,
            # Omitting add-ons would remove them: pass the current ones through.
            addons=current.addons,
        )


class PlanChanger:
    def __init__(self, catalog: Catalog, mutations: SubscriptionMutations) -> None:
        self.catalog = catalog
        self.mutations = mutations

    def _validate(self, change: PlanChange) -> None:
        limits.check_id("subscription_id", change.subscription_id)
        limits.check_id("product_id", change.product_id)
        if self.catalog.plan(change.product_id) is None:
            raise ProductNotInCatalog(change.product_id)
        if change.quantity < 0:
            raise InvalidField("quantity", "quantity must not be negative (0 keeps the current quantity)")
        limits.check_id("idempotency_key", change.idempotency_key, required=not change.preview)

    async def change(self, change: PlanChange) -> PlanChangeResult:
        self._validate(change)
        if change.preview:
            return await self._preview(change)
        done = await self.mutations.run(_PlanChangeMutation(change))
        return PlanChangeResult(done.subscription, replayed=done.replayed)

    async def _preview(self, change: PlanChange) -> PlanChangeResult:
        current, _ = await self.mutations.read(change.subscription_id)
        check_changeable(current.state, change)
        preview = await self.mutations.dodo.preview_change_plan(
            change.subscription_id,
            product_id=change.product_id,
            quantity=target_quantity(change, current.state),
            proration_billing_mode=change.proration,
            effective_at=change.effective_at,
            addons=current.state.addons,
        )
        # The would-be subscription, shown but never stored.
        view = self.mutations.reader.view(preview.new_plan.state)
        return PlanChangeResult(view, immediate_charge=preview.immediate_charge, currency=preview.currency)
