"""Read-side use cases: CheckAccess and GetSubscription over stored snapshots, the catalog and the clock."""

from __future__ import annotations

from decimal import Decimal

from service import access
from service.catalog import Catalog
from service.clock import Clock
from service.domain import FeatureDecision, FeatureKind, SubscriptionState, SubscriptionView
from service.errors import InvalidArgument, NotFound
from storage.engine import Database
from storage.repositories.subscriptions import SubscriptionRepository


class EntitlementReader:
    def __init__(self, db: Database, catalog: Catalog, clock: Clock) -> None:
        self.db = db
        self.catalog = catalog
        self.clock = clock

    async def check_access(self, customer_id: str, feature: str) -> FeatureDecision:
        if not customer_id:
            raise InvalidArgument("customer_id is required")
        if not feature:
            raise InvalidArgument("feature is required")
        kind = self.catalog.kind_of(feature)
        if kind is None:
            raise InvalidArgument(f"unknown feature {feature!r}: not a feature, limit or credit of the catalog")
        async with self.db.transaction() as session:
            subs = await SubscriptionRepository(session).for_customer(customer_id)
        balance = Decimal(0) if kind is FeatureKind.CREDIT else None
        return access.feature_access(subs, self.catalog, feature, self.clock(), balance=balance)

    async def get_subscription(self, *, subscription_id: str = "", customer_id: str = "") -> SubscriptionView:
        async with self.db.transaction() as session:
            repository = SubscriptionRepository(session)
            if subscription_id:
                sub = await repository.get(subscription_id)
                if sub is None:
                    raise NotFound(f"subscription {subscription_id!r} not found")
            elif customer_id:
                sub = access.most_relevant(await repository.for_customer(customer_id), self.catalog, self.clock())
                if sub is None:
                    raise NotFound(f"customer {customer_id!r} has no subscription")
            else:
                raise InvalidArgument("subscription_id or customer_id is required")
        return self.view(sub)

    def view(self, sub: SubscriptionState, credits: dict[str, Decimal] | None = None) -> SubscriptionView:
        plan = self.catalog.plan(sub.product_id)
        return SubscriptionView(
            state=sub,
            access=access.decide(sub, self.catalog, self.clock()),
            plan_name=plan.name if plan is not None else "",
            features=tuple(sorted(plan.features)) if plan is not None else (),
            limits=dict(plan.limits) if plan is not None else {},
            credits=credits or {},
            trial_ends_at=access.trial_ends_at(sub),
        )
