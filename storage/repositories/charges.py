"""All SQL about on-demand charges (CreateCharge intents and what Dodo said about them).

A charge's `status` only moves forward: sending / unknown (rank 0) -> pending (1) -> succeeded / failed (2, final).
A payment webhook or a read of Dodo's payments never moves a final charge, and an answer to our POST that arrives
after a webhook never moves it back.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from storage.engine import Connection


class ChargeState(enum.StrEnum):
    SENDING = "sending"  # the intent row: a POST is (or is about to be) in flight, within its lease
    PENDING = "pending"  # Dodo answered with a payment_id; no outcome yet
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"  # the POST's answer was lost: resolved from Dodo's payments before anything is resent


FINAL = frozenset({ChargeState.SUCCEEDED, ChargeState.FAILED})


@dataclass(frozen=True, slots=True)
class StoredCharge:
    charge_id: str
    caller: str
    idempotency_key: str
    fingerprint: str
    subscription_id: str
    amount: int
    currency: str
    description: str
    metadata: dict[str, str]
    status: ChargeState
    payment_id: str | None
    error_code: str | None
    error_message: str | None
    attempts: int
    created_at: datetime
    lease_expired: bool
    """Whether the last send's lease has run out (by Postgres' clock): no POST of it can still be in flight."""


@dataclass(frozen=True, slots=True)
class NewCharge:
    charge_id: str
    caller: str
    idempotency_key: str
    fingerprint: str
    subscription_id: str
    amount: int
    currency: str
    description: str
    metadata: Mapping[str, str]


_COLUMNS = """
    charge_id, caller, idempotency_key, fingerprint, subscription_id, amount, currency, description, metadata,
    status, payment_id, error_code, error_message, attempts, created_at,
    (lease_until IS NULL OR lease_until < now()) AS lease_expired
"""

# A status's rank: a write may only raise it (and never touch a final one).
_RANK = "CASE {0} WHEN 'pending' THEN 1 WHEN 'succeeded' THEN 2 WHEN 'failed' THEN 2 ELSE 0 END"


class ChargeRepository:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def claim(self, charge: NewCharge, *, lease: timedelta) -> tuple[StoredCharge, bool]:
        """The key's charge, and whether this call created it ('sending', leased, first attempt counted)."""
        row = await self.connection.fetchrow(
            f"""
            INSERT INTO charges (charge_id, caller, idempotency_key, fingerprint, subscription_id, amount, currency,
                                 description, metadata, status, lease_until, attempts)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, 'sending', now() + $10::interval, 1)
            ON CONFLICT (caller, idempotency_key) DO NOTHING
            RETURNING {_COLUMNS}
            """,
            charge.charge_id,
            charge.caller,
            charge.idempotency_key,
            charge.fingerprint,
            charge.subscription_id,
            charge.amount,
            charge.currency,
            charge.description,
            dict(charge.metadata),
            lease,
        )
        if row is not None:
            return _stored(row), True
        existing = await self.by_key(charge.caller, charge.idempotency_key)
        assert existing is not None  # the conflicting row; charges are never deleted while a key is claimed
        return existing, False

    async def by_id(self, charge_id: str, *, caller: str | None = None) -> StoredCharge | None:
        row = await self.connection.fetchrow(
            f"SELECT {_COLUMNS} FROM charges WHERE charge_id = $1 AND ($2::text IS NULL OR caller = $2)",
            charge_id,
            caller,
        )
        return _stored(row) if row is not None else None

    async def by_key(self, caller: str, key: str) -> StoredCharge | None:
        row = await self.connection.fetchrow(
            f"SELECT {_COLUMNS} FROM charges WHERE caller = $1 AND idempotency_key = $2", caller, key
        )
        return _stored(row) if row is not None else None

    async def take_for_resend(self, charge_id: str, *, attempts: int, lease: timedelta) -> StoredCharge | None:
        """Claim the right to POST an unresolved charge again: only once its last send's lease has run out, and
        only for the caller that saw `attempts` sends (so two concurrent retries never both send)."""
        row = await self.connection.fetchrow(
            f"""
            UPDATE charges SET status = 'sending', lease_until = now() + $3::interval, attempts = attempts + 1,
                               updated_at = now()
            WHERE charge_id = $1 AND status IN ('sending', 'unknown') AND attempts = $2
              AND (lease_until IS NULL OR lease_until < now())
            RETURNING {_COLUMNS}
            """,
            charge_id,
            attempts,
            lease,
        )
        return _stored(row) if row is not None else None

    async def mark_unknown(self, charge_id: str, *, error: str) -> None:
        """The POST may have reached Dodo. The lease stays: until it runs out the POST may still land."""
        await self.connection.execute(
            """
            UPDATE charges SET status = 'unknown', error_message = $2, updated_at = now()
            WHERE charge_id = $1 AND status = 'sending'
            """,
            charge_id,
            error[:500],
        )

    async def forget(self, charge_id: str) -> None:
        """Dodo provably never saw the first POST (not sent, refused as unknown, no API key): free the key."""
        await self.connection.execute(
            "DELETE FROM charges WHERE charge_id = $1 AND status = 'sending' AND attempts = 1", charge_id
        )

    async def advance(
        self,
        charge_id: str,
        status: ChargeState,
        *,
        payment_id: str | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> bool:
        """Move the charge forward to `status` (never backwards, never out of a final state); keep the first
        payment_id seen. Whether a row changed."""
        result = await self.connection.execute(
            f"""
            UPDATE charges
            SET status = CASE WHEN {_RANK.format("$2::text")} > {_RANK.format("status")}
                                OR (status IN ('sending', 'unknown') AND $2::text IN ('sending', 'unknown'))
                              THEN $2::text ELSE status END,
                payment_id = COALESCE(payment_id, $3),
                error_code = CASE WHEN $2::text = 'failed' THEN COALESCE($4, error_code) ELSE error_code END,
                error_message = CASE WHEN $2::text = 'failed' THEN COALESCE($5, error_message)
                                     ELSE error_message END,
                lease_until = CASE WHEN $2::text IN ('sending', 'unknown') THEN lease_until ELSE NULL END,
                updated_at = now()
            WHERE charge_id = $1 AND status NOT IN ('succeeded', 'failed')
              AND ({_RANK.format("$2::text")} > {_RANK.format("status")}
                   OR (payment_id IS NULL AND $3::text IS NOT NULL))
            """,
            charge_id,
            status.value,
            payment_id,
            error_code,
            error_message[:500] if error_message is not None else None,
        )
        return result != "UPDATE 0"

    async def apply_payment(
        self,
        *,
        charge_id: str | None,
        payment_id: str | None,
        status: ChargeState,
        error_code: str | None,
        error_message: str | None,
    ) -> str | None:
        """A payment webhook: the charge it names (our id in its metadata, else its payment_id) moves forward,
        in the webhook's own transaction. The charge_id that moved, or None."""
        target: str | None = None
        if charge_id:
            target = await self.connection.fetchval("SELECT charge_id FROM charges WHERE charge_id = $1", charge_id)
        if target is None and payment_id:
            target = await self.connection.fetchval(
                "SELECT charge_id FROM charges WHERE payment_id = $1 ORDER BY created_at LIMIT 1", payment_id
            )
        if target is None:
            return None
        moved = await self.advance(
            target, status, payment_id=payment_id, error_code=error_code, error_message=error_message
        )
        return target if moved else None

    async def unresolved(self, *, limit: int) -> list[StoredCharge]:
        """Charges whose outcome at Dodo is unknown (a lost answer, or a crashed sender past its lease)."""
        rows = await self.connection.fetch(
            f"""
            SELECT {_COLUMNS} FROM charges
            WHERE status = 'unknown' OR (status = 'sending' AND lease_until < now())
            ORDER BY updated_at LIMIT $1
            """,
            limit,
        )
        return [_stored(row) for row in rows]


def _stored(row: asyncpg.Record) -> StoredCharge:
    metadata = row["metadata"] or {}
    return StoredCharge(
        charge_id=row["charge_id"],
        caller=row["caller"],
        idempotency_key=row["idempotency_key"],
        fingerprint=row["fingerprint"],
        subscription_id=row["subscription_id"],
        amount=row["amount"],
        currency=row["currency"],
        description=row["description"],
        metadata={str(k): str(v) for k, v in dict(metadata).items()},
        status=ChargeState(row["status"]),
        payment_id=row["payment_id"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        attempts=row["attempts"],
        created_at=row["created_at"],
        lease_expired=bool(row["lease_expired"]),
    )
