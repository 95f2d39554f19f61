"""All SQL about mirror batches (`credit_mirror_batches`): our consumptions of Dodo-linked credits on their way to
Dodo's ledger as one debit per batch (service/app/credit_mirror.py).

Batch life: `open` (ConsumeCredits adds to it, in its own transaction: `CreditRepository.save`) -> `sending`
(closed: its amount is final; a sender POSTs it with the batch id as idempotency key) -> `sent` (Dodo's entry id
stored) | `unknown` (Dodo answered 409: the debit exists but its id was lost; resolved from Dodo's ledger) | `debt`
(Dodo refused it: 400, insufficient balance there; sent again after the next Dodo credit). While a batch is
`sending` or `unknown`, `sent_at` is when a sender last claimed it: the claim is a lease, so replicas never send
the same batch at the same time; once `sent`, it is when Dodo confirmed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from storage.engine import Connection

ECHO_SLACK = timedelta(seconds=60)
"""Clock skew allowed between our `closed_at` and Dodo's `created_at` when a debit is matched to a batch."""

_COLUMNS = "batch_id, customer_id, credit, credit_entitlement_id, amount, status, dodo_entry_id, attempts, closed_at"

# Open batches old enough are closed; a batch a consumption is adding to right now (row locked) is skipped and
# closed on a later pass, so its amount is final once closed: every consumption that joined it has committed.
_CLOSE = """
UPDATE credit_mirror_batches AS b SET status = 'sending', closed_at = now(), sent_at = NULL
FROM (
    SELECT batch_id FROM credit_mirror_batches
    WHERE status = 'open' AND created_at <= now() - make_interval(secs => $1)
    FOR UPDATE SKIP LOCKED
) AS due
WHERE b.batch_id = due.batch_id
"""

_CLAIM = f"""
WITH picked AS (
    SELECT batch_id FROM credit_mirror_batches
    WHERE status = ANY($1::text[]) AND (sent_at IS NULL OR sent_at <= now() - make_interval(secs => $2))
    ORDER BY closed_at, batch_id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE credit_mirror_batches AS b SET attempts = b.attempts + 1, sent_at = now()
FROM picked WHERE b.batch_id = picked.batch_id
RETURNING {", ".join(f"b.{c.strip()}" for c in _COLUMNS.split(","))}
"""


@dataclass(frozen=True, slots=True)
class MirrorBatch:
    batch_id: str
    customer_id: str
    credit: str
    credit_entitlement_id: str
    amount: Decimal
    status: str
    dodo_entry_id: str | None
    attempts: int
    closed_at: datetime | None


def _batch(row: Any) -> MirrorBatch:
    return MirrorBatch(
        batch_id=row["batch_id"],
        customer_id=row["customer_id"],
        credit=row["credit"],
        credit_entitlement_id=row["credit_entitlement_id"],
        amount=row["amount"],
        status=row["status"],
        dodo_entry_id=row["dodo_entry_id"],
        attempts=row["attempts"],
        closed_at=row["closed_at"],
    )


class MirrorRepository:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def close_due(self, older_than_seconds: float) -> None:
        await self.connection.execute(_CLOSE, older_than_seconds)

    async def claim(self, statuses: Sequence[str], *, lease_seconds: float, limit: int) -> list[MirrorBatch]:
        """Lease up to `limit` batches in one of `statuses` whose last claim is older than the lease."""
        rows = await self.connection.fetch(_CLAIM, list(statuses), lease_seconds, limit)
        return sorted((_batch(r) for r in rows), key=lambda b: (b.closed_at is None, b.closed_at, b.batch_id))

    async def mark_sent(self, batch_id: str, dodo_entry_id: str) -> str | None:
        """Confirmed by Dodo under `dodo_entry_id`. The entry id an echo had stored before, if it was another one."""
        previous: str | None = await self.connection.fetchval(
            """
            WITH before AS (SELECT dodo_entry_id FROM credit_mirror_batches WHERE batch_id = $1 FOR UPDATE)
            UPDATE credit_mirror_batches SET status = 'sent', dodo_entry_id = $2, sent_at = now(), last_error = NULL
            WHERE batch_id = $1
            RETURNING (SELECT dodo_entry_id FROM before)
            """,
            batch_id,
            dodo_entry_id,
        )
        return previous if previous != dodo_entry_id else None

    async def mark(self, batch_id: str, status: str, error: str) -> None:
        await self.connection.execute(
            "UPDATE credit_mirror_batches SET status = $2, last_error = $3 WHERE batch_id = $1",
            batch_id,
            status,
            error[:1000],
        )

    async def release(self, batch_id: str, error: str) -> None:
        """Give the lease back (a failed attempt): the next pass, by any sender, may try again at once."""
        await self.connection.execute(
            "UPDATE credit_mirror_batches SET sent_at = NULL, last_error = $2 WHERE batch_id = $1",
            batch_id,
            error[:1000],
        )

    async def known_entry_ids(self, entry_ids: Sequence[str]) -> set[str]:
        rows = await self.connection.fetch(
            "SELECT dodo_entry_id FROM credit_mirror_batches WHERE dodo_entry_id = ANY($1::text[])", list(entry_ids)
        )
        return {r["dodo_entry_id"] for r in rows}

    # --- the webhook side (inside a delivery's transaction, after the account lock) ---------------------------

    async def by_entry_id(self, dodo_entry_id: str) -> MirrorBatch | None:
        row = await self.connection.fetchrow(
            f"SELECT {_COLUMNS} FROM credit_mirror_batches WHERE dodo_entry_id = $1", dodo_entry_id
        )
        return None if row is None else _batch(row)

    async def claim_echo(
        self, customer_id: str, credit: str, amount: Decimal, at: datetime, *, slack_seconds: float
    ) -> MirrorBatch | None:
        """The oldest batch of the account still waiting for its Dodo id (`sending` or `unknown`, no id yet) whose
        amount is `amount` and that was closed no later than `slack_seconds` after `at` (a debit cannot be
        created before we closed its batch, give or take clock skew): it takes the entry id `entry_id` later."""
        row = await self.connection.fetchrow(
            f"""
            SELECT {_COLUMNS} FROM credit_mirror_batches
            WHERE customer_id = $1 AND credit = $2 AND status IN ('sending', 'unknown') AND dodo_entry_id IS NULL
              AND amount = $3::numeric AND closed_at <= $4::timestamptz + make_interval(secs => $5::float8)
            ORDER BY closed_at, batch_id
            LIMIT 1
            FOR UPDATE
            """,
            customer_id,
            credit,
            amount,
            at,
            slack_seconds,
        )
        return None if row is None else _batch(row)

    async def attach_echo(self, batch_id: str, dodo_entry_id: str, *, resolved: bool) -> None:
        """Store the echo's entry id on its batch; an `unknown` batch is resolved by it (`resolved`)."""
        await self.connection.execute(
            """
            UPDATE credit_mirror_batches
            SET dodo_entry_id = $2, status = CASE WHEN $3 THEN 'sent' ELSE status END,
                sent_at = CASE WHEN $3 THEN now() ELSE sent_at END
            WHERE batch_id = $1
            """,
            batch_id,
            dodo_entry_id,
            resolved,
        )

    async def retry_debts(self, customer_id: str, credit: str) -> int:
        """Dodo's balance grew: debts of the account are sent again (same batch id, same key)."""
        result: str = await self.connection.execute(
            """
            UPDATE credit_mirror_batches SET status = 'sending', sent_at = NULL
            WHERE customer_id = $1 AND credit = $2 AND status = 'debt'
            """,
            customer_id,
            credit,
        )
        return int(result.split()[-1])

    async def pending(self) -> list[MirrorBatch]:
        """Every batch not yet confirmed by Dodo (for the reconcile report)."""
        rows = await self.connection.fetch(
            f"SELECT {_COLUMNS} FROM credit_mirror_batches WHERE status <> 'sent' ORDER BY created_at"
        )
        return [_batch(r) for r in rows]

    async def linked_balances(self, credits: Sequence[str]) -> list[tuple[str, str, Decimal, Decimal]]:
        """(customer_id, credit, our balance, what is not yet at Dodo: open, sending and debt batches) of every
        account of `credits` (an `unknown` batch landed at Dodo, per its 409)."""
        rows = await self.connection.fetch(
            """
            SELECT b.customer_id, b.credit, b.balance,
                   coalesce((SELECT sum(m.amount) FROM credit_mirror_batches AS m
                             WHERE m.customer_id = b.customer_id AND m.credit = b.credit
                               AND m.status IN ('open', 'sending', 'debt')), 0) AS unsent
            FROM credit_balances AS b WHERE b.credit = ANY($1::text[])
            ORDER BY b.customer_id, b.credit
            """,
            list(credits),
        )
        return [(r["customer_id"], r["credit"], r["balance"], r["unsent"]) for r in rows]
