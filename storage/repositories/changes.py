"""The change feed: which customers' entitlements changed, written inside the changing transaction.

Write transactions add a row here instead of calling NOTIFY themselves: Postgres serializes the commits of every
transaction that issued a NOTIFY (a global lock held through the commit), which would cap all writes at one
WAL flush at a time. A notifier in each process moves committed rows to NOTIFY in small, separate transactions.
"""

from __future__ import annotations

from storage.engine import Connection

CHANGES_CHANNEL = "entitlements_changed"

# For use inside other statements (a data-modifying CTE): $n is a text[] of customer ids.
RECORD_CHANGES_CTE = "INSERT INTO entitlement_changes (customer_id) SELECT DISTINCT unnest({param}::text[])"

_PUBLISH = """
WITH sent AS (
    DELETE FROM entitlement_changes
    WHERE id IN (SELECT id FROM entitlement_changes ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING customer_id
)
SELECT count(*) AS rows, count(pg_notify($1, customer_id)) AS notices
FROM (SELECT DISTINCT customer_id FROM sent) AS changed
"""


async def record_changes(connection: Connection, customer_ids: list[str]) -> None:
    await connection.execute(RECORD_CHANGES_CTE.format(param="$1"), customer_ids)


async def publish_changes(connection: Connection, limit: int = 1000) -> int:
    """Turn up to `limit` committed change rows into notices, atomically (sent exactly when deleted).
    Several replicas may publish at once: SKIP LOCKED gives each its own rows. Returns how many rows it took."""
    row = await connection.fetchrow(_PUBLISH, CHANGES_CHANNEL, limit)
    return int(row["rows"]) if row is not None else 0
