"""The change feed: which customers' entitlements changed, written inside the changing transaction.

Write transactions add a row here instead of calling NOTIFY themselves: Postgres serializes the commits of every
transaction that issued a NOTIFY (a global lock held through the commit), which would cap all writes at one
WAL flush at a time. A notifier in each process moves committed rows to NOTIFY in small, separate transactions.
"""

from __future__ import annotations

from storage.engine import Connection

CHANGES_CHANNEL = "entitlements_changed"
# Notices read "<scope>:<customer_id>": `all` (subscriptions and balances) or `credits` (balances only, so a
# consumption leaves the customer's subscriptions cached).
ALL_SCOPE = "all"
CREDITS_SCOPE = "credits"
# A customer_ref's link changed: the row's customer_id column holds the ref.
REF_SCOPE = "ref"

_PUBLISH = """
WITH sent AS (
    DELETE FROM entitlement_changes
    WHERE id IN (SELECT id FROM entitlement_changes ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING customer_id, scope
)
SELECT (SELECT count(*) FROM sent) AS rows, count(pg_notify($1, scope || ':' || customer_id)) AS notices
FROM (SELECT DISTINCT customer_id, scope FROM sent) AS changed
"""


async def publish_changes(connection: Connection, limit: int = 1000) -> int:
    """Turn up to `limit` committed change rows into notices, atomically (sent exactly when deleted).
    Several replicas may publish at once: SKIP LOCKED gives each its own rows. Returns how many rows it took."""
    row = await connection.fetchrow(_PUBLISH, CHANGES_CHANNEL, limit)
    return int(row["rows"]) if row is not None else 0
