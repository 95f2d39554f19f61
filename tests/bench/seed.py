"""A fresh database per run, migrated with the service's own Alembic chain and seeded with COPY.

Every seeded customer has one active Pro subscription (a realistic Dodo payload, period running) and an
`ai_tokens` account holding a large balance made of one open-ended grant, with the matching `plan_grant` ledger row
and period-grant claim, so balance = sum(ledger) holds as the service maintains it.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tests.bench.common import (
    API_CALLS_ENTITLEMENT,
    CREDIT,
    PRO,
    RAW_UPDATE_CUSTOMER,
    customer_id,
    subscription_id,
)
from tests.support import load_event

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
SEED_BALANCE = Decimal(1_000_000_000)
RAW_UPDATE_BALANCE = Decimal(10) ** 15


def server_url() -> str:
    """TEST_DATABASE_URL's server (any database on it), else the machine's local Postgres."""
    url = os.environ.get("TEST_DATABASE_URL") or LOCAL_SERVER
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql"))


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def new_database_name() -> str:
    return f"entitlements_bench_{secrets.token_hex(4)}"


async def _admin(url: str) -> Any:
    try:
        return await asyncpg.connect(with_database(url, "postgres"))
    except asyncpg.InvalidCatalogNameError:
        return await asyncpg.connect(with_database(url, "template1"))


async def create_database(url: str, name: str) -> None:
    connection = await _admin(url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()


async def drop_database(url: str, name: str) -> None:
    connection = await _admin(url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


@dataclass(frozen=True)
class Seeded:
    customers: int
    seconds: float
    database_mb: float


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def subscription_payload(
    template: dict[str, Any], index: int, *, sub_id: str, created: datetime, period_start: datetime
) -> dict[str, Any]:
    """Dodo's Subscription object for customer `index`: the fixture with this customer's ids and a running period."""
    data = copy.copy(template)
    data["subscription_id"] = sub_id
    data["customer"] = {
        **template["customer"],
        "customer_id": customer_id(index),
        "email": f"customer{index}@example.com",
        "name": f"Customer {index}",
    }
    data["metadata"] = {"app_user_id": f"u_{index}"}
    data["created_at"] = _iso(created)
    data["previous_billing_date"] = _iso(period_start)
    data["next_billing_date"] = _iso(period_start + timedelta(days=30))
    data["expires_at"] = _iso(created + timedelta(days=3650))
    return data


def subscription_template() -> dict[str, Any]:
    data: dict[str, Any] = load_event("subscription_active")["data"]
    data["product_id"] = PRO
    data["status"] = "active"
    data["trial_period_days"] = 0
    data["cancel_at_next_billing_date"] = False
    return data


SUBSCRIPTION_COLUMNS = (
    "subscription_id",
    "customer_id",
    "product_id",
    "status",
    "quantity",
    "currency",
    "recurring_pre_tax_amount",
    "payment_frequency_count",
    "payment_frequency_interval",
    "trial_period_days",
    "dodo_created_at",
    "previous_billing_date",
    "next_billing_date",
    "cancel_at_next_billing_date",
    "credit_entitlement_cart",
    "addons",
    "metadata",
    "payload",
    "last_event_at",
)
LEDGER_COLUMNS = ("entry_id", "customer_id", "credit", "amount", "balance_after", "kind", "source", "description")


async def seed(url: str, customers: int) -> Seeded:
    started = time.perf_counter()
    now = datetime.now(UTC).replace(microsecond=0)
    created = now - timedelta(days=40)
    period_start = now - timedelta(days=10)
    template = subscription_template()
    # As the service stores the cart (storage.repositories.subscriptions): the fields the access rules read.
    cart = json.dumps(
        [{"credit_entitlement_id": API_CALLS_ENTITLEMENT, "overage_enabled": False, "overage_limit": None}]
    )
    customer_rows: list[tuple[Any, ...]] = []
    subscription_rows: list[tuple[Any, ...]] = []
    balance_rows: list[tuple[Any, ...]] = []
    ledger_rows: list[tuple[Any, ...]] = []
    period_rows: list[tuple[Any, ...]] = []
    balance_text = format(SEED_BALANCE, "f")
    for index in range(customers):
        cid, sid = customer_id(index), subscription_id(index)
        payload = subscription_payload(template, index, sub_id=sid, created=created, period_start=period_start)
        customer_rows.append((cid, payload["customer"]["email"], payload["customer"]["name"]))
        subscription_rows.append(
            (
                sid,
                cid,
                PRO,
                "active",
                1,
                "USD",
                2900,
                1,
                "Month",
                0,
                created,
                period_start,
                period_start + timedelta(days=30),
                False,
                cart,
                "[]",
                "{}",
                json.dumps(payload),
                period_start,
            )
        )
        source = f"{sid}@{period_start.isoformat()}"
        grants = json.dumps([{"grant_id": source, "remaining": balance_text, "expires_at": None, "source": source}])
        balance_rows.append((cid, CREDIT, SEED_BALANCE, grants))
        ledger_rows.append(
            (f"cle_{uuid.uuid4().hex}", cid, CREDIT, SEED_BALANCE, SEED_BALANCE, "plan_grant", source, "")
        )
        period_rows.append((sid, CREDIT, period_start, cid, SEED_BALANCE))
    balance_rows.append((RAW_UPDATE_CUSTOMER, CREDIT, RAW_UPDATE_BALANCE, "[]"))

    connection = await asyncpg.connect(url)
    try:
        async with connection.transaction():
            await connection.copy_records_to_table(
                "customers", records=customer_rows, columns=("customer_id", "email", "name")
            )
            await connection.copy_records_to_table(
                "subscriptions", records=subscription_rows, columns=SUBSCRIPTION_COLUMNS
            )
            await connection.copy_records_to_table(
                "credit_balances", records=balance_rows, columns=("customer_id", "credit", "balance", "grants")
            )
            await connection.copy_records_to_table("credit_ledger", records=ledger_rows, columns=LEDGER_COLUMNS)
            await connection.copy_records_to_table(
                "credit_period_grants",
                records=period_rows,
                columns=("subscription_id", "credit", "period_start", "customer_id", "amount"),
            )
        # Fresh statistics and a set visibility map, as a long-running database would have.
        await connection.execute("VACUUM ANALYZE")
        size = await connection.fetchval("SELECT pg_database_size(current_database())")
    finally:
        await connection.close()
    return Seeded(customers, time.perf_counter() - started, size / 1e6)
