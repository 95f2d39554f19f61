"""The webhook inbox: one row per webhook-id, written in the same transaction as the state change."""

from __future__ import annotations

from datetime import datetime

from storage.engine import Connection


class InboxRepository:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def record(
        self,
        *,
        webhook_id: str,
        event_type: str,
        event_timestamp: datetime,
        business_id: str,
        payload_json: str,
        status: str,
        subject_id: str | None,
    ) -> bool:
        """Store the delivery with its outcome; False when this webhook-id is already stored (the caller then rolls
        back whatever it did: a concurrent twin waits on the unique index until the first commits or aborts).

        `payload_json` is the body as received, JSON text that Postgres parses into the JSONB column: numbers keep
        every digit (no float, no 64-bit integer in between) and nothing is serialized twice. Text Postgres refuses
        (not JSON, NUL, a number beyond numeric) raises asyncpg.DataError."""
        inserted = await self.connection.fetchval(
            """
            INSERT INTO webhook_inbox
                (webhook_id, event_type, event_timestamp, business_id, payload, status, subject_id, processed_at)
            VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7, now())
            ON CONFLICT (webhook_id) DO NOTHING
            RETURNING id
            """,
            webhook_id,
            event_type,
            event_timestamp,
            business_id,
            payload_json,
            status,
            subject_id,
        )
        return inserted is not None

    async def seen(self, webhook_id: str) -> bool:
        found = await self.connection.fetchval("SELECT 1 FROM webhook_inbox WHERE webhook_id = $1", webhook_id)
        return found is not None
