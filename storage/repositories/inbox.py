"""The webhook inbox: one row per webhook-id, written in the same transaction as the state change."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import WebhookInbox


class InboxRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def claim(
        self,
        *,
        webhook_id: str,
        event_type: str,
        event_timestamp: datetime,
        business_id: str,
        payload: dict[str, Any],
    ) -> int | None:
        """Insert the delivery; None when this webhook-id was already stored (a concurrent twin waits here)."""
        statement = (
            insert(WebhookInbox)
            .values(
                webhook_id=webhook_id,
                event_type=event_type,
                event_timestamp=event_timestamp,
                business_id=business_id,
                payload=payload,
                status="received",
            )
            .on_conflict_do_nothing(index_elements=[WebhookInbox.webhook_id])
            .returning(WebhookInbox.id)
        )
        return await self.session.scalar(statement)

    async def finish(self, row_id: int, *, status: str, subject_id: str | None, error: str | None = None) -> None:
        await self.session.execute(
            update(WebhookInbox)
            .where(WebhookInbox.id == row_id)
            .values(status=status, subject_id=subject_id, error=error, processed_at=func.now())
        )

    async def status_of(self, webhook_id: str) -> str | None:
        return await self.session.scalar(select(WebhookInbox.status).where(WebhookInbox.webhook_id == webhook_id))
