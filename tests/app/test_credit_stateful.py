"""A hypothesis state machine over the credit rules of DESIGN §6, from outside the process boundary.

Random interleavings of Dodo ledger entries (credits, deductions, redeliveries under new webhook-ids), consumptions
(fresh keys, replays, keys reused with other parameters), billing periods moving (plan grants), the subscription
pausing and resuming, and the clock passing grant expiries. Every step goes through the real webhook receiver or the
real gRPC server over Postgres; a small independent model predicts every answer, and after every step:

- each account's stored balance equals the sum of its ledger, exactly;
- it never goes below minus its overage limit;
- its grants add up to the balance while positive (and to nothing in overage);
- CheckAccess reports the balance the model expects as of the clock.

The machine is synchronous, so each instance runs its own event loop (asyncio.Runner), its own service (fresh
caches) and its own Database, and truncates the tables when it starts.
"""

from __future__ import annotations

import asyncio
import copy
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Context, Decimal
from typing import Any

import aiohttp
import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text

from service.domain.catalog import EXAMPLE_CATALOG, Catalog, parse_catalog
from service.server import Running, start
from storage.engine import Database
from tests.support import (
    API_TOKEN,
    CUSTOMER_ID,
    PRO,
    TABLES,
    BearerToken,
    FakeClock,
    WebhookPoster,
    credit_ledger_event,
    error_info,
    iso,
    load_event,
    make_settings,
    stored_account,
    utc,
)

EXACT = Context(prec=100)
ZERO = Decimal(0)
CREATED = utc("2026-09-01T10:00:00Z")
START = CREATED + timedelta(minutes=5)
TRIAL_DAYS = 14
PERIOD = timedelta(days=30)
CREDITS = ("ai_tokens", "api_calls")
# Per credit: (granted each paid period, granted while trialing), both expiring at the period's end.
PLAN_GRANTS = {"ai_tokens": (Decimal(10000), Decimal(1000)), "api_calls": (Decimal(300), Decimal(100))}


def stateful_catalog() -> Catalog:
    """The example catalog, with Pro also granting the Dodo-linked `api_calls` each period: that account then holds
    expiring plan grants next to Dodo's never-expiring ones, so the burn order shows in its balance."""
    raw: dict[str, Any] = tomllib.loads(EXAMPLE_CATALOG.read_text())
    raw["plans"][PRO]["credits"]["api_calls"] = "300"
    raw["plans"][PRO]["trial_credits"]["api_calls"] = "100"
    return parse_catalog(raw, source="stateful")


CONSUMPTION_AMOUNTS = st.one_of(
    st.decimals(min_value=Decimal("0.01"), max_value=Decimal(3000), places=2),
    st.sampled_from([Decimal("0.1"), Decimal(25), Decimal(1000)]),
)
DODO_AMOUNTS = st.one_of(
    st.decimals(min_value=Decimal("0.01"), max_value=Decimal(2000), places=2).map(lambda d: format(d, "f")),
    st.integers(min_value=1, max_value=2000),
    st.integers(min_value=1, max_value=8000).map(lambda quarters: quarters / 4),  # floats exact in binary
)


def as_decimal(amount: str | int | float) -> Decimal:
    return Decimal(str(amount))


def text_of(value: Decimal) -> str:
    return "0" if value == 0 else format(value.normalize(EXACT), "f")


@dataclass
class ModelGrant:
    remaining: Decimal
    expires_at: datetime | None
    order: int


@dataclass
class ModelAccount:
    """An independent re-statement of §6: a balance, and grants burned soonest-expiry first (never-expiring last)."""

    balance: Decimal = ZERO
    grants: list[ModelGrant] = field(default_factory=list)

    def expire(self, at: datetime) -> None:
        for grant in [g for g in self.grants if g.expires_at is not None and g.expires_at <= at]:
            self.balance = EXACT.subtract(self.balance, grant.remaining)
            self.grants.remove(grant)

    def add(self, amount: Decimal, expires_at: datetime | None, order: int) -> None:
        self.balance = EXACT.add(self.balance, amount)
        granted = min(amount, max(self.balance, ZERO))  # overage is paid back first
        if granted > 0:
            self.grants.append(ModelGrant(granted, expires_at, order))

    def take(self, amount: Decimal) -> None:
        self.balance = EXACT.subtract(self.balance, amount)
        left = amount
        for grant in sorted(self.grants, key=lambda g: (g.expires_at is None, g.expires_at or START, g.order)):
            taken = min(grant.remaining, left)
            grant.remaining = EXACT.subtract(grant.remaining, taken)
            left = EXACT.subtract(left, taken)
        self.grants = [g for g in self.grants if g.remaining > 0]

    def effective(self, at: datetime) -> Decimal:
        expired = [g.remaining for g in self.grants if g.expires_at is not None and g.expires_at <= at]
        total = self.balance
        for remaining in expired:
            total = EXACT.subtract(total, remaining)
        return total


@dataclass(frozen=True)
class Used:
    credit: str
    amount: Decimal
    description: str
    entry_id: str
    balance_after: str


class CreditMachine(RuleBasedStateMachine):
    def __init__(self, database_url: str, catalog: Catalog) -> None:
        super().__init__()
        self.database_url = database_url
        self.catalog = catalog
        self.clock = FakeClock(START)
        self.runner = asyncio.Runner()
        self.running: Running | None = None
        self.channel: grpc.aio.Channel | None = None
        self.http: aiohttp.ClientSession | None = None
        self.ready = False
        self.accounts = {credit: ModelAccount() for credit in CREDITS}
        self.limits = {"ai_tokens": ZERO, "api_calls": Decimal(100)}
        self.used: dict[str, Used] = {}
        self.dodo_entries: list[str] = []
        self.granted_periods: set[datetime] = set()
        self.counter = 0
        self.status = "active"
        self.trial = False
        self.cart: list[dict[str, Any]] = []
        self.previous_billing = CREATED
        self.next_billing = CREATED + PERIOD
        self.last_event_at = START
        self.runner.run(self._start())

    async def _start(self) -> None:
        db = Database.from_url(self.database_url, pool_size=4)
        async with db.session() as session:
            await session.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
        self.running = await start(make_settings(self.database_url), clock=self.clock, catalog=self.catalog, db=db)
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{self.running.grpc_port}", interceptors=[BearerToken(API_TOKEN)]
        )
        self.stub: pb_grpc.EntitlementServiceAsyncStub = pb_grpc.EntitlementServiceStub(self.channel)
        self.http = aiohttp.ClientSession()
        self.webhooks = WebhookPoster(f"http://127.0.0.1:{self.running.http_port}/webhooks/dodo", self.http)

    def teardown(self) -> None:
        try:
            self.runner.run(self._stop())
        finally:
            self.runner.close()

    async def _stop(self) -> None:
        if self.http is not None:
            await self.http.close()
        if self.channel is not None:
            await self.channel.close()
        if self.running is not None:
            await self.running.stop(0)

    def next_id(self, prefix: str) -> str:
        return f"{prefix}{self.next_order()}"

    def next_order(self) -> int:
        self.counter += 1
        return self.counter

    # --- the subscription ------------------------------------------------------------------------------------------

    def grants_access(self, at: datetime) -> bool:
        return self.status == "active"

    def trialing(self, at: datetime) -> bool:
        return self.trial and at < CREATED + timedelta(days=TRIAL_DAYS)

    def deliver_snapshot(self, event_type: str) -> None:
        """A subscription webhook with the model's state; the plan grants what the period calls for, once."""
        at = max(self.clock.now, self.last_event_at + timedelta(seconds=1))
        self.clock.set(at)
        self.last_event_at = at
        body = copy.deepcopy(load_event("subscription_active"))
        body["type"] = event_type
        body["timestamp"] = iso(at)
        body["data"].update(
            status=self.status,
            created_at=iso(CREATED),
            trial_period_days=TRIAL_DAYS if self.trial else 0,
            previous_billing_date=iso(self.previous_billing),
            next_billing_date=iso(self.next_billing),
            credit_entitlement_cart=self.cart,
        )
        assert self.send(body) == "applied"
        if self.grants_access(at) and self.previous_billing not in self.granted_periods:
            self.granted_periods.add(self.previous_billing)
            for credit, (paid, trial) in PLAN_GRANTS.items():
                account = self.accounts[credit]
                account.expire(at)
                account.add(trial if self.trialing(at) else paid, self.next_billing, self.next_order())

    def send(self, body: dict[str, Any], webhook_id: str | None = None) -> str:
        status, answer = self.runner.run(self.webhooks.send(body, webhook_id=webhook_id))
        assert status == 200, answer
        result: str = answer["status"]
        return result

    @initialize(trial=st.booleans(), cart_overage=st.sampled_from([None, "500", 500]))
    def activate(self, trial: bool, cart_overage: str | int | None) -> None:
        self.trial = trial
        if trial:
            self.next_billing = CREATED + timedelta(days=TRIAL_DAYS)
        self.cart = copy.deepcopy(load_event("subscription_active")["data"]["credit_entitlement_cart"])
        if cart_overage is not None:
            self.cart[0].update(overage_enabled=True, overage_limit=cart_overage)
            self.limits["api_calls"] = Decimal(500)
        self.deliver_snapshot("subscription.active")
        self.ready = True

    @rule(late=st.integers(min_value=0, max_value=3 * 24 * 60))
    def move_to_the_next_billing_period(self, late: int) -> None:
        self.previous_billing = self.next_billing
        self.next_billing = self.previous_billing + PERIOD
        self.clock.set(max(self.clock.now, self.previous_billing + timedelta(minutes=late)))
        self.deliver_snapshot("subscription.renewed")

    @rule()
    def pause_or_resume(self) -> None:
        self.status = "paused" if self.status == "active" else "active"
        self.deliver_snapshot("subscription.paused" if self.status == "paused" else "subscription.unpaused")

    @rule(hours=st.integers(min_value=1, max_value=24 * 20))
    def advance_the_clock(self, hours: int) -> None:
        self.clock.advance(hours=hours)

    # --- Dodo's ledger ---------------------------------------------------------------------------------------------

    def dodo_event(self, entry_id: str, amount: str | int | float, *, is_credit: bool) -> dict[str, Any]:
        event_type = "credit.added" if is_credit else "credit.deducted"
        return credit_ledger_event(event_type, entry_id=entry_id, amount=amount, is_credit=is_credit, at=self.clock.now)

    @rule(amount=DODO_AMOUNTS)
    def dodo_adds_credits(self, amount: str | int | float) -> None:
        entry_id = self.next_id("cle_add_")
        assert self.send(self.dodo_event(entry_id, amount, is_credit=True), webhook_id=f"msg_{entry_id}") == "applied"
        self.dodo_entries.append(entry_id)
        account = self.accounts["api_calls"]
        account.expire(self.clock.now)
        account.add(as_decimal(amount), None, self.next_order())

    @rule(amount=DODO_AMOUNTS)
    def dodo_deducts_credits(self, amount: str | int | float) -> None:
        account = self.accounts["api_calls"]
        # Dodo enforces its own overage limit, so it never deducts past it.
        headroom = EXACT.add(account.effective(self.clock.now), self.limits["api_calls"])
        wanted = min(as_decimal(amount), headroom)
        if wanted <= 0:
            return
        entry_id = self.next_id("cle_ded_")
        event = self.dodo_event(entry_id, text_of(wanted), is_credit=False)
        assert self.send(event, webhook_id=f"msg_{entry_id}") == "applied"
        self.dodo_entries.append(entry_id)
        account.expire(self.clock.now)
        account.take(wanted)

    @precondition(lambda self: bool(self.dodo_entries))
    @rule(data=st.data())
    def dodo_redelivers_an_entry(self, data: st.DataObject) -> None:
        entry_id = data.draw(st.sampled_from(self.dodo_entries))
        event = self.dodo_event(entry_id, "999", is_credit=entry_id.startswith("cle_add_"))
        assert self.send(event, webhook_id=self.next_id("msg_again_")) == "duplicate_entry"
        assert self.send(event, webhook_id=f"msg_{entry_id}") == "duplicate"

    # --- ConsumeCredits --------------------------------------------------------------------------------------------

    def call(
        self, credit: str, amount: str, key: str, description: str
    ) -> pb.ConsumeCreditsResponse | grpc.aio.AioRpcError:
        request = pb.ConsumeCreditsRequest(
            customer_id=CUSTOMER_ID,
            credit=credit,
            amount=amount,
            idempotency_key=key,
            description=description,
            metadata={"source": "stateful"},
        )

        async def once() -> pb.ConsumeCreditsResponse | grpc.aio.AioRpcError:
            try:
                response: pb.ConsumeCreditsResponse = await self.stub.ConsumeCredits(request)
            except grpc.aio.AioRpcError as error:
                return error
            return response

        return self.runner.run(once())

    # One rule per credit: consumption is the operation under test, so it gets more of the steps.
    @rule(amount=CONSUMPTION_AMOUNTS, description=st.sampled_from(["", "chat"]))
    def consume_ai_tokens(self, amount: Decimal, description: str) -> None:
        self.consume("ai_tokens", amount, description)

    @rule(amount=CONSUMPTION_AMOUNTS, description=st.sampled_from(["", "chat"]))
    def consume_api_calls(self, amount: Decimal, description: str) -> None:
        self.consume("api_calls", amount, description)

    def consume(self, credit: str, amount: Decimal, description: str) -> None:
        key = self.next_id("key-")
        answer = self.call(credit, format(amount, "f"), key, description)
        now = self.clock.now
        account = self.accounts[credit]
        if not self.grants_access(now):
            assert isinstance(answer, grpc.aio.AioRpcError)
            assert answer.code() is grpc.StatusCode.PERMISSION_DENIED
            assert error_info(answer).reason == "ACCESS_REASON_SUBSCRIPTION_INACTIVE"
            return
        available = account.effective(now)
        if EXACT.subtract(available, amount) < -self.limits[credit]:
            assert isinstance(answer, grpc.aio.AioRpcError), (answer, available, amount)
            assert answer.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            info = error_info(answer)
            assert (info.reason, info.metadata["balance"]) == ("INSUFFICIENT_CREDITS", text_of(available))
            return
        assert isinstance(answer, pb.ConsumeCreditsResponse), (answer, available, amount)
        account.expire(now)
        account.take(amount)
        assert not answer.replayed
        assert answer.balance_after == text_of(account.balance)
        assert answer.overage_after == text_of(max(-account.balance, ZERO))
        assert answer.entry_id not in {used.entry_id for used in self.used.values()}
        self.used[key] = Used(credit, amount, description, answer.entry_id, answer.balance_after)

    @precondition(lambda self: bool(self.used))
    @rule(data=st.data(), respell=st.booleans())
    def replay_a_key_with_the_same_parameters(self, data: st.DataObject, respell: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.used)))
        used = self.used[key]
        amount = format(used.amount, "f")
        if respell:  # the same amount written differently is the same request
            amount = f"{amount}0" if "." in amount else f"{amount}.000"
        answer = self.call(used.credit, amount, key, used.description)
        assert isinstance(answer, pb.ConsumeCreditsResponse), answer
        assert (answer.entry_id, answer.balance_after, answer.replayed) == (used.entry_id, used.balance_after, True)

    @precondition(lambda self: bool(self.used))
    @rule(data=st.data(), change=st.sampled_from(["credit", "amount", "description"]))
    def reuse_a_key_with_other_parameters(self, data: st.DataObject, change: str) -> None:
        key = data.draw(st.sampled_from(sorted(self.used)))
        used = self.used[key]
        credit, amount, description = used.credit, used.amount, used.description
        if change == "credit":
            credit = "api_calls" if credit == "ai_tokens" else "ai_tokens"
        elif change == "amount":
            amount = EXACT.add(amount, Decimal("0.01"))
        else:
            description = f"{description}!"
        answer = self.call(credit, format(amount, "f"), key, description)
        assert isinstance(answer, grpc.aio.AioRpcError), answer
        assert answer.code() is grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(answer)
        assert (info.reason, info.metadata["entry_id"]) == ("IDEMPOTENCY_KEY_REUSED", used.entry_id)

    # --- invariants ------------------------------------------------------------------------------------------------

    @invariant()
    def every_balance_is_its_ledger_sum_within_the_overage_limit(self) -> None:
        if not self.ready:
            return
        assert self.running is not None
        for credit in CREDITS:
            stored = self.runner.run(stored_account(self.running.db, CUSTOMER_ID, credit))
            assert stored.balance == stored.ledger_sum, (credit, stored)
            assert stored.balance >= -self.limits[credit], (credit, stored)
            assert stored.grants_remaining == max(stored.balance, ZERO), (credit, stored)

    @invariant()
    def check_access_reports_the_expected_balance(self) -> None:
        if not self.ready:
            return
        for credit in CREDITS:
            response = self.runner.run(self._check(credit))
            assert response.balance == text_of(self.accounts[credit].effective(self.clock.now)), credit

    async def _check(self, credit: str) -> pb.CheckAccessResponse:
        response: pb.CheckAccessResponse = await self.stub.CheckAccess(
            pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature=credit)
        )
        return response

    @invariant()
    def each_used_key_has_exactly_one_ledger_row(self) -> None:
        if not self.ready:
            return
        assert self.running is not None
        rows = self.runner.run(self._keyed_rows(self.running.db))
        assert rows == {used.entry_id: key for key, used in self.used.items()}

    @staticmethod
    async def _keyed_rows(db: Database) -> dict[str, str]:
        async with db.session() as session:
            result = await session.execute(
                text("SELECT entry_id, idempotency_key FROM credit_ledger WHERE idempotency_key IS NOT NULL")
            )
            return {str(entry_id): str(key) for entry_id, key in result}


# Passing takes seconds; a failure is shrunk one fresh service per attempt, which needs more than the default timeout.
@pytest.mark.timeout(900)
def test_random_interleavings_keep_every_balance_equal_to_its_ledger_and_within_overage(database_url: str) -> None:
    catalog = stateful_catalog()

    class Machine(CreditMachine):
        def __init__(self) -> None:
            super().__init__(database_url, catalog)

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=12,
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
