"""Reading everything about one customer that entitlement decisions need, in as few round trips as possible."""

from __future__ import annotations

from service.domain import CustomerEntitlements
from storage.engine import Connection
from storage.repositories.credits import CreditRepository
from storage.repositories.subscriptions import SubscriptionRepository


async def load_customer(connection: Connection, customer_id: str) -> CustomerEntitlements:
    subscriptions = await SubscriptionRepository(connection).for_customer(customer_id)
    accounts = await CreditRepository(connection).accounts(customer_id)
    return CustomerEntitlements(customer_id, tuple(subscriptions), accounts)
