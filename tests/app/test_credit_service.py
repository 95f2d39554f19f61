"""Credits from outside (DESIGN §4, §6, §8): ConsumeCredits, CheckAccess/GetSubscription balances and
ListCreditLedger over the real gRPC server, with balances fed by signed Dodo webhooks and plan grants, on Postgres.

Error details are read the way another team's client would: the `grpc-status-details-bin` trailer decoded into a
google.rpc.Status whose details hold a google.rpc.ErrorInfo.
"""

from __future__ import annotations

import base64
import copy
import tomllib
from collections.abc import Awaitable
from datetime import timedelta
from decimal import Decimal
from typing import Any, TypeAlias

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from sqlalchemy import text

from service.domain.catalog import EXAMPLE_CATALOG, Catalog, parse_catalog
from storage.engine import Database
from tests.support import (
    API_CALLS_ENTITLEMENT,
    CUSTOMER_ID,
    PRO,
    STARTER,
    SUB_ID,
    FakeClock,
    WebhookPoster,
    credit_ledger_event,
    deliver,
    error_info,
    inbox_statuses,
    load_event,
    stored_account,
    subscription_event,
    utc,
)

Stub: TypeAlias = "pb_grpc.EntitlementServiceAsyncStub"

CREATED = utc("2026-09-01T10:15:02.481233Z")
ACTIVATED_AT = utc("2026-09-01T10:15:40.118204Z")
PERIOD_END = utc("2026-10-01T10:15:02.481233Z")
NEXT_PERIOD_END = utc("2026-11-01T10:15:02.481233Z")
TRIAL_END = CREATED + timedelta(days=14)
MICROSECOND = timedelta(microseconds=1)
OTHER_CUSTOMER = "cus_7Pq4Ws2Ed6Rf1Tg9Yh3Uj"
OTHER_SUB = "sub_3Lk8Jh2Gf6Ds1Aq9Zx4Cv"
UNKNOWN_CUSTOMER = "cus_0Zz9Yy8Xx7Ww6Vv5Uu4Tt"
ERROR_DOMAIN = "entitlements.v1"
# When the Dodo ledger entries of these tests were made: after activation, before the test clock's "now".
DODO_ENTRY_AT = utc("2026-09-05T12:00:00Z")
BIG = "12345678901234567890.123456789012345678"  # 20 + 18 digits: the most an amount may have


def lab_catalog() -> Catalog:
    """The example catalog plus what it lacks for two rules: a rollover credit, and trial credits of a Dodo-linked
    credit (an expiring plan grant next to Dodo's never-expiring ones)."""
    raw: dict[str, Any] = tomllib.loads(EXAMPLE_CATALOG.read_text())
    raw["credits"]["bonus_tokens"] = {"rollover": True}
    raw["plans"][PRO]["credits"]["bonus_tokens"] = "50"
    raw["plans"][PRO]["trial_credits"]["api_calls"] = "300"
    return parse_catalog(raw, source="lab")


WITH_LAB_CATALOG = pytest.mark.parametrize("catalog", [lab_catalog()], ids=["lab-catalog"])


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def consume_request(
    amount: str,
    key: str,
    *,
    credit: str = "ai_tokens",
    customer: str = CUSTOMER_ID,
    description: str = "",
    metadata: dict[str, str] | None = None,
) -> pb.ConsumeCreditsRequest:
    return pb.ConsumeCreditsRequest(
        customer_id=customer,
        credit=credit,
        amount=amount,
        idempotency_key=key,
        description=description,
        metadata=metadata or {},
    )


async def check(stub: Stub, credit: str = "ai_tokens", customer: str = CUSTOMER_ID) -> pb.CheckAccessResponse:
    return await stub.CheckAccess(pb.CheckAccessRequest(customer_id=customer, feature=credit))


async def balance(stub: Stub, credit: str = "ai_tokens", customer: str = CUSTOMER_ID) -> str:
    return (await check(stub, credit, customer)).balance


async def whole_ledger(
    stub: Stub, credit: str = "ai_tokens", customer: str = CUSTOMER_ID
) -> list[pb.CreditLedgerEntry]:
    page = await stub.ListCreditLedger(pb.ListCreditLedgerRequest(customer_id=customer, credit=credit))
    assert page.next_page_token == ""
    return list(page.entries)


async def activate(webhooks: WebhookPoster, **changes: Any) -> None:
    """The fixture's Pro subscription (its cart lists the Dodo entitlement behind `api_calls`), changed as asked."""
    await deliver(webhooks, subscription_event("subscription.active", timestamp=ACTIVATED_AT, **changes))


async def activate_other_customer(webhooks: WebhookPoster, **changes: Any) -> None:
    customer = copy.deepcopy(load_event("subscription_active")["data"]["customer"])
    customer.update(customer_id=OTHER_CUSTOMER, email="grace@example.com")
    await deliver(
        webhooks,
        subscription_event(
            "subscription.active", timestamp=ACTIVATED_AT, subscription_id=OTHER_SUB, customer=customer, **changes
        ),
    )


async def dodo_entry(
    webhooks: WebhookPoster,
    entry_id: str,
    amount: str | int | float,
    *,
    event_type: str = "credit.added",
    is_credit: bool = True,
    customer: str = CUSTOMER_ID,
    webhook_id: str | None = None,
    expect: str = "applied",
) -> None:
    event = credit_ledger_event(
        event_type, entry_id=entry_id, amount=amount, is_credit=is_credit, customer_id=customer, at=DODO_ENTRY_AT
    )
    assert await webhooks.send(event, webhook_id=webhook_id) == (200, {"status": expect})


def assert_error(error: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str, **metadata: str) -> dict[str, str]:
    assert error.code() is code, (error.code(), error.details())
    assert error.details()
    info = error_info(error)
    assert (info.reason, info.domain) == (reason, ERROR_DOMAIN)
    found = dict(info.metadata)
    assert {key: found.get(key) for key in metadata} == metadata
    return found


# --- INVALID_ARGUMENT -----------------------------------------------------------------------------------------------

MALFORMED_AMOUNTS = [
    "0",
    "0.00",
    "-5",
    "abc",
    "NaN",
    "Infinity",
    "1e400",
    "1e3",
    "",
    " 5",
    "+5",
    ".5",
    "5.",
    "1,5",
    "123456789012345678901",
    "0.0000000000000000001",
    "\uff15",
]


async def test_consume_refuses_amounts_that_are_not_positive_plain_decimals_and_changes_nothing(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    await activate(webhooks)
    for amount in MALFORMED_AMOUNTS:
        error = await rpc_error(stub.ConsumeCredits(consume_request(amount, "k1")))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, amount
        assert "amount" in (error.details() or ""), amount
    assert await balance(stub) == "10000"
    assert [e.kind for e in await whole_ledger(stub)] == ["plan_grant"]
    # A refused call records nothing, so its key is still free.
    assert (await stub.ConsumeCredits(consume_request("5", "k1"))).replayed is False


@pytest.mark.parametrize(
    "request_",
    [
        consume_request("5", ""),
        consume_request("5", "k1", customer=""),
        consume_request("5", "k1", credit=""),
        consume_request("5", "k1", credit="gold_coins"),
        consume_request("5", "k1", credit="dashboard"),
        consume_request("5", "k1", credit="projects"),
    ],
    ids=["no-key", "no-customer", "no-credit", "unknown-credit", "boolean-feature", "limit-feature"],
)
async def test_consume_refuses_a_request_without_key_customer_or_catalog_credit(
    webhooks: WebhookPoster, stub: Stub, request_: pb.ConsumeCreditsRequest
) -> None:
    await activate(webhooks)
    error = await rpc_error(stub.ConsumeCredits(request_))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details()
    assert await balance(stub) == "10000"


# --- PERMISSION_DENIED ----------------------------------------------------------------------------------------------


async def test_consume_without_any_subscription_is_denied_with_reason_no_subscription(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    # Dodo's ledger is mirrored whatever the subscriptions, but a balance alone gives no access.
    await dodo_entry(webhooks, "cle_orphan", "100")
    for credit in ("ai_tokens", "api_calls"):
        error = await rpc_error(stub.ConsumeCredits(consume_request("1", f"k-{credit}", credit=credit)))
        assert_error(error, grpc.StatusCode.PERMISSION_DENIED, "ACCESS_REASON_NO_SUBSCRIPTION")
    assert (await stored_account(db, CUSTOMER_ID, "api_calls")).balance == Decimal(100)
    assert [e.kind for e in await whole_ledger(stub, "api_calls")] == ["dodo_credit_added"]


async def test_consume_after_an_immediate_cancellation_is_denied_with_reason_subscription_inactive(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await activate(webhooks)
    await deliver(webhooks, load_event("subscription_cancelled"))
    clock.set("2026-09-21T00:00:00Z")
    error = await rpc_error(stub.ConsumeCredits(consume_request("1", "k1")))
    assert_error(error, grpc.StatusCode.PERMISSION_DENIED, "ACCESS_REASON_SUBSCRIPTION_INACTIVE")
    assert "ai_tokens" in (error.details() or "")
    response = await check(stub)
    assert (response.allowed, response.reason) == (False, pb.ACCESS_REASON_SUBSCRIPTION_INACTIVE)
    assert [e.kind for e in await whole_ledger(stub)] == ["plan_grant"]


async def test_consume_of_a_credit_the_plan_lacks_is_denied_with_reason_feature_not_in_plan(
    webhooks: WebhookPoster, stub: Stub
) -> None:
    await activate(webhooks, product_id=STARTER, credit_entitlement_cart=[])
    for credit in ("ai_tokens", "api_calls"):
        error = await rpc_error(stub.ConsumeCredits(consume_request("1", f"k-{credit}", credit=credit)))
        assert_error(error, grpc.StatusCode.PERMISSION_DENIED, "ACCESS_REASON_FEATURE_NOT_IN_PLAN")


async def test_a_credit_entitlement_cart_gives_access_to_its_dodo_credit_whatever_the_plan(
    webhooks: WebhookPoster, stub: Stub
) -> None:
    await activate(webhooks, product_id=STARTER)
    await dodo_entry(webhooks, "cle_starter", "10")
    response = await stub.ConsumeCredits(consume_request("4", "k1", credit="api_calls"))
    assert (response.balance_after, response.overage_after) == ("6", "0")
    error = await rpc_error(stub.ConsumeCredits(consume_request("1", "k2")))
    assert_error(error, grpc.StatusCode.PERMISSION_DENIED, "ACCESS_REASON_FEATURE_NOT_IN_PLAN")


# --- RESOURCE_EXHAUSTED ---------------------------------------------------------------------------------------------


async def test_consume_beyond_the_balance_is_resource_exhausted_naming_the_balance_and_changes_nothing(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    await activate(webhooks)
    error = await rpc_error(stub.ConsumeCredits(consume_request("10000.000000000000000001", "k1")))
    assert_error(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_CREDITS", balance="10000")
    assert [e.kind for e in await whole_ledger(stub)] == ["plan_grant"]
    assert (await stored_account(db, CUSTOMER_ID, "ai_tokens")).balance == Decimal(10000)

    # The refused attempt recorded no key: the same key may now take exactly the whole balance.
    spent = await stub.ConsumeCredits(consume_request("10000", "k1"))
    assert (spent.balance_after, spent.overage_after, spent.replayed) == ("0", "0", False)
    exhausted = await check(stub)
    assert (exhausted.allowed, exhausted.reason, exhausted.balance) == (False, pb.ACCESS_REASON_CREDITS_EXHAUSTED, "0")
    error = await rpc_error(stub.ConsumeCredits(consume_request("0.000000000000000001", "k2")))
    assert_error(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_CREDITS", balance="0")


# --- idempotency ----------------------------------------------------------------------------------------------------


async def test_a_repeated_key_with_the_same_parameters_returns_the_original_result_and_changes_nothing(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    await activate(webhooks)
    request = consume_request("25", "order-1", description="chat", metadata={"model": "m1", "user": "u1"})
    first = await stub.ConsumeCredits(request)
    await stub.ConsumeCredits(consume_request("100", "order-2"))
    again = await stub.ConsumeCredits(request)
    same_value = await stub.ConsumeCredits(
        consume_request("25.000", "order-1", description="chat", metadata={"user": "u1", "model": "m1"})
    )
    assert (first.balance_after, first.overage_after, first.replayed) == ("9975", "0", False)
    for replay in (again, same_value):
        assert (replay.entry_id, replay.balance_after, replay.overage_after, replay.replayed) == (
            first.entry_id,
            "9975",
            "0",
            True,
        )
    assert await balance(stub) == "9875"
    assert [e.kind for e in await whole_ledger(stub)] == ["consumption", "consumption", "plan_grant"]
    account = await stored_account(db, CUSTOMER_ID, "ai_tokens")
    assert (account.balance, account.ledger_sum, account.ledger_rows) == (Decimal(9875), Decimal(9875), 3)


@pytest.mark.parametrize(
    "reuse",
    [
        consume_request("26", "order-1", description="chat", metadata={"model": "m1"}),
        consume_request("25", "order-1", description="other", metadata={"model": "m1"}),
        consume_request("25", "order-1", description="chat", metadata={"model": "m2"}),
        consume_request("25", "order-1", description="chat"),
        consume_request("25", "order-1", description="chat", metadata={"model": "m1"}, credit="api_calls"),
    ],
    ids=["amount", "description", "metadata-value", "metadata-missing", "credit"],
)
async def test_a_repeated_key_with_other_parameters_is_refused_as_idempotency_key_reused(
    webhooks: WebhookPoster, stub: Stub, db: Database, reuse: pb.ConsumeCreditsRequest
) -> None:
    await activate(webhooks)
    await dodo_entry(webhooks, "cle_reuse", "1000")
    first = await stub.ConsumeCredits(consume_request("25", "order-1", description="chat", metadata={"model": "m1"}))
    error = await rpc_error(stub.ConsumeCredits(reuse))
    assert_error(error, grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED", entry_id=first.entry_id)
    assert (await balance(stub), await balance(stub, "api_calls")) == ("9975", "1000")


async def test_idempotency_keys_belong_to_one_customer(webhooks: WebhookPoster, stub: Stub) -> None:
    await activate(webhooks)
    await activate_other_customer(webhooks)
    mine = await stub.ConsumeCredits(consume_request("10", "shared-key"))
    theirs = await stub.ConsumeCredits(consume_request("30", "shared-key", customer=OTHER_CUSTOMER))
    assert theirs.entry_id != mine.entry_id
    assert (mine.replayed, theirs.replayed) == (False, False)
    assert (await balance(stub), await balance(stub, customer=OTHER_CUSTOMER)) == ("9990", "9970")


async def test_a_replay_answers_the_original_result_even_after_access_is_lost(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await activate(webhooks)
    first = await stub.ConsumeCredits(consume_request("5", "k1"))
    await deliver(webhooks, load_event("subscription_cancelled"))
    clock.set("2026-09-21T00:00:00Z")
    replay = await stub.ConsumeCredits(consume_request("5", "k1"))
    assert (replay.entry_id, replay.balance_after, replay.replayed) == (first.entry_id, "9995", True)


async def test_a_replay_or_a_reused_key_after_the_period_ended_writes_nothing(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock, db: Database
) -> None:
    await activate(webhooks)
    first = await stub.ConsumeCredits(consume_request("5", "k1"))
    clock.set(PERIOD_END + timedelta(days=1))  # the grant has expired, but nothing has written that down yet
    replay = await stub.ConsumeCredits(consume_request("5", "k1"))
    assert (replay.entry_id, replay.balance_after, replay.replayed) == (first.entry_id, "9995", True)
    error = await rpc_error(stub.ConsumeCredits(consume_request("6", "k1")))
    assert_error(error, grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED", entry_id=first.entry_id)
    # Read from the table itself: reading the ledger through the API writes the due expiry down (its own test).
    async with db.connection() as connection:
        kinds = [r["kind"] for r in await connection.fetch("SELECT kind FROM credit_ledger ORDER BY id DESC")]
    assert kinds == ["consumption", "plan_grant"]
    assert (await stored_account(db, CUSTOMER_ID, "ai_tokens")).balance == Decimal(9995)


# --- overage --------------------------------------------------------------------------------------------------------


async def test_catalog_overage_lets_a_dodo_credit_go_down_to_minus_its_limit_and_no_further(
    webhooks: WebhookPoster, stub: Stub
) -> None:
    await activate(webhooks)  # the fixture's cart has overage disabled: the catalog's 100 applies
    await dodo_entry(webhooks, "cle_grant", "1000")
    into = await stub.ConsumeCredits(consume_request("1050", "k1", credit="api_calls"))
    assert (into.balance_after, into.overage_after) == ("-50", "50")
    assert (await check(stub, "api_calls")).allowed
    floor = await stub.ConsumeCredits(consume_request("50", "k2", credit="api_calls"))
    assert (floor.balance_after, floor.overage_after) == ("-100", "100")
    error = await rpc_error(stub.ConsumeCredits(consume_request("0.000000000000000001", "k3", credit="api_calls")))
    assert_error(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_CREDITS", balance="-100")
    exhausted = await check(stub, "api_calls")
    assert (exhausted.allowed, exhausted.reason, exhausted.balance) == (
        False,
        pb.ACCESS_REASON_CREDITS_EXHAUSTED,
        "-100",
    )


async def test_a_plan_credit_without_overage_never_goes_below_zero(webhooks: WebhookPoster, stub: Stub) -> None:
    await activate(webhooks)
    error = await rpc_error(stub.ConsumeCredits(consume_request("10001", "k1")))
    assert_error(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_CREDITS", balance="10000")


@pytest.mark.parametrize("limit", ["500", 500], ids=["decimal-string", "number"])
async def test_dodo_cart_overage_raises_the_limit_of_its_credit(
    webhooks: WebhookPoster, stub: Stub, limit: str | int
) -> None:
    cart = copy.deepcopy(load_event("subscription_active")["data"]["credit_entitlement_cart"])
    cart[0].update(overage_enabled=True, overage_limit=limit)
    await activate(webhooks, credit_entitlement_cart=cart)
    await dodo_entry(webhooks, "cle_grant", "1000")
    deep = await stub.ConsumeCredits(consume_request("1400", "k1", credit="api_calls"))
    assert (deep.balance_after, deep.overage_after) == ("-400", "400")
    error = await rpc_error(stub.ConsumeCredits(consume_request("100.5", "k2", credit="api_calls")))
    assert_error(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_CREDITS", balance="-400")
    floor = await stub.ConsumeCredits(consume_request("100", "k3", credit="api_calls"))
    assert (floor.balance_after, floor.overage_after) == ("-500", "500")


async def test_credits_added_during_overage_pay_it_back_first(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    await activate(webhooks)
    await dodo_entry(webhooks, "cle_grant", "20")
    await stub.ConsumeCredits(consume_request("100", "k1", credit="api_calls"))
    await dodo_entry(webhooks, "cle_topup_small", "30")
    assert await balance(stub, "api_calls") == "-50"
    await dodo_entry(webhooks, "cle_topup", "80")
    assert await balance(stub, "api_calls") == "30"
    account = await stored_account(db, CUSTOMER_ID, "api_calls")
    assert (account.balance, account.grants_remaining, account.ledger_sum) == (Decimal(30), Decimal(30), Decimal(30))


# --- plan grants, burn order, expiry ---------------------------------------------------------------------------------


async def test_plan_grant_is_given_once_per_period_and_again_when_previous_billing_date_moves(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock, db: Database
) -> None:
    await activate(webhooks)
    await stub.ConsumeCredits(consume_request("2500", "k1"))
    # Later snapshots of the same period (another event type, a redelivery under a new webhook-id) grant nothing.
    await deliver(webhooks, subscription_event("subscription.updated", timestamp=ACTIVATED_AT + timedelta(hours=1)))
    await deliver(webhooks, subscription_event("subscription.active", timestamp=ACTIVATED_AT + timedelta(hours=2)))
    assert await balance(stub) == "7500"

    clock.set(PERIOD_END + timedelta(minutes=5))
    renewed = subscription_event(
        "subscription.renewed",
        timestamp=PERIOD_END + timedelta(minutes=1),
        previous_billing_date=PERIOD_END,
        next_billing_date=NEXT_PERIOD_END,
    )
    await deliver(webhooks, renewed)
    assert await balance(stub) == "10000"  # the new period's grant; the old one's 7500 expired at its end
    assert [(e.kind, e.amount) for e in await whole_ledger(stub)] == [
        ("plan_grant", "10000"),
        ("grant_expiry", "-7500"),
        ("consumption", "-2500"),
        ("plan_grant", "10000"),
    ]
    async with db.session() as session:
        periods = (await session.execute(text("SELECT period_start FROM credit_period_grants ORDER BY 1"))).scalars()
        assert list(periods) == [CREATED, PERIOD_END]


async def test_no_plan_grant_while_the_subscription_does_not_grant_access(webhooks: WebhookPoster, stub: Stub) -> None:
    await deliver(webhooks, subscription_event("subscription.updated", timestamp=ACTIVATED_AT, status="pending"))
    pending = await check(stub)
    assert (pending.allowed, pending.reason, pending.balance) == (False, pb.ACCESS_REASON_SUBSCRIPTION_INACTIVE, "0")
    assert await whole_ledger(stub) == []
    await deliver(webhooks, subscription_event("subscription.active", timestamp=ACTIVATED_AT + timedelta(minutes=1)))
    assert await balance(stub) == "10000"


async def test_a_trialing_subscription_gets_trial_credits_then_plan_credits_from_its_first_paid_period(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await activate(webhooks, trial_period_days=14, next_billing_date=TRIAL_END)
    trialing = await check(stub)
    assert (trialing.allowed, trialing.reason, trialing.balance) == (True, pb.ACCESS_REASON_TRIALING, "1000")

    clock.set(TRIAL_END + timedelta(minutes=5))
    paid = subscription_event(
        "subscription.renewed",
        timestamp=TRIAL_END + timedelta(minutes=1),
        trial_period_days=14,
        previous_billing_date=TRIAL_END,
        next_billing_date=TRIAL_END + timedelta(days=30),
    )
    await deliver(webhooks, paid)
    active = await check(stub)
    assert (active.reason, active.balance) == (pb.ACCESS_REASON_ACTIVE, "10000")
    assert [(e.kind, e.amount) for e in await whole_ledger(stub)] == [
        ("plan_grant", "10000"),
        ("grant_expiry", "-1000"),
        ("plan_grant", "1000"),
    ]


async def test_plan_credits_expire_at_next_billing_date(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock, db: Database
) -> None:
    await activate(webhooks)
    await stub.ConsumeCredits(consume_request("2500", "k1"))
    clock.set(PERIOD_END - MICROSECOND)
    assert (await check(stub)).balance == "7500"

    clock.set(PERIOD_END)
    expired = await check(stub)
    assert (expired.allowed, expired.reason, expired.balance) == (False, pb.ACCESS_REASON_CREDITS_EXHAUSTED, "0")
    view = await stub.GetSubscription(pb.GetSubscriptionRequest(customer_id=CUSTOMER_ID))
    assert view.subscription.credits["ai_tokens"] == "0"
    error = await rpc_error(stub.ConsumeCredits(consume_request("1", "k2")))
    assert_error(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_CREDITS", balance="0")
    # A refused consumption writes nothing down, not even the expiry it computed.
    account = await stored_account(db, CUSTOMER_ID, "ai_tokens")
    assert (account.balance, account.ledger_rows) == (Decimal(7500), 2)


@WITH_LAB_CATALOG
async def test_consumption_burns_an_earlier_expiring_trial_grant_before_a_never_expiring_dodo_grant(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await activate(webhooks, trial_period_days=14, next_billing_date=TRIAL_END)
    await dodo_entry(webhooks, "cle_rollover", "500")
    assert await balance(stub, "api_calls") == "800"
    await stub.ConsumeCredits(consume_request("400", "k1", credit="api_calls"))
    clock.set(TRIAL_END)
    # Trial grant (300, expiring) went first, then 100 of Dodo's: 400 of Dodo's survive the trial's end.
    assert await balance(stub, "api_calls") == "400"


@WITH_LAB_CATALOG
async def test_rollover_plan_credits_outlive_their_period(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await activate(webhooks)
    clock.set(PERIOD_END + timedelta(days=3))
    assert (await balance(stub, "ai_tokens"), await balance(stub, "bonus_tokens")) == ("0", "50")
    renewed = subscription_event(
        "subscription.renewed",
        timestamp=PERIOD_END + timedelta(minutes=1),
        previous_billing_date=PERIOD_END,
        next_billing_date=NEXT_PERIOD_END,
    )
    await deliver(webhooks, renewed)
    assert (await balance(stub, "ai_tokens"), await balance(stub, "bonus_tokens")) == ("10000", "100")


# --- Dodo's credit ledger -------------------------------------------------------------------------------------------


async def test_a_dodo_ledger_entry_is_applied_once_per_entry_id_whatever_webhook_id_carries_it(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    await activate(webhooks)
    added = load_event("credit_added")
    entry_id = added["data"]["id"]
    assert await webhooks.send(added, webhook_id="msg_added_1") == (200, {"status": "applied"})
    assert await webhooks.send(added, webhook_id="msg_added_2") == (200, {"status": "duplicate_entry"})
    assert await webhooks.send(added, webhook_id="msg_added_1") == (200, {"status": "duplicate"})
    for webhook_id in ("msg_deducted_1", "msg_deducted_2"):
        await dodo_entry(
            webhooks,
            "cle_deducted_1",
            "250",
            event_type="credit.deducted",
            is_credit=False,
            webhook_id=webhook_id,
            expect="applied" if webhook_id.endswith("1") else "duplicate_entry",
        )

    assert await balance(stub, "api_calls") == "750"
    ledger = await whole_ledger(stub, "api_calls")
    assert [(e.kind, e.amount, e.balance_after, e.source) for e in ledger] == [
        ("dodo_credit_deducted", "-250", "750", "cle_deducted_1"),
        ("dodo_credit_added", "1000", "1000", entry_id),
    ]
    assert ledger[1].description == added["data"]["description"]
    statuses = await inbox_statuses(db)
    assert {key: statuses[key] for key in ("msg_added_1", "msg_added_2", "msg_deducted_2")} == {
        "msg_added_1": "applied",
        "msg_added_2": "duplicate_entry",
        "msg_deducted_2": "duplicate_entry",
    }


async def test_every_credit_ledger_event_type_is_a_signed_delta_of_its_amount(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    await activate(webhooks)
    deltas = [
        ("credit.added", True, "1000"),
        ("credit.manual_adjustment", True, "15"),
        ("credit.rolled_over", True, "5"),
        ("credit.expired", False, "100"),
        ("credit.rollover_forfeited", False, "5"),
        ("credit.overage_charged", False, "0"),
        ("credit.overage_reset", True, "0"),
        ("credit.deducted", False, "10"),
    ]
    for number, (event_type, is_credit, amount) in enumerate(deltas):
        await dodo_entry(webhooks, f"cle_{number}", amount, event_type=event_type, is_credit=is_credit)
    assert await balance(stub, "api_calls") == "905"
    account = await stored_account(db, CUSTOMER_ID, "api_calls")
    assert (account.balance, account.ledger_sum, account.ledger_rows) == (Decimal(905), Decimal(905), len(deltas))


async def test_dodo_ledger_amounts_may_arrive_as_numbers(webhooks: WebhookPoster, stub: Stub) -> None:
    await activate(webhooks)
    await dodo_entry(webhooks, "cle_int", 1000)
    await dodo_entry(webhooks, "cle_float", 12.5)
    await dodo_entry(webhooks, "cle_text", "0.25")
    await dodo_entry(webhooks, "cle_debit", 2.75, event_type="credit.deducted", is_credit=False)
    assert await balance(stub, "api_calls") == "1010"
    assert [e.amount for e in await whole_ledger(stub, "api_calls")] == ["-2.75", "0.25", "12.5", "1000"]


async def test_credit_balance_low_is_recorded_and_changes_no_balance(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    await activate(webhooks)
    await dodo_entry(webhooks, "cle_grant", "1000")
    low = {
        "business_id": "bus_0NmY7fQz4kR2sT8vW1xJa",
        "type": "credit.balance_low",
        "timestamp": "2026-09-09T08:00:00Z",
        "data": {
            "payload_type": "CreditBalanceLow",
            "customer_id": CUSTOMER_ID,
            "subscription_id": SUB_ID,
            "credit_entitlement_id": API_CALLS_ENTITLEMENT,
            "credit_entitlement_name": "API Calls",
            "available_balance": "150",
            "threshold_amount": "200",
            "threshold_percent": 20,
        },
    }
    assert await webhooks.send(low, webhook_id="msg_low") == (200, {"status": "recorded"})
    assert (await inbox_statuses(db))["msg_low"] == "recorded"
    assert await balance(stub, "api_calls") == "1000"
    assert len(await whole_ledger(stub, "api_calls")) == 1


async def test_a_ledger_entry_of_an_entitlement_the_catalog_does_not_mirror_is_only_recorded(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    await activate(webhooks)
    event = credit_ledger_event(entry_id="cle_other", amount="50", entitlement="cent_not_in_catalog")
    assert await webhooks.send(event) == (200, {"status": "recorded"})
    async with db.session() as session:
        assert await session.scalar(text("SELECT count(*) FROM credit_ledger WHERE kind <> 'plan_grant'")) == 0


# --- exact decimals -------------------------------------------------------------------------------------------------


async def test_ten_consumptions_of_a_tenth_take_exactly_one(webhooks: WebhookPoster, stub: Stub, db: Database) -> None:
    await activate(webhooks)
    answers = [(await stub.ConsumeCredits(consume_request("0.1", f"tenth-{n}"))).balance_after for n in range(10)]
    assert answers == [f"9999.{9 - n}" if n < 9 else "9999" for n in range(10)]
    assert await balance(stub) == "9999"
    account = await stored_account(db, CUSTOMER_ID, "ai_tokens")
    assert (account.balance, account.ledger_sum, account.grants_remaining) == (
        Decimal(9999),
        Decimal(9999),
        Decimal(9999),
    )


async def test_amounts_of_38_digits_stay_exact_in_balances_ledger_and_idempotency(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    await activate(webhooks)
    await dodo_entry(webhooks, "cle_big", BIG)
    spent = await stub.ConsumeCredits(
        consume_request("12345678901234567890.123456789012345677", "big", credit="api_calls")
    )
    assert (spent.balance_after, spent.overage_after) == ("0.000000000000000001", "0")
    assert [e.amount for e in await whole_ledger(stub, "api_calls")] == [
        "-12345678901234567890.123456789012345677",
        BIG,
    ]
    account = await stored_account(db, CUSTOMER_ID, "api_calls")
    assert account.balance == account.ledger_sum == account.grants_remaining == Decimal("0.000000000000000001")
    # The last of 38 digits is a different amount, so a different request.
    error = await rpc_error(
        stub.ConsumeCredits(consume_request("12345678901234567890.123456789012345676", "big", credit="api_calls"))
    )
    assert_error(error, grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED")


# --- atomicity ------------------------------------------------------------------------------------------------------


async def test_a_consumption_whose_ledger_write_fails_leaves_balance_ledger_and_key_untouched(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    await activate(webhooks)
    async with db.session() as session:
        await session.execute(
            text(
                "CREATE FUNCTION refuse_ledger_row() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN IF NEW.description = 'fail' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$"
            )
        )
        await session.execute(
            text(
                "CREATE TRIGGER refuse_ledger_row BEFORE INSERT ON credit_ledger "
                "FOR EACH ROW EXECUTE FUNCTION refuse_ledger_row()"
            )
        )
    try:
        error = await rpc_error(stub.ConsumeCredits(consume_request("40", "k1", description="fail")))
        assert error.code() is grpc.StatusCode.INTERNAL
        account = await stored_account(db, CUSTOMER_ID, "ai_tokens")
        assert (account.balance, account.grants_remaining, account.ledger_rows) == (Decimal(10000), Decimal(10000), 1)
    finally:
        async with db.session() as session:
            await session.execute(text("DROP TRIGGER refuse_ledger_row ON credit_ledger"))
            await session.execute(text("DROP FUNCTION refuse_ledger_row()"))
    retried = await stub.ConsumeCredits(consume_request("40", "k1", description="fail"))
    assert (retried.balance_after, retried.replayed) == ("9960", False)


# --- reading: ListCreditLedger, GetSubscription ---------------------------------------------------------------------


async def test_list_credit_ledger_pages_newest_first_across_pages(webhooks: WebhookPoster, stub: Stub) -> None:
    await activate(webhooks)
    for n in range(1, 7):
        await stub.ConsumeCredits(consume_request(str(n), f"page-{n}", description=f"call {n}", metadata={"n": str(n)}))
    await activate_other_customer(webhooks)
    await stub.ConsumeCredits(consume_request("99", "page-1", customer=OTHER_CUSTOMER))

    pages: list[list[pb.CreditLedgerEntry]] = []
    token = ""
    while True:
        page = await stub.ListCreditLedger(
            pb.ListCreditLedgerRequest(customer_id=CUSTOMER_ID, credit="ai_tokens", page_size=2, page_token=token)
        )
        pages.append(list(page.entries))
        token = page.next_page_token
        if not token:
            break
    assert [len(page) for page in pages] == [2, 2, 2, 1]
    entries = [entry for page in pages for entry in page]
    assert [e.entry_id for e in entries] == [e.entry_id for e in await whole_ledger(stub)]
    assert [(e.kind, e.amount, e.balance_after) for e in entries] == [
        ("consumption", "-6", "9979"),
        ("consumption", "-5", "9985"),
        ("consumption", "-4", "9990"),
        ("consumption", "-3", "9994"),
        ("consumption", "-2", "9997"),
        ("consumption", "-1", "9999"),
        ("plan_grant", "10000", "10000"),
    ]
    newest = entries[0]
    assert (newest.customer_id, newest.credit, newest.source, newest.description, dict(newest.metadata)) == (
        CUSTOMER_ID,
        "ai_tokens",
        "page-6",
        "call 6",
        {"n": "6"},
    )
    assert all(e.HasField("created_at") for e in entries)
    stamps = [e.created_at.ToDatetime() for e in entries]
    assert stamps == sorted(stamps, reverse=True)


def _token(text_: str) -> str:
    return base64.urlsafe_b64encode(text_.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "request_",
    [
        pb.ListCreditLedgerRequest(customer_id=CUSTOMER_ID, credit="ai_tokens", page_token="not-a-token"),
        pb.ListCreditLedgerRequest(customer_id=CUSTOMER_ID, credit="ai_tokens", page_token="!!!"),
        pb.ListCreditLedgerRequest(customer_id=CUSTOMER_ID, credit="ai_tokens", page_token=_token("v2:5")),
        pb.ListCreditLedgerRequest(customer_id=CUSTOMER_ID, credit="ai_tokens", page_token=_token("v1:five")),
        pb.ListCreditLedgerRequest(
            customer_id=CUSTOMER_ID, credit="ai_tokens", page_token=_token("v1:99999999999999999999999")
        ),
        pb.ListCreditLedgerRequest(customer_id=CUSTOMER_ID, credit="ai_tokens", page_size=-1),
        pb.ListCreditLedgerRequest(customer_id="", credit="ai_tokens"),
        pb.ListCreditLedgerRequest(customer_id=CUSTOMER_ID, credit="gold_coins"),
    ],
    ids=[
        "garbage",
        "not-base64",
        "other-version",
        "not-a-number",
        "out-of-range",
        "negative-size",
        "no-customer",
        "unknown-credit",
    ],
)
async def test_list_credit_ledger_refuses_a_bad_request_as_invalid_argument(
    webhooks: WebhookPoster, stub: Stub, request_: pb.ListCreditLedgerRequest
) -> None:
    await activate(webhooks)
    error = await rpc_error(stub.ListCreditLedger(request_))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details()


async def test_get_subscription_lists_the_balance_of_every_credit_it_gives_access_to(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await activate(webhooks)
    await dodo_entry(webhooks, "cle_grant", "1000")
    await stub.ConsumeCredits(consume_request("2500", "k1"))
    await stub.ConsumeCredits(consume_request("1100", "k2", credit="api_calls"))
    by_customer = await stub.GetSubscription(pb.GetSubscriptionRequest(customer_id=CUSTOMER_ID))
    by_id = await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=SUB_ID))
    assert dict(by_customer.subscription.credits) == {"ai_tokens": "7500", "api_calls": "-100"}
    assert dict(by_id.subscription.credits) == dict(by_customer.subscription.credits)

    await activate_other_customer(webhooks, product_id=STARTER, credit_entitlement_cart=[])
    other = await stub.GetSubscription(pb.GetSubscriptionRequest(customer_id=OTHER_CUSTOMER))
    assert dict(other.subscription.credits) == {}


async def test_the_ledger_a_caller_reads_ends_at_the_balance_a_caller_reads_once_a_grant_expired(
    webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await activate(webhooks)
    await stub.ConsumeCredits(consume_request("25", "before-expiry"))
    clock.set(PERIOD_END + timedelta(days=2))  # the period's grant expired; no renewal arrived

    subscription = await stub.GetSubscription(pb.GetSubscriptionRequest(customer_id=CUSTOMER_ID))
    ledger = await stub.ListCreditLedger(pb.ListCreditLedgerRequest(customer_id=CUSTOMER_ID, credit="ai_tokens"))
    again = await stub.ListCreditLedger(pb.ListCreditLedgerRequest(customer_id=CUSTOMER_ID, credit="ai_tokens"))

    newest = ledger.entries[0]
    assert (newest.kind, newest.amount, newest.balance_after) == ("grant_expiry", "-9975", "0")
    assert newest.balance_after == subscription.subscription.credits["ai_tokens"]
    assert [e.entry_id for e in again.entries] == [e.entry_id for e in ledger.entries], "written down once"
