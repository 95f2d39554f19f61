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
from storage.repositories.inbox import InboxRow
from storage.repositories.subscriptions import SubscriptionRepository


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
    in the same statement, when the snapshot applies; when it was already stored nothing else is done."""
    incoming, data = snapshot.state, snapshot.payload
    repository = SubscriptionRepository(connection)
    current = await repository.lock(incoming.subscription_id)
    merged = merge(current, incoming, event_at)
    if current is None and merged is not None:
        saved = await repository.save(merged, data, refreshed_at=refreshed_at, insert=True, inbox=inbox)
        if saved.written:
            if saved.inbox_stored is not False:
                await grant_for_period(connection, catalog, None, merged, event_at)
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
    saved = await repository.save(
        merged, data, refreshed_at=refreshed_at, previous_customer_id=current.customer_id, inbox=inbox
    )
    if saved.inbox_stored is not False:
        await grant_for_period(connection, catalog, current, merged, event_at)
    return SnapshotOutcome(True, current, merged, inbox_stored=saved.inbox_stored)
