"""All SQL about the watch log (WatchEntitlements, DESIGN §13).

Writers never touch these tables themselves: the triggers of migration 0009 add a `watch_pending` row inside every
transaction that changes a subscription, a balance or a link. The sequencer then moves committed pending rows into
`watch_events` under the lock of the single `watch_head` row, numbering them gaplessly from the head's position.

Why that is commit order and misses nothing: sequencer transactions are serialized by the head's row lock, so every
position it hands out is larger than every position already committed, and a reader that reads `position > cursor`
can never later see a smaller one appear. Two writes that conflict (the same subscription or balance row) are
ordered by the row lock: the later one inserts its pending row only after the earlier one committed, so its id is
larger and any snapshot that sees it also sees the earlier one; numbering by pending id keeps their order.
Writes that do not conflict may be numbered in either order, which no reader can tell apart from commit order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from service.domain.values import SubscriptionState
from service.domain.watch_rules import NewEvent, WatchEvent, WatchKind
from storage.engine import Connection
from storage.repositories.subscriptions import to_state

WATCH_CHANNEL = "entitlements_watch"

_TIMESTAMPS = (
    "dodo_created_at",
    "previous_billing_date",
    "next_billing_date",
    "cancelled_at",
    "expires_at",
    "past_due_ends_at",
    "on_hold_since",
    "hold_cleared_at",
    "last_event_at",
    "updated_at",
)

# The customer's newest link, so an event can say which customer_ref it is about.
_REF = """LEFT JOIN LATERAL (
    SELECT r.customer_ref AS linked_ref FROM customer_refs r WHERE r.customer_id = {table}.customer_id
    ORDER BY r.updated_at DESC LIMIT 1
) AS linked ON true"""

_PENDING = f"""
SELECT p.id, p.subject, p.customer_id, p.subscription_id, p.credit, p.customer_ref, p.old_balance, p.new_balance,
       p.old_state, p.new_state, p.occurred_at, linked.linked_ref
FROM (SELECT * FROM watch_pending ORDER BY id LIMIT $1) AS p
{_REF.format(table="p")}
ORDER BY p.id
"""

# Every instant at which time alone may change a subscription's decision (mirrors watch_rules.access_instants; the
# rules confirm each candidate). Grace days come from the catalog: $1/$2 per product, $3 for the rest.
_INSTANTS = """
FROM subscriptions s
LEFT JOIN unnest($1::text[], $2::int[]) AS g(product_id, days) ON g.product_id = s.product_id
CROSS JOIN LATERAL (VALUES
    (CASE WHEN s.trial_period_days > 0
          THEN s.dodo_created_at + make_interval(secs => s.trial_period_days * 86400.0) END),
    (CASE WHEN s.cancel_at_next_billing_date AND s.status IN ('active', 'cancelled') THEN s.next_billing_date END),
    (CASE WHEN s.status = 'past_due' THEN s.past_due_ends_at END),
    (CASE WHEN s.status IN ('on_hold', 'past_due') AND coalesce(g.days, $3) > 0
          THEN coalesce(s.on_hold_since, s.last_event_at, s.dodo_created_at)
               + make_interval(secs => coalesce(g.days, $3) * 86400.0) END)
) AS i(instant)
"""

_DUE = f"""
SELECT DISTINCT ON (s.subscription_id) watch_subscription_state(s) AS state, linked.linked_ref
{_INSTANTS}
{_REF.format(table="s")}
WHERE i.instant > $4 AND i.instant <= $5
ORDER BY s.subscription_id
"""

_NEXT = f"SELECT min(i.instant) AS next {_INSTANTS} WHERE i.instant > $4"

_APPEND = """
WITH added AS (
    INSERT INTO watch_events (
        position, customer_id, customer_ref, kind, subscription, credit, balance, threshold, occurred_at,
        sequenced_at
    )
    SELECT $1 + e.n, e.customer_id, e.customer_ref, e.kind, e.subscription::jsonb, e.credit, e.balance,
           e.threshold, e.occurred_at, clock_timestamp()
    FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::numeric[], $8::numeric[],
                $9::timestamptz[]) WITH ORDINALITY
         AS e(customer_id, customer_ref, kind, subscription, credit, balance, threshold, occurred_at, n)
    RETURNING 1
), taken AS (
    DELETE FROM watch_pending WHERE id = ANY($10::bigint[]) RETURNING 1
), head AS (
    UPDATE watch_head SET position = $1 + cardinality($2::text[]), clock_through = $11 WHERE id = 1 RETURNING position
)
SELECT (SELECT count(*) FROM added) AS added, (SELECT count(*) FROM taken) AS taken,
       (SELECT position FROM head) AS position,
       CASE WHEN cardinality($2::text[]) > 0
            THEN pg_notify($12, ($1 + cardinality($2::text[]))::text) END AS notified
"""

_READ = """
SELECT position, customer_id, customer_ref, kind, subscription, credit, balance, threshold, occurred_at
FROM watch_events
WHERE position > $1 AND position <= $2 AND ($3::text[] IS NULL OR customer_id = ANY($3::text[]))
ORDER BY position
LIMIT $4
"""

_PRUNE = """
WITH bound AS (
    SELECT least(coalesce(max(position), 0), $2::bigint + $3::bigint) AS through
    FROM watch_events WHERE sequenced_at < clock_timestamp() - $1::interval
), gone AS (
    DELETE FROM watch_events WHERE position > $2 AND position <= (SELECT through FROM bound) RETURNING 1
), head AS (
    UPDATE watch_head SET pruned_through = greatest(pruned_through, (SELECT through FROM bound)) WHERE id = 1
    RETURNING pruned_through
)
SELECT (SELECT count(*) FROM gone) AS pruned, (SELECT pruned_through FROM head) AS pruned_through
"""


@dataclass(frozen=True, slots=True)
class Head:
    epoch: str
    position: int
    pruned_through: int
    clock_through: datetime


@dataclass(frozen=True, slots=True)
class PendingChange:
    """One committed change waiting for its position: a subscription's state before and after, a balance before
    and after, or a link."""

    id: int
    subject: str  # subscription | credit | link
    customer_id: str
    customer_ref: str | None
    occurred_at: datetime
    subscription_id: str | None = None
    old_state: SubscriptionState | None = None
    new_state: SubscriptionState | None = None
    credit: str | None = None
    old_balance: Decimal | None = None
    new_balance: Decimal | None = None


@dataclass(frozen=True, slots=True)
class DueSubscription:
    state: SubscriptionState
    customer_ref: str | None


def state_from_json(data: dict[str, Any]) -> SubscriptionState:
    """A subscription as the triggers store it (`watch_subscription_state`: the row as JSON)."""
    row = dict(data)
    for name in _TIMESTAMPS:
        value = row.get(name)
        row[name] = None if value is None else datetime.fromisoformat(value)
    return to_state(row)


def _grace_arrays(grace_days: dict[str, int]) -> tuple[list[str], list[int]]:
    products = sorted(grace_days)
    return products, [grace_days[p] for p in products]


class WatchRepository:
    """One per sequencer pass or read. Each subscription state it parsed is kept with the JSON it came from, so
    an event made from it stores the stored JSON itself (never a second mapping of the columns to keep in step)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._stored: dict[int, tuple[SubscriptionState, dict[str, Any]]] = {}

    def _state(self, data: dict[str, Any]) -> SubscriptionState:
        state = state_from_json(data)
        self._stored[id(state)] = (state, data)
        return state

    def _stored_json(self, state: SubscriptionState) -> str:
        kept = self._stored.get(id(state))
        if kept is None or kept[0] is not state:
            raise ValueError("an event's subscription must be one this repository read (pending() or due())")
        return orjson.dumps(kept[1]).decode()

    async def head(self, *, lock: bool = False) -> Head:
        """The log's head; with `lock`, held until the transaction ends (only one sequencer at a time, across
        every replica: waits at most the connection's lock_timeout)."""
        row = await self.connection.fetchrow(
            "SELECT epoch, position, pruned_through, clock_through FROM watch_head WHERE id = 1"
            + (" FOR UPDATE" if lock else "")
        )
        if row is None:
            raise RuntimeError("watch_head has no row: the schema is not at head")
        return Head(row["epoch"], row["position"], row["pruned_through"], row["clock_through"])

    async def pending(self, limit: int) -> list[PendingChange]:
        rows = await self.connection.fetch(_PENDING, limit)
        changes = []
        for row in rows:
            old_state, new_state = row["old_state"], row["new_state"]
            changes.append(
                PendingChange(
                    id=row["id"],
                    subject=row["subject"],
                    customer_id=row["customer_id"],
                    customer_ref=row["customer_ref"] or row["linked_ref"],
                    occurred_at=row["occurred_at"],
                    subscription_id=row["subscription_id"],
                    old_state=None if old_state is None else state_from_json(old_state),
                    new_state=None if new_state is None else self._state(new_state),
                    credit=row["credit"],
                    old_balance=row["old_balance"],
                    new_balance=row["new_balance"],
                )
            )
        return changes

    async def due(
        self, grace_days: dict[str, int], default_grace: int, after: datetime, through: datetime
    ) -> list[DueSubscription]:
        """Subscriptions with an instant in (after, through] at which time may change their decision."""
        products, days = _grace_arrays(grace_days)
        rows = await self.connection.fetch(_DUE, products, days, default_grace, after, through)
        return [DueSubscription(self._state(row["state"]), row["linked_ref"]) for row in rows]

    async def next_instant(self, grace_days: dict[str, int], default_grace: int, after: datetime) -> datetime | None:
        products, days = _grace_arrays(grace_days)
        row = await self.connection.fetchrow(_NEXT, products, days, default_grace, after)
        return None if row is None else row["next"]

    async def last_grants(self, accounts: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Decimal]:
        """The newest positive ledger entry of each (customer, credit)."""
        pairs = sorted(set(accounts))
        if not pairs:
            return {}
        rows = await self.connection.fetch(
            """
            SELECT a.customer_id, a.credit, g.amount
            FROM unnest($1::text[], $2::text[]) AS a(customer_id, credit)
            JOIN LATERAL (
                SELECT amount FROM credit_ledger l
                WHERE l.customer_id = a.customer_id AND l.credit = a.credit AND l.amount > 0
                ORDER BY l.id DESC LIMIT 1
            ) AS g ON true
            """,
            [p[0] for p in pairs],
            [p[1] for p in pairs],
        )
        return {(row["customer_id"], row["credit"]): row["amount"] for row in rows}

    async def append(
        self, head: Head, events: Sequence[NewEvent], taken: Sequence[int], clock_through: datetime
    ) -> int:
        """Place `events` after the head (in this order), drop the pending rows they came from, move the head and
        wake every replica's readers. Returns the new head position."""
        row = await self.connection.fetchrow(
            _APPEND,
            head.position,
            [e.customer_id for e in events],
            [e.customer_ref for e in events],
            [e.kind.value for e in events],
            [None if e.subscription is None else self._stored_json(e.subscription) for e in events],
            [e.credit for e in events],
            [e.balance for e in events],
            [e.threshold for e in events],
            [e.occurred_at for e in events],
            list(taken),
            clock_through,
            WATCH_CHANNEL,
        )
        assert row is not None
        return int(row["position"])

    async def read(self, after: int, through: int, customer_ids: frozenset[str] | None, limit: int) -> list[WatchEvent]:
        rows = await self.connection.fetch(
            _READ, after, through, None if customer_ids is None else sorted(customer_ids), limit
        )
        return [
            WatchEvent(
                position=row["position"],
                customer_id=row["customer_id"],
                customer_ref=row["customer_ref"],
                kind=WatchKind(row["kind"]),
                occurred_at=row["occurred_at"],
                subscription=None if row["subscription"] is None else state_from_json(row["subscription"]),
                credit=row["credit"],
                balance=row["balance"],
                threshold=row["threshold"],
            )
            for row in rows
        ]

    async def prune(self, head: Head, retention: timedelta, limit: int) -> tuple[int, int]:
        """Drop up to `limit` events sequenced longer than `retention` ago by Postgres' clock, the one that stamped
        them (the head must be locked). Returns how many went and the new `pruned_through`: a cursor before it is
        expired."""
        row = await self.connection.fetchrow(_PRUNE, retention, head.pruned_through, limit)
        assert row is not None
        return int(row["pruned"]), int(row["pruned_through"])
