"""Applying a Dodo subscription snapshot: the one path shared by webhooks, ChangePlan and reconciliation.

`data` is the subscription's state at delivery time, so the event type never drives state; ordering comes from the
envelope timestamp, and an event older than the last applied one is kept (by the caller) but never regresses state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from service.catalog import Catalog
from service.credit_grants import grant_for_period
from service.domain import SubscriptionState
from service.payloads import parse_subscription
from storage.engine import Connection
from storage.repositories.subscriptions import SubscriptionRepository


@dataclass(frozen=True, slots=True)
class SnapshotOutcome:
    applied: bool
    previous: SubscriptionState | None
    current: SubscriptionState
    # A stale event that only moved the grace start back to the first event of the hold episode.
    hold_moved: bool = False


def merge(
    current: SubscriptionState | None, incoming: SubscriptionState, event_at: datetime
) -> SubscriptionState | None:
    """The state to store, or None when the incoming snapshot is older than what is applied.

    `event_at` is the envelope time of a webhook, or for a snapshot fetched from Dodo's API the time just before
    it was asked for: either way no change later than `event_at` is missing from it.
    """
    if current is not None and current.last_event_at is not None and event_at < current.last_event_at:
        return None
    cleared = current.hold_cleared_at if current is not None else None
    return replace(
        incoming,
        on_hold_since=_hold_since(current, incoming.status, event_at),
        hold_cleared_at=cleared if incoming.status in _HOLD else event_at,
        last_event_at=event_at,
    )


def earlier_hold_start(current: SubscriptionState, status: str, event_at: datetime) -> datetime | None:
    """For a stale event: the earlier start of the current hold episode it proves, if any.

    Dodo does not deliver in order, so the first on_hold event can arrive after a later one. Grace runs from the
    first, unless an applied event between them showed the subscription out of trouble (then they are two
    episodes). A past_due episode and the on_hold that follows it are separate, as when delivered in order."""
    since = current.on_hold_since
    if since is None or event_at >= since or status != current.status or status not in _HOLD:
        return None
    if current.hold_cleared_at is not None and event_at <= current.hold_cleared_at:
        return None
    return event_at


_HOLD = frozenset({"on_hold", "past_due"})


def _hold_since(current: SubscriptionState | None, status: str, event_at: datetime) -> datetime | None:
    """When the current payment-trouble episode began: grace is measured from the first event that showed it."""
    previous = current.status if current is not None else None
    kept = current.on_hold_since if current is not None else None
    if status == "on_hold":
        return kept if previous == "on_hold" and kept is not None else event_at
    if status == "past_due":
        return kept if previous in ("past_due", "on_hold") and kept is not None else event_at
    return None


async def apply_snapshot(
    connection: Connection,
    catalog: Catalog,
    data: dict[str, Any],
    event_at: datetime,
    *,
    refreshed_at: datetime | None = None,
) -> SnapshotOutcome:
    """Parse, merge under a per-subscription lock, store, and grant the period's plan credits; the caller's
    transaction commits it all."""
    incoming = parse_subscription(data)
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
