"""Applying a Dodo subscription snapshot: the one path shared by webhooks, ChangePlan, cancel/resume and
reconciliation. The merge itself is a pure rule (service/domain/snapshot_rules.py); this is its I/O."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from service.domain import access_rules as access
from service.domain import credit_rules as credits
from service.domain.catalog import Catalog
from service.domain.dodo_payloads import DodoSubscription
from service.domain.snapshot_rules import earlier_hold_start, merge
from service.domain.values import AccessReason, LedgerEntry, SubscriptionState
from storage.engine import Connection
from storage.repositories.credits import CreditRepository, PeriodClaim
from storage.repositories.inbox import InboxRow
from storage.repositories.subscriptions import Saved, SubscriptionRepository

log = logging.getLogger("entitlements.credits")


@dataclass(frozen=True, slots=True)
class SnapshotOutcome:
    applied: bool
    previous: SubscriptionState | None
    current: SubscriptionState
    # A stale event that only moved the grace start back to the first event of the hold episode.
    hold_moved: bool = False
    # Whether the `inbox` row given went in with the write (None: not written here, the caller records it).
    inbox_stored: bool | None = None


async def apply_snapshot(
    connection: Connection,
    catalog: Catalog,
    snapshot: DodoSubscription,
    event_at: datetime,
    *,
    refreshed_at: datetime | None = None,
    inbox: InboxRow | None = None,
) -> SnapshotOutcome:
    """Merge under a per-subscription lock, store, and grant the period's plan credits; the caller's transaction
    commits it all. A webhook delivery passes its `inbox` row (status applied): it is written with the snapshot,
    in the same statement, when the snapshot applies; when it was already stored nothing else is done.

    Round trips: the lock, one write (subscription, customer, change feed, inbox row, and the claims of the
    period's plan grants with their accounts locked), and, when a grant was claimed, one more for the balances
    and ledger rows."""
    incoming, data = snapshot.state, snapshot.payload
    repository = SubscriptionRepository(connection)
    current = await repository.lock(incoming.subscription_id)
    merged = merge(current, incoming, event_at)
    if current is None and merged is not None:
        saved = await _save(
            connection, catalog, repository, None, merged, data, event_at, refreshed_at=refreshed_at, inbox=inbox
        )
        if saved.written:
            return SnapshotOutcome(True, None, merged, inbox_stored=saved.inbox_stored)
        # A concurrent first delivery of this subscription committed first: merge onto what it stored.
        current = await repository.lock(incoming.subscription_id)
        merged = merge(current, incoming, event_at)
    if merged is None:
        assert current is not None
        since = earlier_hold_start(current, incoming.status, event_at)
        if since is None:
            return SnapshotOutcome(False, current, current)
        await repository.move_hold_start(current.subscription_id, current.customer_id, since)
        return SnapshotOutcome(False, current, replace(current, on_hold_since=since), hold_moved=True)
    assert current is not None
    saved = await _save(
        connection, catalog, repository, current, merged, data, event_at, refreshed_at=refreshed_at, inbox=inbox
    )
    return SnapshotOutcome(True, current, merged, inbox_stored=saved.inbox_stored)


async def _save(
    connection: Connection,
    catalog: Catalog,
    repository: SubscriptionRepository,
    previous: SubscriptionState | None,
    merged: SubscriptionState,
    data: dict[str, Any],
    at: datetime,
    *,
    refreshed_at: datetime | None,
    inbox: InboxRow | None,
) -> Saved:
    """Write the merged snapshot and grant the plan's credits for its current period, once, if it grants access
    at `at`. Each (subscription, credit, period) is claimed in the database with the write, so a grant happens
    once however often the period's events are delivered; when the previous snapshot already called for the same
    grants, they were claimed when it was applied, and nothing is claimed."""
    due = _grants_due(merged, catalog, at)
    if due and due == _grants_due(previous, catalog, at):
        due = []
    saved = await repository.save(
        merged,
        data,
        refreshed_at=refreshed_at,
        insert=previous is None,
        previous_customer_id=None if previous is None else previous.customer_id,
        inbox=inbox,
        claims=[PeriodClaim(g.credit, g.period_start, g.amount) for g in due],
    )
    if not saved.claimed or saved.inbox_stored is False:
        return saved  # nothing claimed, or a duplicate delivery whose transaction rolls back
    grants = {g.credit: g for g in due}
    accounts = []
    entries: list[LedgerEntry] = []
    for claimed in saved.claimed:
        grant = grants[claimed.credit]
        account, expired = credits.expire(claimed, at)
        source = f"{merged.subscription_id}@{grant.period_start.isoformat()}"
        account, entry = credits.credit(
            account, grant.amount, grant_id=source, expires_at=grant.expires_at, source=source, kind="plan_grant"
        )
        accounts.append(account)
        entries.extend((*expired, entry))
    # Every claimed account in one statement (grants of distinct credits are distinct accounts).
    await CreditRepository(connection).save(accounts, entries)
    log.info("credits.granted", extra={"subscription_id": merged.subscription_id, "entries": len(accounts)})
    return saved


def _grants_due(sub: SubscriptionState | None, catalog: Catalog, at: datetime) -> list[credits.PlanGrant]:
    if sub is None:
        return []
    decision = access.decide(sub, catalog, at)
    if not decision.allowed:
        return []
    return credits.plan_grants(sub, catalog, trialing=decision.reason is AccessReason.TRIALING)
