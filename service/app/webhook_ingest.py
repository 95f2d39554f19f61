"""One delivery, one transaction: the inbox row and the state change it causes commit together or not at all."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg

from service.app.change_feed import ChangeFeed
from service.app.credit_grants import apply_dodo_ledger_entry
from service.app.snapshots import apply_snapshot
from service.domain.catalog import Catalog
from service.domain.dodo_events import CREDIT_LEDGER_EVENTS, SUBSCRIPTION_EVENTS, Event, Outcome
from service.domain.dodo_payloads import read_subscription
from service.domain.errors import MalformedPayload
from storage.engine import Connection, Database
from storage.repositories.inbox import InboxRepository

log = logging.getLogger("entitlements.webhooks")


class _AlreadyStored(Exception):
    """Raised inside the transaction to roll back the work of a delivery whose webhook-id is already stored."""


class WebhookIngest:
    """The webhook use case: store and apply one delivery in one transaction. After the commit the changed
    customers are forgotten by this process's cache at once (other replicas learn it from the change feed)."""

    def __init__(self, db: Database, catalog: Catalog, changes: ChangeFeed) -> None:
        self.db = db
        self.catalog = catalog
        self.changes = changes

    async def __call__(self, event: Event) -> Outcome:
        outcome, customers = await _ingest(self.db, self.catalog, event)
        self.changes.committed(*customers)
        log.info("webhook.%s", outcome.value, extra={"webhook_id": event.webhook_id, "type": event.type})
        return outcome


async def _ingest(db: Database, catalog: Catalog, event: Event) -> tuple[Outcome, tuple[str, ...]]:
    try:
        with _storable():
            async with db.tx() as connection:
                outcome, subject, customers = await _handle(connection, catalog, event)
                # Last, so the row goes in with its outcome in the same round trip; a twin delivery running
                # concurrently waits here on the unique index and then rolls its (identical) work back.
                stored = await InboxRepository(connection).record(
                    webhook_id=event.webhook_id,
                    event_type=event.type,
                    event_timestamp=event.timestamp,
                    business_id=event.business_id,
                    payload=event.body,
                    status=outcome.value,
                    subject_id=subject,
                )
                if not stored:
                    raise _AlreadyStored
    except _AlreadyStored:
        return Outcome.DUPLICATE, ()
    return outcome, customers


@contextmanager
def _storable() -> Iterator[None]:
    """Values Postgres refuses (a NUL character in text, a number beyond its column) make the delivery malformed:
    400, nothing stored; as a 500 Dodo would retry it for a day and a half to the same end."""
    try:
        yield
    except asyncpg.DataError as error:
        raise MalformedPayload(f"the event holds a value that cannot be stored ({error.sqlstate})") from None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


async def _handle(
    connection: Connection, catalog: Catalog, event: Event
) -> tuple[Outcome, str | None, tuple[str, ...]]:
    """(outcome, the inbox row's subject, the customers whose entitlements changed)."""
    family = event.type.split(".", 1)[0]
    if event.type in SUBSCRIPTION_EVENTS:
        result = await apply_snapshot(connection, catalog, read_subscription(event.data), event.timestamp)
        if not result.applied:
            moved = (result.current.customer_id,) if result.hold_moved else ()
            return Outcome.STALE, result.current.subscription_id, moved
        customers = {result.current.customer_id}
        if result.previous is not None:
            customers.add(result.previous.customer_id)
        return Outcome.APPLIED, result.current.subscription_id, tuple(customers)
    if event.type in CREDIT_LEDGER_EVENTS:
        outcome = Outcome(await apply_dodo_ledger_entry(connection, catalog, event.data))
        customer = _text(event.data.get("customer_id"))
        changed = (customer,) if outcome is Outcome.APPLIED and customer else ()
        return outcome, _text(event.data.get("id")), changed
    if family == "payment":
        return Outcome.RECORDED, _text(event.data.get("payment_id")), ()
    if family == "credit":
        return Outcome.RECORDED, _text(event.data.get("credit_entitlement_id")), ()
    return Outcome.IGNORED, None, ()
