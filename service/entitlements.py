"""Read-side use cases: CheckAccess and GetSubscription over stored snapshots, the catalog and the clock."""

from __future__ import annotations

from decimal import Decimal

from service import access, credits
from service.catalog import Catalog
from service.clock import Clock
from service.domain import FeatureDecision, FeatureKind, SubscriptionState, SubscriptionView
from service.errors import InvalidArgument, NotFound
from storage.engine import Database
from storage.repositories.credits import CreditRepository
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
        now = self.clock()
        async with self.db.transaction() as session:
            subs = await SubscriptionRepository(session).for_customer(customer_id)
            accounts = await CreditRepository(session).accounts(customer_id) if kind is FeatureKind.CREDIT else {}
        if kind is not FeatureKind.CREDIT:
            return access.feature_access(subs, self.catalog, feature, now)
        account = accounts.get(feature)
        balance = credits.effective_balance(account, now) if account is not None else Decimal(0)
        headroom = credits.overage_limit(self.catalog.credits[feature], subs)
        return access.feature_access(subs, self.catalog, feature, now, balance=balance, overage_headroom=headroom)

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
            accounts = await CreditRepository(session).accounts(sub.customer_id)
        now = self.clock()
        balances = {
            key: credits.effective_balance(accounts[key], now) if key in accounts else Decimal(0)
            for key in credits.credits_of(sub, self.catalog)
        }
        return self.view(sub, balances)

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
