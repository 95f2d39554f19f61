"""RecordUsage and GetUsage (DESIGN §13): usage events recorded durably in our outbox before the answer, shipped to
Dodo's /events/ingest by the usage sender (service/app/usage_sender.py), and counted from our own store.

Every field is checked before anything is written (DESIGN §12): ids 1–255 printable characters, at most 50
properties, keys 1–40 characters, values scalar (string ≤ 500 characters of free text, a finite number, a bool),
timestamps within Dodo's window (at most 1 h old, at most 5 min ahead; unset means now), event ids distinct within
the request. One statement then inserts the whole request; an event id this customer already recorded counts as a
duplicate whatever its values (first write wins, nothing is sent again).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from service.app.customers import Customers
from service.domain import limits
from service.domain.access_rules import most_relevant
from service.domain.catalog import Catalog
from service.domain.clock import Clock
from service.domain.errors import CustomerNotKnown, CustomerRefNotLinked, InvalidField, quote
from service.domain.values import SubscriptionState
from storage.engine import Database
from storage.repositories.customers import customer_exists
from storage.repositories.subscriptions import SubscriptionRepository
from storage.repositories.usage import NewUsageEvent, Scalar, UsageRepository

MAX_EVENTS = 1000
"""Dodo's own limit per /events/ingest request, so one RecordUsage always fits one request."""
MAX_AGE = timedelta(hours=1)
MAX_AHEAD = timedelta(minutes=5)
DEFAULT_WINDOW = timedelta(days=30)
# Doubles hold every integer up to 2**53 exactly: those go to Dodo (and our sums) as JSON integers.
_EXACT_INT = 2**53


@dataclass(frozen=True, slots=True)
class UsageEventInput:
    """One event as the caller sent it. `properties` values are plain Python values: anything but str, a number
    or a bool (None for null, a dict, a list) is refused by the use case, naming the field."""

    event_id: str
    event_name: str
    timestamp: datetime | None = None
    properties: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RecordUsageRequest:
    events: Sequence[UsageEventInput]
    customer_id: str = ""
    customer_ref: str = ""


@dataclass(frozen=True, slots=True)
class RecordUsageResult:
    accepted: int
    duplicates: int


@dataclass(frozen=True, slots=True)
class UsageReport:
    count: int
    sums: dict[str, Decimal]
    delivery: dict[str, int]
    start: datetime
    end: datetime


class Usage:
    """The use case. `recorded` is set after every commit that added events: the sender waits on it."""

    def __init__(self, db: Database, catalog: Catalog, clock: Clock, customers: Customers) -> None:
        self.db = db
        self.catalog = catalog
        self.clock = clock
        self.customers = customers
        self.recorded = asyncio.Event()

    async def record(self, request: RecordUsageRequest) -> RecordUsageResult:
        now = self.clock()
        events = validate_events(request.events, now)
        resolved = await self.customers.resolve(request.customer_id, request.customer_ref)
        if resolved is None:
            raise CustomerRefNotLinked(request.customer_ref)
        async with self.db.tx() as connection:
            accepted = await UsageRepository(connection).insert(resolved, events)
        # After the commit: the sender must never find the event missing when woken.
        if accepted:
            self.recorded.set()
        return RecordUsageResult(accepted=accepted, duplicates=len(events) - accepted)

    async def report(
        self,
        *,
        customer_id: str = "",
        customer_ref: str = "",
        event_name: str,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> UsageReport:
        limits.check_id("event_name", event_name)
        resolved = await self.customers.resolve(customer_id, customer_ref)
        if resolved is None:
            raise CustomerRefNotLinked(customer_ref)
        now = self.clock()
        async with self.db.connection() as connection:
            repository = UsageRepository(connection)
            if not (await customer_exists(connection, resolved) or await repository.has_any(resolved)):
                raise CustomerNotKnown(resolved)
            if start is None or end is None:
                subs = await SubscriptionRepository(connection).for_customer(resolved)
                period_start, period_end = _default_period(subs, self.catalog, now)
                start = start or period_start
                end = end or period_end
            if end <= start:
                raise InvalidField("end", "end must be after start")
            figures = await repository.figures(resolved, event_name, start, end)
        return UsageReport(figures.count, figures.sums, figures.delivery, start, end)


def _default_period(subs: Sequence[SubscriptionState], catalog: Catalog, now: datetime) -> tuple[datetime, datetime]:
    """The current billing period of the customer's most relevant subscription, else the last 30 days (to now,
    plus the 5 minutes ahead that Dodo, and RecordUsage, allow)."""
    sub = most_relevant(subs, catalog, now)
    begins = sub.previous_billing_date if sub is not None else None
    ends = sub.next_billing_date if sub is not None else None
    if begins is not None and ends is not None and begins < ends:
        return begins, ends
    return now - DEFAULT_WINDOW, now + MAX_AHEAD


def validate_events(events: Sequence[UsageEventInput], now: datetime) -> list[NewUsageEvent]:
    """Every event checked (DESIGN §12 and Dodo's rules) before anything is written; the first break is
    INVALID_ARGUMENT naming its field (`events[3].timestamp`)."""
    if not events:
        raise InvalidField("events", "events must hold at least one event")
    if len(events) > MAX_EVENTS:
        raise InvalidField("events", f"events holds more than {MAX_EVENTS} events ({len(events)})")
    seen: dict[str, int] = {}
    checked: list[NewUsageEvent] = []
    for index, event in enumerate(events):
        where = f"events[{index}]"
        limits.check_id(f"{where}.event_id", event.event_id)
        limits.check_id(f"{where}.event_name", event.event_name)
        first = seen.setdefault(event.event_id, index)
        if first != index:
            raise InvalidField(
                f"{where}.event_id",
                f"event_id {quote(event.event_id)} is repeated in this request (events[{first}]): "
                "Dodo refuses the whole request",
            )
        occurred_at = now if event.timestamp is None else event.timestamp
        if occurred_at > now + MAX_AHEAD:
            raise InvalidField(f"{where}.timestamp", "timestamp is more than 5 minutes ahead of now")
        if occurred_at < now - MAX_AGE:
            raise InvalidField(f"{where}.timestamp", "timestamp is older than 1 hour (Dodo refuses it)")
        checked.append(NewUsageEvent(event.event_id, event.event_name, occurred_at, _properties(where, event)))
    return checked


def _properties(where: str, event: UsageEventInput) -> dict[str, Scalar]:
    name = f"{where}.properties"
    pairs = event.properties
    if len(pairs) > limits.MAX_METADATA_PAIRS:
        raise InvalidField(name, f"{name} has more than {limits.MAX_METADATA_PAIRS} entries ({len(pairs)})")
    checked: dict[str, Scalar] = {}
    for key, value in pairs.items():
        if not key:
            raise InvalidField(name, f"{name} keys must not be empty")
        limits.check_text(name, key, max_length=limits.MAX_METADATA_KEY)
        checked[key] = _scalar(name, key, value)
    return checked


def _scalar(name: str, key: str, value: object) -> Scalar:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        limits.check_text(name, value, max_length=limits.MAX_METADATA_VALUE)
        return value
    if isinstance(value, int | float):
        number = float(value)
        if not math.isfinite(number):
            raise InvalidField(name, f"{name}[{quote(key)}] must be a finite number")
        if number.is_integer() and abs(number) <= _EXACT_INT:
            return int(number)
        return number
    kind = "null" if value is None else "a list" if isinstance(value, list) else "an object"
    raise InvalidField(name, f"{name}[{quote(key)}] is {kind}: only strings, numbers and bools are allowed")
