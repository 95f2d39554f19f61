"""All SQL about ChangePlan idempotency records."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from storage.engine import Connection


class PlanChangeStatus(enum.StrEnum):
    NEW = "new"  # the key is stored, no attempt has claimed it yet
    SENDING = "sending"  # an attempt holds the lease (or died holding it: the lease runs out)
    UNKNOWN = "unknown"  # Dodo may have applied it (answer lost): the next attempt reads Dodo first
    COMPLETED = "completed"


@dataclass(frozen=True, slots=True)
class PlanChangeRecord:
    idempotency_key: str
    subscription_id: str
    fingerprint: str
    status: PlanChangeStatus
    attempts: int


class PlanChangeRepository:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def claim(
        self, *, key: str, subscription_id: str, fingerprint: str, lease: timedelta
    ) -> tuple[PlanChangeRecord | None, PlanChangeRecord]:
        """Take the key for one attempt. Returns (the record as it was before this attempt, or None when the key
        cannot be taken: completed, other parameters, or another attempt holds its lease; the record now)."""
        await self.connection.execute(
            """
            INSERT INTO plan_change_requests (idempotency_key, subscription_id, fingerprint, status)
            VALUES ($1, $2, $3, 'new') ON CONFLICT DO NOTHING
            """,
            key,
            subscription_id,
            fingerprint,
        )
        row = await self.connection.fetchrow(
            "SELECT * FROM plan_change_requests WHERE idempotency_key = $1 FOR UPDATE", key
        )
        previous = _record(row)
        if previous.fingerprint != fingerprint or previous.status is PlanChangeStatus.COMPLETED:
            return None, previous
        claimed = await self.connection.fetchval(
            """
            UPDATE plan_change_requests
            SET status = 'sending', lease_until = now() + $2, attempts = attempts + 1, updated_at = now()
            WHERE idempotency_key = $1 AND (status <> 'sending' OR lease_until IS NULL OR lease_until < now())
            RETURNING idempotency_key
            """,
            key,
            lease,
        )
        return (previous if claimed is not None else None), previous

    async def finish(self, key: str, status: PlanChangeStatus, error: str | None = None) -> None:
        await self.connection.execute(
            """
            UPDATE plan_change_requests SET status = $2, lease_until = NULL, last_error = $3, updated_at = now()
            WHERE idempotency_key = $1
            """,
            key,
            status,
            error,
        )

    async def forget(self, key: str) -> None:
        """A definite refusal: the key may be used again for a fresh attempt."""
        await self.connection.execute("DELETE FROM plan_change_requests WHERE idempotency_key = $1", key)


def _record(row: Any) -> PlanChangeRecord:
    return PlanChangeRecord(
        row["idempotency_key"],
        row["subscription_id"],
        row["fingerprint"],
        PlanChangeStatus(row["status"]),
        row["attempts"],
    )
