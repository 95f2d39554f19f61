"""Customers by the company's own id (DESIGN §13): resolving `customer_id` / `customer_ref` and linking refs.

A ref is linked to a Dodo customer by CreateCheckout (the ref rides in the checkout's metadata), by any
subscription or payment webhook whose metadata carries it, or by LinkCustomer. Only LinkCustomer moves a ref that
is already linked to another customer; the others leave it and say so in the log.
"""

from __future__ import annotations

import enum
import logging

from service.app.change_feed import ChangeFeed
from service.app.entitlement_cache import EntitlementCache
from service.domain import limits
from service.domain.errors import InvalidField
from storage.engine import Connection, Database
from storage.repositories.customer_refs import CustomerRefRepository, Linked

log = logging.getLogger("entitlements.customers")


class LinkedBy(enum.StrEnum):
    CHECKOUT = "checkout"
    WEBHOOK = "webhook"
    LINK = "link"


def named_customer(customer_id: str, customer_ref: str) -> tuple[str, str]:
    """Exactly one of the two, within the id limits: (customer_id, "") or ("", customer_ref)."""
    if customer_id and customer_ref:
        raise InvalidField("customer_ref", "give customer_id or customer_ref, not both")
    if customer_ref:
        return "", limits.check_id("customer_ref", customer_ref)
    return limits.check_id("customer_id", customer_id), ""


class Customers:
    def __init__(self, db: Database, cache: EntitlementCache, changes: ChangeFeed) -> None:
        self.db = db
        self.cache = cache
        self.changes = changes

    async def resolve(self, customer_id: str, customer_ref: str) -> str | None:
        """The Dodo customer id a request names; None for a ref that is not linked (yet)."""
        customer_id, customer_ref = named_customer(customer_id, customer_ref)
        if customer_ref:
            return await self.cache.resolve_ref(customer_ref)
        return customer_id

    async def link(self, customer_ref: str, customer_id: str) -> Linked:
        """LinkCustomer: link the ref, moving it if it pointed at another customer (logged)."""
        limits.check_id("customer_ref", customer_ref)
        limits.check_id("customer_id", customer_id)
        async with self.db.tx() as connection:
            linked = await link_ref(connection, customer_ref, customer_id, linked_by=LinkedBy.LINK)
        self.changes.refs_changed(customer_ref)
        return linked


async def link_ref(connection: Connection, customer_ref: str, customer_id: str, *, linked_by: LinkedBy) -> Linked:
    """Link inside the caller's transaction. Only LinkCustomer moves a ref linked to another customer."""
    linked = await CustomerRefRepository(connection).link(
        customer_ref, customer_id, linked_by=linked_by.value, move=linked_by is LinkedBy.LINK
    )
    facts = {"customer_ref": customer_ref, "customer_id": customer_id, "linked_by": linked_by.value}
    if not linked.linked:
        log.warning("customer_ref.conflict", extra={**facts, "linked_to": linked.previous, "kept": "existing"})
    elif linked.previous is not None and linked.previous != customer_id:
        log.info("customer_ref.moved", extra={**facts, "from_customer_id": linked.previous})
    elif linked.previous is None:
        log.info("customer_ref.linked", extra=facts)
    return linked
