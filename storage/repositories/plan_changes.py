"""All SQL about ChangePlan idempotency records, and the claim that serializes mutations of one subscription.

A record is keyed by (caller, idempotency_key). Its rows for one subscription double as the subscription's
mutation log: a record `sending` under a live lease, or `unknown` for less than one lease, means a mutation of
that subscription may be under way at Dodo, and no other may start. CancelSubscription and ResumeSubscription can
claim through the same `claim` (with a fingerprint that names their operation), so every Dodo mutation of one
subscription goes one at a time.
"""

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


class ClaimOutcome(enum.Enum):
    TAKEN = "taken"  # this attempt holds the key's lease now
    OTHER_PARAMETERS = "other_parameters"  # the key belongs to a different request
    COMPLETED = "completed"  # the key's request has been done: replay it
    KEY_IN_FLIGHT = "key_in_flight"  # another attempt with this key holds its lease
    SUBSCRIPTION_BUSY = "subscription_busy"  # another mutation of the subscription is in flight: nothing taken


@dataclass(frozen=True, slots=True)
class PlanChangeRecord:
    caller: str
    idempotency_key: str
    subscription_id: str
    fingerprint: str
    status: PlanChangeStatus
    attempts: int


@dataclass(frozen=True, slots=True)
class Claim:
    outcome: ClaimOutcome
    record: PlanChangeRecord
    """The key's record as it was before this attempt (for a new key: as just stored)."""


# Taken in the claim's transaction, so two claims for one subscription see each other's records: without it, two
# transactions with different keys would each find no other mutation in flight (neither had committed) and both
# call Dodo. Its own prefix, apart from the webhook writers' lock of the same id (storage/repositories/
# subscriptions.py), so a claim never waits behind a snapshot being applied.
_LOCK_SUBSCRIPTION = "SELECT pg_advisory_xact_lock(hashtextextended('subscription_mutation:' || $1, 0))"

_IN_FLIGHT = """
SELECT EXISTS (
    SELECT 1 FROM plan_change_requests
    WHERE subscription_id = $1 AND NOT (caller = $2 AND idempotency_key = $3)
      AND ((status = 'sending' AND lease_until > now()) OR (status = 'unknown' AND updated_at > now() - $4::interval))
)
"""


class PlanChangeRepository:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def claim(self, *, caller: str, key: str, subscription_id: str, fingerprint: str, lease: timedelta) -> Claim:
        """Take the key for one attempt at mutating `subscription_id`, unless the key cannot be taken (other
        parameters, done, another attempt holds it) or another mutation of the subscription is in flight.

        The caller's transaction must end soon after (it holds the subscription's lock): Dodo is called after it.
        A SUBSCRIPTION_BUSY claim should be rolled back, so a new key leaves no row behind."""
        await self.connection.execute(_LOCK_SUBSCRIPTION, subscription_id)
        # Stored, or found and row-locked, in one statement (a no-op update locks it): attempts with one key are
        # ordered by this lock whatever subscription they name, and a row deleted meanwhile by a refused attempt's
        # `forget` is simply inserted again.
        row = await self.connection.fetchrow(
            """
            INSERT INTO plan_change_requests (caller, idempotency_key, subscription_id, fingerprint, status)
            VALUES ($1, $2, $3, $4, 'new')
            ON CONFLICT (caller, idempotency_key) DO UPDATE SET caller = EXCLUDED.caller
            RETURNING *, (status = 'sending' AND lease_until IS NOT NULL AND lease_until >= now()) AS leased
            """,
            caller,
            key,
            subscription_id,
            fingerprint,
        )
        assert row is not None  # an upsert with DO UPDATE returns its row, inserted or found
        previous = _record(row)
        if previous.fingerprint != fingerprint:
            return Claim(ClaimOutcome.OTHER_PARAMETERS, previous)
        if previous.status is PlanChangeStatus.COMPLETED:
            return Claim(ClaimOutcome.COMPLETED, previous)
        if row["leased"]:
            return Claim(ClaimOutcome.KEY_IN_FLIGHT, previous)
        if await self.connection.fetchval(_IN_FLIGHT, subscription_id, caller, key, lease):
            return Claim(ClaimOutcome.SUBSCRIPTION_BUSY, previous)
        await self.connection.execute(
            """
            UPDATE plan_change_requests
            SET status = 'sending', lease_until = now() + $3, attempts = attempts + 1, updated_at = now()
            WHERE caller = $1 AND idempotency_key = $2
            """,
            caller,
            key,
            lease,
        )
        return Claim(ClaimOutcome.TAKEN, previous)

    async def finish(self, caller: str, key: str, status: PlanChangeStatus, error: str | None = None) -> None:
        await self.connection.execute(
            """
            UPDATE plan_change_requests SET status = $3, lease_until = NULL, last_error = $4, updated_at = now()
            WHERE caller = $1 AND idempotency_key = $2
            """,
            caller,
            key,
            status,
            error,
        )

    async def forget(self, caller: str, key: str) -> None:
        """A definite refusal: the key may be used again for a fresh attempt."""
        await self.connection.execute(
            "DELETE FROM plan_change_requests WHERE caller = $1 AND idempotency_key = $2", caller, key
        )


def _record(row: Any) -> PlanChangeRecord:
    return PlanChangeRecord(
        row["caller"],
        row["idempotency_key"],
        row["subscription_id"],
        row["fingerprint"],
        PlanChangeStatus(row["status"]),
        row["attempts"],
    )
