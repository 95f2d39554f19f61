"""CreatePortalSession: a link to Dodo's customer portal, where a customer manages payment methods, invoices and
their subscription themselves. The customer must be one this service has seen (a subscription or payment webhook
stored it): an unknown id or an unlinked ref is NOT_FOUND without asking Dodo."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.app.checkouts import check_url
from service.app.customers import Customers
from service.app.dodo_gateway import DodoGateway
from service.domain.errors import CustomerNotKnown, CustomerRefNotLinked
from storage.engine import Database
from storage.repositories.customers import customer_exists


@dataclass(frozen=True, slots=True)
class PortalSession:
    url: str
    expires_at: datetime


class PortalSessions:
    def __init__(self, db: Database, dodo: DodoGateway, customers: Customers) -> None:
        self.db = db
        self.dodo = dodo
        self.customers = customers

    async def open(
        self, *, customer_id: str = "", customer_ref: str = "", return_url: str = "", send_email: bool = False
    ) -> PortalSession:
        check_url("return_url", return_url)
        resolved = await self.customers.resolve(customer_id, customer_ref)
        if resolved is None:
            raise CustomerRefNotLinked(customer_ref)
        async with self.db.connection() as connection:
            known = await customer_exists(connection, resolved)
        if not known:
            raise CustomerNotKnown(resolved)
        url, expires_at = await self.dodo.create_portal_session(
            resolved, return_url=return_url or None, send_email=send_email
        )
        return PortalSession(url, expires_at)
