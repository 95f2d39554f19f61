"""Read-side use cases: CheckAccess and GetSubscription over stored snapshots, the catalog and the clock."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from decimal import Decimal

from service.app.customers import Customers, named_customer
from service.app.entitlement_cache import EntitlementCache
from service.domain import access_rules as access
from service.domain import credit_rules as credits
from service.domain import limits
from service.domain.catalog import Catalog
from service.domain.clock import Clock
from service.domain.errors import (
    CustomerHasNoSubscription,
    CustomerRefNotLinked,
    MissingField,
    SubscriptionNotFound,
    UnknownFeature,
)
from service.domain.values import (
    AccessReason,
    Account,
    CustomerEntitlements,
    FeatureDecision,
    FeatureKind,
    SubscriptionState,
    SubscriptionView,
)
from storage.engine import Database
from storage.repositories.credits import CreditRepository
from storage.repositories.customer_refs import CustomerRefRepository
from storage.repositories.subscriptions import SubscriptionRepository


class EntitlementReader:
    def __init__(
        self, db: Database, catalog: Catalog, clock: Clock, cache: EntitlementCache, customers: Customers
    ) -> None:
        self.db = db
        self.catalog = catalog
        self.clock = clock
        self.cache = cache
        self.customers = customers

    async def check_access(self, customer_id: str, feature: str, customer_ref: str = "") -> FeatureDecision:
        named_customer(customer_id, customer_ref)
        limits.check_id("feature", feature)
        kind = self.catalog.kind_of(feature)
        if kind is None:
            raise UnknownFeature(feature)
        # By customer_id (the usual call) nothing is left to resolve: no coroutine for it.
        resolved = await self.customers.resolve(customer_id, customer_ref) if customer_ref else customer_id
        if resolved is None:  # a ref nobody has linked yet: a customer without a subscription
            return FeatureDecision(False, AccessReason.NO_SUBSCRIPTION, kind)
        balances = kind is FeatureKind.CREDIT
        found = self.cache.fresh(resolved, balances=balances) or await self.cache.lookup(resolved, balances=balances)
        decision = self.decide(found.customer, feature, kind)
        if customer_ref:
            decision = replace(decision, customer_id=resolved)
        if not found.stale:
            return decision
        if not self.catalog.serves_stale(feature):
            return FeatureDecision(False, AccessReason.STORAGE_UNAVAILABLE, kind, stale=True)
        return replace(decision, stale=True)

    def decide(self, customer: CustomerEntitlements, feature: str, kind: FeatureKind) -> FeatureDecision:
        now = self.clock()
        subs = customer.subscriptions
        if kind is not FeatureKind.CREDIT:
            return access.feature_access(subs, self.catalog, feature, now)
        account = customer.accounts.get(feature)
        balance = credits.effective_balance(account, now) if account is not None else Decimal(0)
        headroom = credits.overage_limit(self.catalog.credits[feature], subs, self.catalog, now)
        return access.feature_access(subs, self.catalog, feature, now, balance=balance, overage_headroom=headroom)

    async def get_subscription(
        self, *, subscription_id: str = "", customer_id: str = "", customer_ref: str = ""
    ) -> SubscriptionView:
        limits.check_id("subscription_id", subscription_id, required=False)
        limits.check_id("customer_id", customer_id, required=False)
        limits.check_id("customer_ref", customer_ref, required=False)
        if customer_ref:
            customer_id = await self.customers.resolve("", customer_ref) or ""
            if not customer_id:
                raise CustomerRefNotLinked(customer_ref)
        if subscription_id:
            async with self.db.connection() as connection:
                found = await SubscriptionRepository(connection).get(subscription_id)
                if found is None:
                    raise SubscriptionNotFound(subscription_id)
                accounts = await CreditRepository(connection).accounts(found.customer_id)
                refs = await CustomerRefRepository(connection).refs_of(found.customer_id)
            return self.view(found, accounts, customer_ref=refs[0] if refs else "")
        if customer_id:
            # Not from the cache: it keeps only what decisions read, and this answer shows everything.
            async with self.db.connection() as connection:
                subs = await SubscriptionRepository(connection).for_customer(customer_id)
                relevant = access.most_relevant(subs, self.catalog, self.clock())
                if relevant is None:
                    raise CustomerHasNoSubscription(customer_id)
                accounts = await CreditRepository(connection).accounts(customer_id)
                refs = await CustomerRefRepository(connection).refs_of(customer_id)
            return self.view(relevant, accounts, customer_ref=customer_ref or (refs[0] if refs else ""))
        raise MissingField("subscription_id, customer_id or customer_ref")

    def view(
        self,
        sub: SubscriptionState,
        accounts: Mapping[str, Account] | None = None,
        *,
        customer_ref: str = "",
        at: datetime | None = None,
    ) -> SubscriptionView:
        """GetSubscription's view; `at` decides as of another instant (a watch event's), without balances."""
        plan = self.catalog.plan(sub.product_id)
        now = self.clock() if at is None else at
        accounts = accounts or {}
        balances = (
            {
                key: credits.effective_balance(accounts[key], now) if key in accounts else Decimal(0)
                for key in credits.credits_of(sub, self.catalog)
            }
            if at is None
            else {}
        )
        return SubscriptionView(
            state=sub,
            access=access.decide(sub, self.catalog, now),
            plan_name=plan.name if plan is not None else "",
            features=tuple(sorted(plan.features)) if plan is not None else (),
            limits=dict(plan.limits) if plan is not None else {},
            credits=balances,
            trial_ends_at=access.trial_ends_at(sub),
            customer_ref=customer_ref,
        )
