"""One delivery, one transaction: the inbox row and the state change it causes commit together or not at all."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from service.app.change_feed import ChangeFeed
from service.app.charges import apply_payment_webhook
from service.app.credit_grants import apply_dodo_ledger_entry
from service.app.customers import LinkedBy, link_ref
from service.app.metrics import Metrics
from service.app.snapshots import apply_snapshot
from service.app.subject_gate import SubjectGate
from service.domain.catalog import Catalog
from service.domain.dodo_events import Event, EventData, Outcome, read_data
from service.domain.dodo_payloads import DodoLedgerEntry, DodoSubscription, customer_ref_in
from service.domain.errors import MalformedPayload
from storage.engine import Connection, Database
from storage.repositories.inbox import InboxRepository, InboxRow

log = logging.getLogger("entitlements.webhooks")


class _AlreadyStored(Exception):
    """Raised inside the transaction to roll back the work of a delivery whose webhook-id is already stored."""


class WebhookIngest:
    """The webhook use case: store and apply one delivery in one transaction. After the commit the changed
    customers are forgotten by this process's cache at once (other replicas learn it from the change feed)."""

    def __init__(
        self,
        db: Database,
        catalog: Catalog,
        changes: ChangeFeed,
        *,
        gate: SubjectGate | None = None,
        metrics: Metrics | None = None,
        customer_ref_key: str = "customer_ref",
    ) -> None:
        self.db = db
        self.catalog = catalog
        self.changes = changes
        self.gate = gate or SubjectGate(timeout=db.lock_timeout_ms / 1000)
        self.metrics = metrics
        self.customer_ref_key = customer_ref_key

    async def __call__(self, event: Event) -> Outcome:
        # Read before a connection is taken: a malformed delivery costs no transaction.
        content = read_data(event)
        if isinstance(content, DodoSubscription) and self.catalog.plan(content.state.product_id) is None:
            self._unknown_product(event, content)
        # One delivery per subject at a time: a burst for one stuck subject waits here, holding no connection.
        async with self.gate.hold(_subject(content)):
            linking = _linking(event, content, self.customer_ref_key)
            outcome, customers = await _ingest(self.db, self.catalog, event, content, linking)
        self.changes.committed(*customers)
        if linking is not None and outcome is not Outcome.DUPLICATE:
            self.changes.refs_changed(linking[1])
        log.info("webhook.%s", outcome.value, extra={"webhook_id": event.webhook_id, "type": event.type})
        return outcome

    def _unknown_product(self, event: Event, content: DodoSubscription) -> None:
        # Stored and applied all the same (it is Dodo's truth), but its customer gets no plan features: a paying
        # customer denied because the catalog lags behind Dodo's products must be loud.
        product = content.state.product_id
        log.error(
            "webhook.unknown_product",
            extra={
                "webhook_id": event.webhook_id,
                "subscription_id": content.state.subscription_id,
                "product_id": product,
                "fix": f"add [plans.{product}] to the catalog (ENTITLEMENTS_CATALOG)",
            },
        )
        if self.metrics is not None:
            self.metrics.webhook_unknown_products.labels(product).inc()


def _subject(content: EventData) -> str | None:
    """What a delivery locks in Postgres: its subscription, or the customer's credit account."""
    if isinstance(content, DodoSubscription):
        return f"subscription:{content.state.subscription_id}"
    if isinstance(content, DodoLedgerEntry):
        return f"credit:{content.customer_id}:{content.credit_entitlement_id}"
    return None


def _linking(event: Event, content: EventData, key: str) -> tuple[str, str] | None:
    """The (customer_id, customer_ref) a subscription or payment event links, if its metadata carries a ref."""
    if isinstance(content, DodoSubscription) or event.type.startswith("payment."):
        return customer_ref_in(event.data, key)
    return None


async def _ingest(
    db: Database, catalog: Catalog, event: Event, content: EventData, linking: tuple[str, str] | None
) -> tuple[Outcome, tuple[str, ...]]:
    try:
        with _storable():
            async with db.tx() as connection:
                outcome, subject, customers, stored = await _handle(connection, catalog, event, content)
                if stored is False:
                    raise _AlreadyStored
                if linking is not None:
                    await link_ref(connection, linking[1], linking[0], linked_by=LinkedBy.WEBHOOK)
                if stored is None:
                    # Last, so the row goes in with its outcome in the same round trip; a twin delivery running
                    # concurrently waits here on the unique index and then rolls its (identical) work back.
                    stored = await InboxRepository(connection).record(_inbox_row(event, outcome, subject))
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


def _inbox_row(event: Event, outcome: Outcome, subject: str) -> InboxRow:
    return InboxRow(
        webhook_id=event.webhook_id,
        event_type=event.type,
        event_timestamp=event.timestamp,
        business_id=event.business_id,
        payload_json=event.text,
        status=outcome.value,
        subject_id=subject or None,
    )


async def _handle(
    connection: Connection, catalog: Catalog, event: Event, content: EventData
) -> tuple[Outcome, str, tuple[str, ...], bool | None]:
    """(outcome, the inbox row's subject, the customers whose entitlements changed, whether the inbox row went in
    with the state change: None when it is still to be recorded)."""
    if isinstance(content, DodoSubscription):
        subscription_id = content.state.subscription_id
        # An applied snapshot carries the inbox row in its own write statement: one round trip fewer.
        applied = _inbox_row(event, Outcome.APPLIED, subscription_id)
        result = await apply_snapshot(connection, catalog, content, event.timestamp, inbox=applied)
        if not result.applied:
            moved = (result.current.customer_id,) if result.hold_moved else ()
            return Outcome.STALE, result.current.subscription_id, moved, None
        customers = {result.current.customer_id}
        if result.previous is not None:
            customers.add(result.previous.customer_id)
        return Outcome.APPLIED, result.current.subscription_id, tuple(customers), result.inbox_stored
    if isinstance(content, DodoLedgerEntry):
        outcome = Outcome(await apply_dodo_ledger_entry(connection, catalog, content))
        changed = (content.customer_id,) if outcome is Outcome.APPLIED else ()
        return outcome, content.entry_id, changed, None
    if event.type.startswith("payment.") and await apply_payment_webhook(connection, event.type, event.data):
        # One of our on-demand charges moved (service/app/charges.py).
        return Outcome.APPLIED, content.subject_id, (), None
    return content.outcome, content.subject_id, (), None
