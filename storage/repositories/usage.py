"""All SQL about the usage outbox (`usage_events`): RecordUsage's insert, the sender's claims and marks, GetUsage's
figures.

Row life: `pending` (recorded, not yet confirmed by Dodo) -> `delivered` (Dodo answered 2xx for a request holding
it) | `rejected` (Dodo answered 400/422 for a request holding only it) | `expired` (not confirmed within Dodo's
1 h window). While a row is `pending`, `sent_at` is the time a sender last claimed it: a claim is a lease, so
replicas never send the same row at the same time, and a sender that died mid-request leaves a lease that simply
runs out. Once `delivered`, `sent_at` is when Dodo confirmed it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import orjson

from storage.engine import Connection

Scalar = str | int | float | bool


@dataclass(frozen=True, slots=True)
class NewUsageEvent:
    event_id: str
    event_name: str
    occurred_at: datetime
    properties: Mapping[str, Scalar]


@dataclass(frozen=True, slots=True)
class ClaimedUsageEvent:
    id: int
    customer_id: str
    event_id: str
    event_name: str
    occurred_at: datetime
    properties: dict[str, Scalar]
    attempts: int


@dataclass(frozen=True, slots=True)
class UsageFigures:
    count: int
    sums: dict[str, Decimal]
    delivery: dict[str, int]
    """status -> count (pending, delivered, rejected, expired)."""


# One statement for the whole request: rows already there (same customer and event id) are left as they are
# (first write wins) and not returned, so what comes back is exactly what this request added.
_INSERT = """
INSERT INTO usage_events (customer_id, event_id, event_name, occurred_at, properties)
SELECT $1, e.event_id, e.event_name, e.occurred_at, e.properties::jsonb
FROM unnest($2::text[], $3::text[], $4::timestamptz[], $5::text[]) AS e(event_id, event_name, occurred_at, properties)
ON CONFLICT (customer_id, event_id) DO NOTHING
RETURNING event_id
"""

# Oldest first (closest to Dodo's 1 h limit); rows another sender is claiming right now are skipped, and rows a
# sender claimed less than a lease ago are left to it.
_CLAIM = """
WITH picked AS (
    SELECT id FROM usage_events
    WHERE status = 'pending' AND occurred_at >= $1 AND (sent_at IS NULL OR sent_at <= $2)
    ORDER BY occurred_at, id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE usage_events AS u SET attempts = u.attempts + 1, sent_at = $4
FROM picked WHERE u.id = picked.id
RETURNING u.id, u.customer_id, u.event_id, u.event_name, u.occurred_at, u.properties, u.attempts
"""

# An `expired` row whose request Dodo did accept after all is delivered: Dodo's answer is the truth.
_DELIVERED = """
UPDATE usage_events SET status = 'delivered', sent_at = $2, last_error = NULL
WHERE id = ANY($1::bigint[]) AND status IN ('pending', 'expired')
"""

_REJECTED = """
UPDATE usage_events SET status = 'rejected', last_error = $2
WHERE id = ANY($1::bigint[]) AND status = 'pending'
"""

# The lease is given back (sent_at NULL) so the next attempt, by any sender, need not wait for it to run out.
_RELEASED = """
UPDATE usage_events SET sent_at = NULL, last_error = $2
WHERE id = ANY($1::bigint[]) AND status = 'pending'
"""

# Rows under a live lease are left to their sender: it either confirms them or its lease runs out.
_EXPIRE = """
UPDATE usage_events
SET status = 'expired',
    last_error = CASE WHEN attempts > 0
        THEN 'not confirmed by Dodo within its 1 h window (an earlier attempt may have been ingested): '
             || coalesce(last_error, 'answer lost')
        ELSE 'not sent within Dodo''s 1 h window' END
WHERE status = 'pending' AND occurred_at < $1 AND (sent_at IS NULL OR sent_at <= $2)
RETURNING customer_id, event_id, attempts
"""

_FIGURES = """
WITH chosen AS (
    SELECT status, properties FROM usage_events
    WHERE customer_id = $1 AND event_name = $2 AND occurred_at >= $3 AND occurred_at < $4
)
SELECT 'status' AS kind, status AS name, count(*)::numeric AS value FROM chosen GROUP BY status
UNION ALL
SELECT 'sum', p.key, sum(p.value::text::numeric)
FROM chosen, jsonb_each(chosen.properties) AS p
WHERE jsonb_typeof(p.value) = 'number'
GROUP BY p.key
"""


class UsageRepository:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def insert(self, customer_id: str, events: Sequence[NewUsageEvent]) -> int:
        """Record the events that are new for this customer; how many were new."""
        # In event id order, so two requests sharing ids wait for each other instead of deadlocking.
        events = sorted(events, key=lambda e: e.event_id)
        rows = await self.connection.fetch(
            _INSERT,
            customer_id,
            [e.event_id for e in events],
            [e.event_name for e in events],
            [e.occurred_at for e in events],
            [orjson.dumps(dict(e.properties)).decode() for e in events],
        )
        return len(rows)

    async def claim(
        self, *, now: datetime, not_before: datetime, lease_ends_before: datetime, limit: int
    ) -> list[ClaimedUsageEvent]:
        """Lease up to `limit` pending rows that occurred at or after `not_before` and are not leased since
        `lease_ends_before`, stamping them with `now`."""
        rows = await self.connection.fetch(_CLAIM, not_before, lease_ends_before, limit, now)
        claimed = [
            ClaimedUsageEvent(
                id=row["id"],
                customer_id=row["customer_id"],
                event_id=row["event_id"],
                event_name=row["event_name"],
                occurred_at=row["occurred_at"],
                properties=dict(row["properties"]),
                attempts=row["attempts"],
            )
            for row in rows
        ]
        claimed.sort(key=lambda e: (e.occurred_at, e.id))
        return claimed

    async def mark_delivered(self, ids: Sequence[int], now: datetime) -> None:
        await self.connection.execute(_DELIVERED, list(ids), now)

    async def mark_rejected(self, ids: Sequence[int], error: str) -> None:
        await self.connection.execute(_REJECTED, list(ids), error)

    async def release(self, ids: Sequence[int], error: str) -> None:
        await self.connection.execute(_RELEASED, list(ids), error)

    async def expire(self, *, occurred_before: datetime, lease_ends_before: datetime) -> list[tuple[str, str, int]]:
        """Mark pending rows that occurred before `occurred_before` (and are not under a live lease) `expired`:
        (customer_id, event_id, attempts) of each."""
        rows = await self.connection.fetch(_EXPIRE, occurred_before, lease_ends_before)
        return [(row["customer_id"], row["event_id"], row["attempts"]) for row in rows]

    async def backlog(self) -> int:
        count: int = await self.connection.fetchval("SELECT count(*) FROM usage_events WHERE status = 'pending'")
        return count

    async def has_any(self, customer_id: str) -> bool:
        found = await self.connection.fetchval("SELECT 1 FROM usage_events WHERE customer_id = $1 LIMIT 1", customer_id)
        return found is not None

    async def figures(self, customer_id: str, event_name: str, start: datetime, end: datetime) -> UsageFigures:
        rows = await self.connection.fetch(_FIGURES, customer_id, event_name, start, end)
        delivery = dict.fromkeys(("pending", "delivered", "rejected", "expired"), 0)
        sums: dict[str, Decimal] = {}
        for row in rows:
            if row["kind"] == "status":
                delivery[row["name"]] = int(row["value"])
            else:
                sums[row["name"]] = row["value"]
        return UsageFigures(count=sum(delivery.values()), sums=sums, delivery=delivery)
