"""The webhook inbox: one row per webhook-id, written in the same transaction as the state change."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from storage.engine import Connection


@dataclass(frozen=True, slots=True)
class InboxRow:
    """A delivery as the inbox stores it, with its outcome.

    `payload_json` is the body as received, JSON text that Postgres parses into the JSONB column: numbers keep
    every digit (no float, no 64-bit integer in between) and nothing is serialized twice. Text Postgres refuses
    (not JSON, NUL, a number beyond numeric) raises asyncpg.DataError."""

    webhook_id: str
    event_type: str
    event_timestamp: datetime
    business_id: str
    payload_json: str
    status: str
    subject_id: str | None

    def args(self) -> tuple[Any, ...]:
        """The values of `inbox_insert(first)`'s parameters, in order."""
        return (
            self.webhook_id,
            self.event_type,
            self.event_timestamp,
            self.business_id,
            self.payload_json,
            self.status,
            self.subject_id,
        )


def inbox_insert(first: int, *, when: str = "true") -> str:
    """The inbox INSERT with its parameters numbered from `first` (7 of them: `InboxRow.args()`), returning a row
    only when this webhook-id was not stored yet. Other writes embed it as a CTE (inserting only `when` their own
    write happened), so that the inbox row goes in with the state change in one round trip; a twin delivery
    running concurrently waits on the unique index until the first commits or aborts."""
    p = [f"${n}" for n in range(first, first + 7)]
    return f"""
    INSERT INTO webhook_inbox
        (webhook_id, event_type, event_timestamp, business_id, payload, status, subject_id, processed_at)
    SELECT {p[0]}::text, {p[1]}::text, {p[2]}::timestamptz, {p[3]}::text, {p[4]}::text::jsonb, {p[5]}::text,
           {p[6]}::text, now()
    WHERE {when}
    ON CONFLICT (webhook_id) DO NOTHING
    RETURNING id
    """


_RECORD = inbox_insert(1)


class InboxRepository:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def record(self, row: InboxRow) -> bool:
        """Store the delivery with its outcome; False when this webhook-id is already stored (the caller then rolls
        back whatever it did)."""
        inserted = await self.connection.fetchval(_RECORD, *row.args())
        return inserted is not None

    async def seen(self, webhook_id: str) -> bool:
        found = await self.connection.fetchval("SELECT 1 FROM webhook_inbox WHERE webhook_id = $1", webhook_id)
        return found is not None
