"""Credit rules (DESIGN §6) as pure functions: amounts, grants, burn order, expiry, overage.

An account is the balance of one credit for one customer plus the grants that make it up. The balance is the sum
of the ledger; grants only decide which credits go first (the soonest-expiring) and which expire when. While the
balance is positive the grants' remaining amounts add up to it; in overage (balance below zero) they are all spent.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal

from service.domain import access_rules as access
from service.domain import fingerprints
from service.domain.catalog import Catalog, CreditDef
from service.domain.decimals import MATH, ZERO, decimal_text
from service.domain.values import Account, Grant, LedgerEntry, SubscriptionFacts, SubscriptionState


def new_entry_id() -> str:
    return f"cle_{uuid.uuid4().hex}"


class Insufficient(Exception):
    def __init__(self, available: Decimal) -> None:
        super().__init__(str(available))
        self.available = available


def effective_balance(account: Account, now: datetime) -> Decimal:
    """The balance as of `now`: grants past their expiry no longer count, even before expiry is written down."""
    balance = account.balance
    for grant in account.grants:
        if _expired(grant, now):
            balance = MATH.subtract(balance, grant.remaining)
    return balance


def has_expired_grants(account: Account, now: datetime) -> bool:
    return any(_expired(grant, now) and grant.remaining > 0 for grant in account.grants)


def _expired(grant: Grant, now: datetime) -> bool:
    return grant.expires_at is not None and grant.expires_at <= now


def _burn_order(grant: Grant) -> tuple[bool, datetime | None]:
    # Soonest expiry first; grants that never expire last. sorted() is stable, so older grants go first on ties.
    return (grant.expires_at is None, grant.expires_at)


def burn(grants: Sequence[Grant], amount: Decimal) -> tuple[Grant, ...]:
    """Take `amount` from the grants, soonest-expiring first; what the grants cannot cover is overage."""
    left = amount
    kept: list[Grant] = []
    for grant in sorted(grants, key=_burn_order):
        take = min(grant.remaining, left)
        left = MATH.subtract(left, take)
        remaining = MATH.subtract(grant.remaining, take)
        if remaining > 0:
            kept.append(replace(grant, remaining=remaining))
    return tuple(kept)


def expire(account: Account, now: datetime) -> tuple[Account, list[LedgerEntry]]:
    """Write down grants whose expiry has passed: one negative entry per expired grant with credits left."""
    entries: list[LedgerEntry] = []
    balance = account.balance
    live: list[Grant] = []
    for grant in account.grants:
        if not _expired(grant, now):
            live.append(grant)
            continue
        balance = MATH.subtract(balance, grant.remaining)
        entries.append(
            LedgerEntry(
                entry_id=new_entry_id(),
                customer_id=account.customer_id,
                credit=account.credit,
                amount=MATH.minus(grant.remaining),
                balance_after=balance,
                kind="grant_expiry",
                source=grant.source,
            )
        )
    return replace(account, balance=balance, grants=tuple(live)), entries


def credit(
    account: Account, amount: Decimal, *, grant_id: str, expires_at: datetime | None, source: str, kind: str
) -> tuple[Account, LedgerEntry]:
    """Add credits. A balance in overage is paid back first; only what is left becomes a burnable grant."""
    balance = MATH.add(account.balance, amount)
    grants = account.grants
    granted = min(amount, max(balance, ZERO))
    if granted > 0:
        grants = (*grants, Grant(grant_id, granted, expires_at, source))
    entry = LedgerEntry(new_entry_id(), account.customer_id, account.credit, amount, balance, kind, source)
    return replace(account, balance=balance, grants=grants), entry


def debit(account: Account, amount: Decimal, *, source: str, kind: str) -> tuple[Account, LedgerEntry]:
    """Remove credits unconditionally (a Dodo ledger deduction); the balance may go below zero."""
    balance = MATH.subtract(account.balance, amount)
    entry = LedgerEntry(new_entry_id(), account.customer_id, account.credit, MATH.minus(amount), balance, kind, source)
    return replace(account, balance=balance, grants=burn(account.grants, amount)), entry


def consume(account: Account, amount: Decimal, overage_limit: Decimal) -> tuple[Account, Decimal]:
    """Spend `amount` if the balance plus overage headroom covers it; else Insufficient (nothing changes)."""
    balance = MATH.subtract(account.balance, amount)
    if balance < MATH.minus(overage_limit):
        raise Insufficient(account.balance)
    return replace(account, balance=balance, grants=burn(account.grants, amount)), balance


def fingerprint(credit_key: str, amount: Decimal, description: str, metadata: Mapping[str, str]) -> str:
    """What "the same parameters" means for a ConsumeCredits idempotency key."""
    return fingerprints.fingerprint(
        {"credit": credit_key, "amount": decimal_text(amount), "description": description, "metadata": dict(metadata)}
    )


def overage_limit(definition: CreditDef, subs: Iterable[SubscriptionFacts], catalog: Catalog, now: datetime) -> Decimal:
    """The catalog's limit, raised by Dodo's cart settings for a Dodo-linked credit, as carried by subscriptions
    that grant access right now (a cancelled subscription's cart raises nothing)."""
    limit = definition.overage_limit
    linked = definition.dodo_credit_entitlement_id
    if linked is None:
        return limit
    for sub in subs:
        if not access.decide(sub, catalog, now).allowed:
            continue
        for item in sub.credit_cart:
            if item.credit_entitlement_id == linked and item.overage_enabled and item.overage_limit is not None:
                limit = max(limit, item.overage_limit)
    return limit


@dataclass(frozen=True, slots=True)
class PlanGrant:
    credit: str
    amount: Decimal
    period_start: datetime
    expires_at: datetime | None


def plan_grants(sub: SubscriptionState, catalog: Catalog, *, trialing: bool) -> list[PlanGrant]:
    """What the plan grants for the subscription's current billing period (trial credits while trialing)."""
    plan = catalog.plan(sub.product_id)
    if plan is None:
        return []
    period_start = sub.previous_billing_date or sub.created_at
    amounts = plan.trial_credits if trialing else plan.credits
    grants = []
    for key, amount in sorted(amounts.items()):
        if amount <= 0:
            continue
        definition = catalog.credits[key]
        expires_at = None if definition.rollover else sub.next_billing_date
        grants.append(PlanGrant(key, amount, period_start, expires_at))
    return grants


def credits_of(sub: SubscriptionFacts, catalog: Catalog) -> list[str]:
    """The credit keys this subscription gives access to: its plan's, and Dodo-linked ones in its credit cart."""
    keys: set[str] = set()
    plan = catalog.plan(sub.product_id)
    if plan is not None:
        keys.update(plan.credits, plan.trial_credits)
    carried = {item.credit_entitlement_id for item in sub.credit_cart}
    keys.update(
        key
        for key, d in catalog.credits.items()
        if d.dodo_credit_entitlement_id and d.dodo_credit_entitlement_id in carried
    )
    return sorted(keys)
