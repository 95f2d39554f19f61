"""Where credits come from: a plan's per-period grant, and Dodo's credit ledger webhooks.

Both run inside the caller's transaction (a webhook delivery, a ChangePlan or a reconciliation), so a grant commits
together with the event that caused it or not at all.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime

from service.domain import access_rules as access
from service.domain import credit_rules as credits
from service.domain.catalog import Catalog
from service.domain.dodo_payloads import DodoLedgerEntry
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


async def apply_dodo_ledger_entry(connection: Connection, catalog: Catalog, entry: DodoLedgerEntry) -> str:
    """Mirror one Dodo credit ledger entry as a signed delta, exactly once per entry id. Returns the inbox status."""
    definition = catalog.credit_for_entitlement(entry.credit_entitlement_id)
    if definition is None:
        return "recorded"
    repository = CreditRepository(connection)
    # The account lock serializes deliveries of one credit, so the seen-check below cannot race.
    account = await repository.lock(entry.customer_id, definition.key)
    if await repository.has_dodo_entry(entry.entry_id):
        return "duplicate_entry"
    account, expired = credits.expire(account, entry.created_at)
    kind = f"dodo_{entry.transaction_type or 'ledger'}"
    if entry.is_credit:
        account, written = credits.credit(
            account, entry.amount, grant_id=f"dodo:{entry.entry_id}", expires_at=None, source=entry.entry_id, kind=kind
        )
    else:
        account, written = credits.debit(account, entry.amount, source=entry.entry_id, kind=kind)
    written = replace(written, dodo_entry_id=entry.entry_id, description=entry.description)
    await repository.save([account], [*expired, written])
    return "applied"
