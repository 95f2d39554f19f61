"""All SQL about customer refs: the company's own ids for Dodo customers."""

from __future__ import annotations

from dataclasses import dataclass

from storage.engine import Connection

# One statement: the previous link (locked), the upsert (moving an existing link only when allowed), and the
# change-feed row that makes every replica forget its cached resolution of the ref.
_LINK = """
WITH old AS (
    SELECT customer_id FROM customer_refs WHERE customer_ref = $1 FOR UPDATE
), up AS (
    INSERT INTO customer_refs AS r (customer_ref, customer_id, linked_by) VALUES ($1, $2, $3)
    ON CONFLICT (customer_ref) DO UPDATE
        SET customer_id = EXCLUDED.customer_id, linked_by = EXCLUDED.linked_by, updated_at = now()
        WHERE $4 OR r.customer_id = EXCLUDED.customer_id
    RETURNING customer_id
), changed AS (
    INSERT INTO entitlement_changes (customer_id, scope)
    SELECT $1, 'ref' FROM up WHERE (SELECT customer_id FROM old) IS DISTINCT FROM $2
)
SELECT (SELECT customer_id FROM old) AS previous, (SELECT count(*) FROM up) AS written
"""


@dataclass(frozen=True, slots=True)
class Linked:
    """`previous`: the customer the ref pointed at before (None: new). `linked`: the ref points at the asked
    customer now (False only when it points at another one and moving was not allowed)."""

    previous: str | None
    linked: bool


class CustomerRefRepository:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def resolve(self, customer_ref: str) -> str | None:
        found: str | None = await self.connection.fetchval(
            "SELECT customer_id FROM customer_refs WHERE customer_ref = $1", customer_ref
        )
        return found

    async def link(self, customer_ref: str, customer_id: str, *, linked_by: str, move: bool) -> Linked:
        row = await self.connection.fetchrow(_LINK, customer_ref, customer_id, linked_by, move)
        assert row is not None
        return Linked(previous=row["previous"], linked=bool(row["written"]))

    async def refs_of(self, customer_id: str) -> list[str]:
        rows = await self.connection.fetch(
            "SELECT customer_ref FROM customer_refs WHERE customer_id = $1 ORDER BY updated_at DESC", customer_id
        )
        return [row["customer_ref"] for row in rows]
