"""Merging a Dodo subscription snapshot into the stored one (DESIGN §7): pure functions of the two snapshots and
the event's instant.

`data` is the subscription's state at delivery time, so the event type never drives state; ordering comes from the
envelope timestamp, and an event older than the last applied one never regresses state.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from service.domain.access_rules import HOLD_STATUSES
from service.domain.values import SubscriptionState


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
        hold_cleared_at=cleared if incoming.status in HOLD_STATUSES else event_at,
        last_event_at=event_at,
    )


def earlier_hold_start(current: SubscriptionState, status: str, event_at: datetime) -> datetime | None:
    """For a stale event: the earlier start of the current hold episode it proves, if any.

    Dodo does not deliver in order, so the first on_hold event can arrive after a later one. Grace runs from the
    first, unless an applied event between them showed the subscription out of trouble (then they are two
    episodes). A past_due episode and the on_hold that follows it are separate, as when delivered in order."""
    since = current.on_hold_since
    if since is None or event_at >= since or status != current.status or status not in HOLD_STATUSES:
        return None
    if current.hold_cleared_at is not None and event_at <= current.hold_cleared_at:
        return None
    return event_at


def _hold_since(current: SubscriptionState | None, status: str, event_at: datetime) -> datetime | None:
    """When the current payment-trouble episode began: grace is measured from the first event that showed it."""
    previous = current.status if current is not None else None
    kept = current.on_hold_since if current is not None else None
    if status == "on_hold":
        return kept if previous == "on_hold" and kept is not None else event_at
    if status == "past_due":
        return kept if previous in ("past_due", "on_hold") and kept is not None else event_at
    return None
