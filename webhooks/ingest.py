"""One delivery, one transaction: the inbox row and the state change it causes commit together or not at all."""

from __future__ import annotations

import enum
import logging

from sqlalchemy.ext.asyncio import AsyncSession

from service.catalog import Catalog
from service.credit_grants import apply_dodo_ledger_entry
from service.snapshots import apply_snapshot
from storage.engine import Database
from storage.repositories.inbox import InboxRepository
from webhooks.events import CREDIT_LEDGER_EVENTS, SUBSCRIPTION_EVENTS, Event

log = logging.getLogger("entitlements.webhooks")


class Outcome(enum.StrEnum):
    APPLIED = "applied"
    STALE = "stale"
    RECORDED = "recorded"
    IGNORED = "ignored"
    DUPLICATE = "duplicate"
    # A Dodo credit ledger entry already applied under another webhook-id.
    DUPLICATE_ENTRY = "duplicate_entry"


async def ingest(db: Database, catalog: Catalog, event: Event) -> Outcome:
    async with db.transaction() as session:
        inbox = InboxRepository(session)
        row_id = await inbox.claim(
            webhook_id=event.webhook_id,
            event_type=event.type,
            event_timestamp=event.timestamp,
            business_id=event.business_id,
            payload=event.body,
        )
        if row_id is None:
            return Outcome.DUPLICATE
        outcome, subject = await _handle(session, catalog, event)
        await inbox.finish(row_id, status=outcome.value, subject_id=subject)
    log.info("webhook.%s", outcome.value, extra={"webhook_id": event.webhook_id, "type": event.type})
    return outcome


async def _handle(session: AsyncSession, catalog: Catalog, event: Event) -> tuple[Outcome, str | None]:
    family = event.type.split(".", 1)[0]
    if event.type in SUBSCRIPTION_EVENTS:
        result = await apply_snapshot(session, catalog, event.data, event.timestamp)
        return (Outcome.APPLIED if result.applied else Outcome.STALE), result.current.subscription_id
    if family == "payment":
        subject = event.data.get("payment_id")
        return Outcome.RECORDED, subject if isinstance(subject, str) else None
    if event.type in CREDIT_LEDGER_EVENTS:
        status = await apply_dodo_ledger_entry(session, catalog, event.data)
        return Outcome(status), event.data.get("id")
    if family == "credit":
        subject = event.data.get("credit_entitlement_id")
        return Outcome.RECORDED, subject if isinstance(subject, str) else None
    return Outcome.IGNORED, None
