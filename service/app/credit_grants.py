"""Where credits come from: a plan's per-period grant, and Dodo's credit ledger webhooks.

Both run inside the caller's transaction (a webhook delivery, a ChangePlan or a reconciliation), so a grant commits
together with the event that caused it or not at all.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime
from typing import Any

from service.domain import access_rules as access
from service.domain import credit_rules as credits
from service.domain.catalog import Catalog
from service.domain.dodo_payloads import parse_decimal, parse_time
from service.domain.errors import MalformedPayload
from service.domain.values import AccessReason, LedgerEntry, SubscriptionState
from storage.engine import Connection
from storage.repositories.credits import CreditRepository

log = logging.getLogger("entitlements.credits")


def _grants_due(sub: SubscriptionState | None, catalog: Catalog, at: datetime) -> list[credits.PlanGrant]:
    if sub is None:
        return []
    decision = access.decide(sub, catalog, at)
    if not decision.allowed:
        return []
    return credits.plan_grants(sub, catalog, trialing=decision.reason is AccessReason.TRIALING)


async def grant_for_period(
    connection: Connection,
    catalog: Catalog,
    previous: SubscriptionState | None,
    sub: SubscriptionState,
    at: datetime,
) -> list[LedgerEntry]:
    """Grant the plan's credits for the subscription's current period, once, if it grants access at `at`.

    Each (subscription, credit, period) is claimed in the database, so a grant happens once however often the
    period's events are delivered; when the previous snapshot already called for the same grants, they were
    claimed when it was applied, and the claim round trips are skipped.
    """
    due = _grants_due(sub, catalog, at)
    if not due or due == _grants_due(previous, catalog, at):
        return []
    repository = CreditRepository(connection)
    written: list[LedgerEntry] = []
    for grant in due:
        account = await repository.claim_period_grant(
            subscription_id=sub.subscription_id,
            credit=grant.credit,
            period_start=grant.period_start,
            customer_id=sub.customer_id,
            amount=grant.amount,
        )
        if account is None:
            continue
        account, expired = credits.expire(account, at)
        source = f"{sub.subscription_id}@{grant.period_start.isoformat()}"
        account, entry = credits.credit(
            account, grant.amount, grant_id=source, expires_at=grant.expires_at, source=source, kind="plan_grant"
        )
        await repository.save([account], [*expired, entry])
        written.append(entry)
    if written:
        log.info("credits.granted", extra={"subscription_id": sub.subscription_id, "entries": len(written)})
    return written


async def apply_dodo_ledger_entry(connection: Connection, catalog: Catalog, data: dict[str, Any]) -> str:
    """Mirror one Dodo credit ledger entry as a signed delta, exactly once per entry id. Returns the inbox status."""
    entry_id = data.get("id")
    customer_id = data.get("customer_id")
    entitlement = data.get("credit_entitlement_id")
    if not isinstance(entry_id, str) or not entry_id:
        raise MalformedPayload("data.id is required for a credit ledger entry")
    if not isinstance(customer_id, str) or not customer_id:
        raise MalformedPayload("data.customer_id is required for a credit ledger entry")
    if not isinstance(entitlement, str) or not entitlement:
        raise MalformedPayload("data.credit_entitlement_id is required for a credit ledger entry")
    amount = parse_decimal(data.get("amount"), "data.amount")
    if amount < 0:
        raise MalformedPayload("data.amount must not be negative (the sign comes from is_credit)")
    if not isinstance(data.get("is_credit"), bool):
        raise MalformedPayload("data.is_credit must be true or false")
    definition = catalog.credit_for_entitlement(entitlement)
    if definition is None:
        return "recorded"
    repository = CreditRepository(connection)
    # The account lock serializes deliveries of one credit, so the seen-check below cannot race.
    account = await repository.lock(customer_id, definition.key)
    if await repository.has_dodo_entry(entry_id):
        return "duplicate_entry"
    at = _entry_time(data)
    account, expired = credits.expire(account, at)
    kind = f"dodo_{data.get('transaction_type') or 'ledger'}"
    if data["is_credit"]:
        account, entry = credits.credit(
            account, amount, grant_id=f"dodo:{entry_id}", expires_at=None, source=entry_id, kind=kind
        )
    else:
        account, entry = credits.debit(account, amount, source=entry_id, kind=kind)
    description = data.get("description")
    entry = replace(entry, dodo_entry_id=entry_id, description=description if isinstance(description, str) else "")
    await repository.save([account], [*expired, entry])
    return "applied"


def _entry_time(data: dict[str, Any]) -> datetime:
    return parse_time(data.get("created_at"), "data.created_at")
