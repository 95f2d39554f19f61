"""The watch log's rules (DESIGN §13), pure: which events a committed change makes, when time alone changes an
access decision, and the cursor format.

A change arrives as the stored state before and after it (written by the triggers of migration 0009). From it come
SUBSCRIPTION_CHANGED (the stored state differs in anything but bookkeeping), ACCESS_CHANGED (the subscription's
decision at the change differs), CREDITS_CHANGED, CREDITS_LOW (the balance fell from above the threshold to at or
below it) and CREDITS_EXHAUSTED (the headroom, balance plus allowed overage, fell from above zero to zero or less).
A crossing is seen in exactly one change, so each fires once per crossing.

Time-driven ACCESS_CHANGED events (trial end, grace end, period end) are not scheduled anywhere: the instants are
derived from the stored subscriptions, and the window already emitted is one timestamp in the log's head.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from decimal import Decimal

from service.domain.access_rules import HOLD_STATUSES, subscription_access, trial_ends_at
from service.domain.decimals import MATH
from service.domain.errors import InvalidField
from service.domain.limits import check_id
from service.domain.values import AccessDecision, SubscriptionState

# How many customers one stream may name.
MAX_WATCHED_CUSTOMERS = 1000
# A decision "just before" an instant: the rules compare with `now >= end`, so one microsecond earlier is before.
_JUST_BEFORE = timedelta(microseconds=1)
# Stored fields that change on every applied event without changing what a subscriber could act on.
_BOOKKEEPING = frozenset({"last_event_at", "updated_at"})


class WatchKind(enum.StrEnum):
    SUBSCRIPTION_CHANGED = "SUBSCRIPTION_CHANGED"
    ACCESS_CHANGED = "ACCESS_CHANGED"
    CREDITS_CHANGED = "CREDITS_CHANGED"
    CREDITS_LOW = "CREDITS_LOW"
    CREDITS_EXHAUSTED = "CREDITS_EXHAUSTED"
    CUSTOMER_LINKED = "CUSTOMER_LINKED"


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event about to be placed in the log (its position is given by the sequencer)."""

    customer_id: str
    kind: WatchKind
    occurred_at: datetime
    subscription: SubscriptionState | None = None
    credit: str | None = None
    balance: Decimal | None = None
    threshold: Decimal | None = None
    customer_ref: str | None = None


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """An event of the log, as streamed."""

    position: int
    customer_id: str
    customer_ref: str | None
    kind: WatchKind
    occurred_at: datetime
    subscription: SubscriptionState | None = None
    credit: str | None = None
    balance: Decimal | None = None
    threshold: Decimal | None = None


# --- subscriptions -------------------------------------------------------------------------------------------------


def _material(state: SubscriptionState) -> tuple[object, ...]:
    return tuple(getattr(state, f.name) for f in fields(state) if f.name not in _BOOKKEEPING)


def _same_decision(a: AccessDecision, b: AccessDecision) -> bool:
    return a.allowed == b.allowed and a.reason == b.reason and a.access_ends_at == b.access_ends_at


def subscription_kinds(
    old: SubscriptionState | None, new: SubscriptionState, grace_days: int, at: datetime
) -> list[WatchKind]:
    """What one committed write of a subscription makes: nothing when only bookkeeping moved."""
    if old is not None and _material(old) == _material(new):
        return []
    kinds = [WatchKind.SUBSCRIPTION_CHANGED]
    after = subscription_access(new, grace_days, at)
    if old is None:
        if after.allowed:
            kinds.append(WatchKind.ACCESS_CHANGED)
    elif not _same_decision(subscription_access(old, grace_days, at), after):
        kinds.append(WatchKind.ACCESS_CHANGED)
    return kinds


def access_instants(sub: SubscriptionState, grace_days: int) -> list[datetime]:
    """Every instant at which time alone may change this subscription's decision (a superset: see
    `time_changes`)."""
    instants: list[datetime] = []
    trial_end = trial_ends_at(sub)
    if trial_end is not None:
        instants.append(trial_end)
    if sub.cancel_at_next_billing_date and sub.status in ("active", "cancelled") and sub.next_billing_date:
        instants.append(sub.next_billing_date)
    if sub.status == "past_due" and sub.past_due_ends_at is not None:
        instants.append(sub.past_due_ends_at)
    elif sub.status in HOLD_STATUSES and grace_days > 0:
        since = sub.on_hold_since or sub.last_event_at or sub.created_at
        instants.append(since + timedelta(days=grace_days))
    return instants


def time_changes(sub: SubscriptionState, grace_days: int, after: datetime, through: datetime) -> list[datetime]:
    """The instants in (after, through] at which this subscription's decision changes with no write."""
    changed = []
    for instant in sorted(set(access_instants(sub, grace_days))):
        if after < instant <= through:
            before = subscription_access(sub, grace_days, instant - _JUST_BEFORE)
            if not _same_decision(before, subscription_access(sub, grace_days, instant)):
                changed.append(instant)
    return changed


def next_instant(
    subs: Iterable[SubscriptionState], grace_days: dict[str, int], default_grace: int, after: datetime
) -> datetime | None:
    """The earliest instant after `after` at which any of these subscriptions may change by time alone."""
    upcoming = [
        instant
        for sub in subs
        for instant in access_instants(sub, grace_days.get(sub.product_id, default_grace))
        if instant > after
    ]
    return min(upcoming, default=None)


# --- credits -------------------------------------------------------------------------------------------------------


def credit_kinds(
    old_balance: Decimal | None, new_balance: Decimal, *, threshold: Decimal | None, overage_limit: Decimal
) -> list[WatchKind]:
    """What one committed change of a balance makes. A new account (no old balance) starts from zero."""
    old = old_balance if old_balance is not None else Decimal(0)
    if old == new_balance:
        return []
    kinds = [WatchKind.CREDITS_CHANGED]
    if threshold is not None and old > threshold >= new_balance:
        kinds.append(WatchKind.CREDITS_LOW)
    if MATH.add(old, overage_limit) > 0 >= MATH.add(new_balance, overage_limit):
        kinds.append(WatchKind.CREDITS_EXHAUSTED)
    return kinds


# --- cursors -------------------------------------------------------------------------------------------------------

_CURSOR = re.compile(r"^w1\.([0-9a-f]{12})\.([0-9]{1,19})$")


@dataclass(frozen=True, slots=True)
class Cursor:
    epoch: str
    position: int

    def text(self) -> str:
        return f"w1.{self.epoch}.{self.position}"


def parse_cursor(text: str, field: str = "after_cursor") -> Cursor:
    """A cursor this service issued (its shape; the epoch and position are checked against the log)."""
    match = _CURSOR.match(text)
    if match is None:
        raise InvalidField(field, f"{field} is not a cursor this service issued")
    position = int(match.group(2))
    if position > 2**63 - 1:
        raise InvalidField(field, f"{field} is not a cursor this service issued")
    return Cursor(match.group(1), position)


def check_customer_ids(customer_ids: Sequence[str]) -> frozenset[str] | None:
    """The stream's filter: None for every customer."""
    if len(customer_ids) > MAX_WATCHED_CUSTOMERS:
        raise InvalidField(
            "customer_ids", f"customer_ids names {len(customer_ids)} customers; at most {MAX_WATCHED_CUSTOMERS}"
        )
    for customer_id in customer_ids:
        check_id("customer_ids", customer_id)
    return frozenset(customer_ids) or None
