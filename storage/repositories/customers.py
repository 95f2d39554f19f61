"""What entitlement decisions read about one customer, in one round trip and in as little memory as possible:
the CheckAccess cache holds one of these per customer (100k customers must fit in a few hundred MB)."""

from __future__ import annotations

import sys
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from service.domain.values import Account, CachedSubscription, CartCredit, CustomerEntitlements
from storage.engine import Connection
from storage.repositories.credits import account_from

_LOAD = """
SELECT
    (SELECT coalesce(json_agg(json_build_array(
                subscription_id, product_id, status, dodo_created_at, trial_period_days, next_billing_date,
                cancel_at_next_billing_date, past_due_ends_at, on_hold_since, last_event_at, credit_entitlement_cart
            ) ORDER BY dodo_created_at DESC), '[]')
     FROM subscriptions WHERE customer_id = $1)::text AS subscriptions,
    (SELECT coalesce(json_agg(json_build_array(credit, balance::text, grants)), '[]')
     FROM credit_balances WHERE customer_id = $1)::text AS accounts
"""


_LOAD_ACCOUNTS = """
SELECT coalesce(json_agg(json_build_array(credit, balance::text, grants)), '[]')::text
FROM credit_balances WHERE customer_id = $1
"""


async def load_accounts(connection: Connection, customer_id: str) -> dict[str, Account]:
    loaded = await connection.fetchval(_LOAD_ACCOUNTS, customer_id)
    return {item[0]: _account(customer_id, item) for item in orjson.loads(loaded)}


async def load_customer(connection: Connection, customer_id: str) -> CustomerEntitlements:
    row = await connection.fetchrow(_LOAD, customer_id)
    assert row is not None
    subscriptions = tuple(_subscription(item) for item in orjson.loads(row["subscriptions"]))
    accounts = {item[0]: _account(customer_id, item) for item in orjson.loads(row["accounts"])}
    return CustomerEntitlements(customer_id, subscriptions, accounts)


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _subscription(item: list[Any]) -> CachedSubscription:
    (sub_id, product, status, created, trial_days, next_billing, cancel, past_due_end, hold_since, last, cart) = item
    # Only what the access and credit rules read; low-cardinality strings are shared between customers.
    return CachedSubscription(
        subscription_id=sub_id,
        product_id=sys.intern(product),
        status=sys.intern(status),
        created_at=datetime.fromisoformat(created),
        trial_period_days=trial_days,
        next_billing_date=_time(next_billing),
        cancel_at_next_billing_date=cancel,
        past_due_ends_at=_time(past_due_end),
        on_hold_since=_time(hold_since),
        last_event_at=_time(last),
        credit_cart=tuple(
            CartCredit(
                sys.intern(c["credit_entitlement_id"]),
                bool(c["overage_enabled"]),
                None if c.get("overage_limit") is None else Decimal(c["overage_limit"]),
            )
            for c in cart
        ),
    )


def _account(customer_id: str, item: list[Any]) -> Account:
    credit, balance, grants = item
    return account_from(customer_id, credit, Decimal(balance), grants, expiring_only=True)


async def customer_exists(connection: Connection, customer_id: str) -> bool:
    """Whether a subscription or payment of this Dodo customer was ever stored here."""
    found = await connection.fetchval("SELECT 1 FROM customers WHERE customer_id = $1", customer_id)
    return found is not None
