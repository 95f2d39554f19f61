"""Applying a Dodo subscription snapshot: the one path shared by webhooks, ChangePlan, cancel/resume and
reconciliation. The merge itself is a pure rule (service/domain/snapshot_rules.py); this is its I/O."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from service.app.credit_grants import grant_for_period
from service.domain.catalog import Catalog
from service.domain.dodo_payloads import DodoSubscription
from service.domain.snapshot_rules import earlier_hold_start, merge
from service.domain.values import SubscriptionState
from storage.engine import Connection
from storage.repositories.subscriptions import SubscriptionRepository


@dataclass(frozen=True, slots=True)
class SnapshotOutcome:
    applied: bool
    previous: SubscriptionState | None
    current: SubscriptionState
    # A stale event that only moved the grace start back to the first event of the hold episode.
    hold_moved: bool = False


async def apply_snapshot(
    connection: Connection,
    catalog: Catalog,
    snapshot: DodoSubscription,
    event_at: datetime,
    *,
    refreshed_at: datetime | None = None,
) -> SnapshotOutcome:
    """Merge under a per-subscription lock, store, and grant the period's plan credits; the caller's transaction
    commits it all."""
    incoming, data = snapshot.state, snapshot.payload
    repository = SubscriptionRepository(connection)
    current = await repository.lock(incoming.subscription_id)
    merged = merge(current, incoming, event_at)
    if current is None and merged is not None:
        if await repository.save(merged, data, refreshed_at=refreshed_at, insert=True):
            await grant_for_period(connection, catalog, None, merged, event_at)
            return SnapshotOutcome(True, None, merged)
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
    await repository.save(merged, data, refreshed_at=refreshed_at, previous_customer_id=current.customer_id)
    await grant_for_period(connection, catalog, current, merged, event_at)
    return SnapshotOutcome(True, current, merged)
