"""All SQL about CreateCheckout idempotency records."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta

from service.domain.values import CheckoutSession
from storage.engine import Connection


class CheckoutClaim(enum.Enum):
    TAKEN = "taken"  # this attempt may open the session
    COMPLETED = "completed"  # the key's session exists: replay it
    OTHER_PARAMETERS = "other_parameters"
    IN_FLIGHT = "in_flight"  # another attempt holds the key's lease


@dataclass(frozen=True, slots=True)
class CheckoutRecord:
    fingerprint: str
    status: str
    session: CheckoutSession | None


_CLAIM = """
WITH new AS (
    INSERT INTO checkout_sessions (caller, idempotency_key, fingerprint, status, lease_until)
    VALUES ($1, $2, $3, 'sending', now() + $4::interval)
    ON CONFLICT DO NOTHING
    RETURNING 1
), taken AS (
    -- An attempt that died holding the lease left 'sending' behind: take it over once the lease ran out.
    UPDATE checkout_sessions SET lease_until = now() + $4::interval, updated_at = now()
    WHERE caller = $1 AND idempotency_key = $2 AND fingerprint = $3 AND status = 'sending'
      AND lease_until < now() AND NOT EXISTS (SELECT 1 FROM new)
    RETURNING 1
)
SELECT (SELECT count(*) FROM new) + (SELECT count(*) FROM taken) AS claimed, c.fingerprint, c.status,
       c.session_id, c.checkout_url, c.expires_at
FROM (SELECT 1) AS one
LEFT JOIN checkout_sessions AS c ON c.caller = $1 AND c.idempotency_key = $2
"""


class CheckoutRepository:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def claim(
        self, *, caller: str, key: str, fingerprint: str, lease: timedelta
    ) -> CheckoutClaim | CheckoutSession:
        """TAKEN, the stored session to replay, or why the key cannot be used now."""
        row = await self.connection.fetchrow(_CLAIM, caller, key, fingerprint, lease)
        assert row is not None
        if row["claimed"]:
            return CheckoutClaim.TAKEN
        if row["fingerprint"] is not None and row["fingerprint"] != fingerprint:
            return CheckoutClaim.OTHER_PARAMETERS
        if row["status"] == "created":
            return CheckoutSession(row["session_id"], row["checkout_url"], row["expires_at"])
        return CheckoutClaim.IN_FLIGHT

    async def complete(self, *, caller: str, key: str, session: CheckoutSession, customer_ref: str | None) -> None:
        await self.connection.execute(
            """
            UPDATE checkout_sessions
            SET status = 'created', lease_until = NULL, session_id = $3, checkout_url = $4, expires_at = $5,
                customer_ref = $6, updated_at = now()
            WHERE caller = $1 AND idempotency_key = $2
            """,
            caller,
            key,
            session.session_id,
            session.checkout_url,
            session.expires_at,
            customer_ref,
        )

    async def forget(self, *, caller: str, key: str) -> None:
        """Dodo opened no session (refused, or never reached): the key may be used again."""
        await self.connection.execute(
            "DELETE FROM checkout_sessions WHERE caller = $1 AND idempotency_key = $2 AND status = 'sending'",
            caller,
            key,
        )
