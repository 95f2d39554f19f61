"""One delivery, one transaction: the inbox row and the state change it causes commit together or not at all."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from service.app.change_feed import ChangeFeed
from service.app.credit_grants import apply_dodo_ledger_entry
from service.app.snapshots import apply_snapshot
from service.app.subject_gate import SubjectGate
from service.domain.catalog import Catalog
from service.domain.dodo_events import Event, EventData, Outcome, read_data
from service.domain.dodo_payloads import DodoLedgerEntry, DodoSubscription
from service.domain.errors import MalformedPayload
from storage.engine import Connection, Database
from storage.repositories.inbox import InboxRepository

log = logging.getLogger("entitlements.webhooks")


class _AlreadyStored(Exception):
    """Raised inside the transaction to roll back the work of a delivery whose webhook-id is already stored."""


class WebhookIngest:
    """The webhook use case: store and apply one delivery in one transaction. After the commit the changed
    customers are forgotten by this process's cache at once (other replicas learn it from the change feed)."""

    def __init__(self, db: Database, catalog: Catalog, changes: ChangeFeed, gate: SubjectGate | None = None) -> None:
        self.db = db
        self.catalog = catalog
        self.changes = changes
        self.gate = gate or SubjectGate(timeout=db.lock_timeout_ms / 1000)

    async def __call__(self, event: Event) -> Outcome:
        # Read before a connection is taken: a malformed delivery costs no transaction.
        content = read_data(event)
        # One delivery per subject at a time: a burst for one stuck subject waits here, holding no connection.
        async with self.gate.hold(_subject(content)):
            outcome, customers = await _ingest(self.db, self.catalog, event, content)
        self.changes.committed(*customers)
        log.info("webhook.%s", outcome.value, extra={"webhook_id": event.webhook_id, "type": event.type})
        return outcome


def _subject(content: EventData) -> str | None:
    """What a delivery locks in Postgres: its subscription, or the customer's credit account."""
    if isinstance(content, DodoSubscription):
        return f"subscription:{content.state.subscription_id}"
    if isinstance(content, DodoLedgerEntry):
        return f"credit:{content.customer_id}:{content.credit_entitlement_id}"
    return None


async def _ingest(db: Database, catalog: Catalog, event: Event, content: EventData) -> tuple[Outcome, tuple[str, ...]]:
    try:
        with _storable():
            async with db.tx() as connection:
                outcome, subject, customers = await _handle(connection, catalog, event, content)
                # Last, so the row goes in with its outcome in the same round trip; a twin delivery running
                # concurrently waits here on the unique index and then rolls its (identical) work back.
                stored = await InboxRepository(connection).record(
                    webhook_id=event.webhook_id,
                    event_type=event.type,
                    event_timestamp=event.timestamp,
                    business_id=event.business_id,
                    payload_json=event.text,
                    status=outcome.value,
                    subject_id=subject or None,
                )
                if not stored:
                    raise _AlreadyStored
    except _AlreadyStored:
        return Outcome.DUPLICATE, ()
    return outcome, customers


@contextmanager
def _storable() -> Iterator[None]:
    """Values Postgres refuses (a character or number it cannot hold: class 22; a value beyond one of its limits,
    such as an index entry over 2704 bytes: class 54) make the delivery malformed: 400, nothing stored; as a 500
    Dodo would retry it for a day and a half to the same end. The readers bound what they know of; this catches
    the rest."""
    try:
        yield
    except asyncpg.DataError as error:
        raise MalformedPayload(f"the event holds a value that cannot be stored ({error.sqlstate})") from None
    except asyncpg.PostgresError as error:
        if not str(error.sqlstate).startswith("54"):
            raise
        raise MalformedPayload(f"the event holds a value too large to store ({error.sqlstate})") from None


async def _handle(
    connection: Connection, catalog: Catalog, event: Event, content: EventData
) -> tuple[Outcome, str, tuple[str, ...]]:
    """(outcome, the inbox row's subject, the customers whose entitlements changed)."""
    if isinstance(content, DodoSubscription):
        result = await apply_snapshot(connection, catalog, content, event.timestamp)
        if not result.applied:
            moved = (result.current.customer_id,) if result.hold_moved else ()
            return Outcome.STALE, result.current.subscription_id, moved
        customers = {result.current.customer_id}
        if result.previous is not None:
            customers.add(result.previous.customer_id)
        return Outcome.APPLIED, result.current.subscription_id, tuple(customers)
    if isinstance(content, DodoLedgerEntry):
        outcome = Outcome(await apply_dodo_ledger_entry(connection, catalog, content))
        changed = (content.customer_id,) if outcome is Outcome.APPLIED else ()
        return outcome, content.entry_id, changed
    return content.outcome, content.subject_id, ()
