"""ConsumeCredits under concurrency (DESIGN §6): many callers at once over the real gRPC server and webhook receiver,
on Postgres. No overspend, one effect per idempotency key, and the balance always equals the sum of its ledger."""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import AsyncExitStack
from datetime import timedelta
from decimal import Decimal
from typing import Any, TypeAlias

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from sqlalchemy import text

from service.domain.catalog import Catalog
from service.server import start
from storage.engine import Database
from tests.support import (
    API_TOKEN,
    CUSTOMER_ID,
    BearerToken,
    FakeClock,
    WebhookPoster,
    credit_ledger_event,
    deliver,
    error_info,
    make_settings,
    stored_account,
    subscription_event,
    utc,
)

Stub: TypeAlias = "pb_grpc.EntitlementServiceAsyncStub"
Outcome: TypeAlias = "pb.ConsumeCreditsResponse | grpc.aio.AioRpcError"

CREATED = utc("2026-09-01T10:15:02.481233Z")
ACTIVATED_AT = utc("2026-09-01T10:15:40.118204Z")
PERIOD_END = utc("2026-10-01T10:15:02.481233Z")
TRIAL_END = CREATED + timedelta(days=14)
DODO_AT = utc("2026-09-05T12:00:00Z")  # Dodo ledger entries made after activation, before the clock's now


def consume_request(amount: str, key: str, credit: str) -> pb.ConsumeCreditsRequest:
    return pb.ConsumeCreditsRequest(customer_id=CUSTOMER_ID, credit=credit, amount=amount, idempotency_key=key)


async def outcome(call: Any) -> Outcome:
    """The response, or the status the call ended with: concurrent callers are judged together afterwards."""
    try:
        response: pb.ConsumeCreditsResponse = await call
    except grpc.aio.AioRpcError as error:
        return error
    return response


def successes(outcomes: list[Outcome]) -> list[pb.ConsumeCreditsResponse]:
    return [o for o in outcomes if isinstance(o, pb.ConsumeCreditsResponse)]


def failures(outcomes: list[Outcome]) -> list[grpc.aio.AioRpcError]:
    return [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]


async def send_ok(webhooks: WebhookPoster, event: dict[str, Any], webhook_id: str) -> str:
    status, body = await webhooks.send(event, webhook_id=webhook_id)
    assert status == 200, body
    result: str = body["status"]
    return result


async def balance_of_exactly_1000(webhooks: WebhookPoster, credit: str) -> None:
    """ai_tokens: Pro's trial grant of 1000 (overage 0). api_calls: a Dodo credit.added of 1000 (overage 100)."""
    if credit == "ai_tokens":
        event = subscription_event(
            "subscription.active", timestamp=ACTIVATED_AT, trial_period_days=14, next_billing_date=TRIAL_END
        )
        await deliver(webhooks, event)
    else:
        await deliver(webhooks, subscription_event("subscription.active", timestamp=ACTIVATED_AT))
        await send_ok(webhooks, credit_ledger_event(entry_id="cle_start", amount="1000", at=DODO_AT), "msg_start")


async def assert_consistent(db: Database, credit: str) -> Decimal:
    account = await stored_account(db, CUSTOMER_ID, credit)
    assert account.balance == account.ledger_sum
    assert account.grants_remaining == max(account.balance, Decimal(0))
    return account.balance


@pytest.mark.parametrize(
    ("credit", "succeed", "final"),
    [("ai_tokens", 40, "0"), ("api_calls", 44, "-100")],
    ids=["no-overage", "overage-100"],
)
async def test_sixty_concurrent_consumers_of_25_against_1000_never_overspend(
    webhooks: WebhookPoster, stub: Stub, db: Database, credit: str, succeed: int, final: str
) -> None:
    await balance_of_exactly_1000(webhooks, credit)
    assert (await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature=credit))).balance == "1000"

    outcomes = await asyncio.gather(
        *(outcome(stub.ConsumeCredits(consume_request("25", f"burst-{n}", credit))) for n in range(60))
    )

    ok, refused = successes(outcomes), failures(outcomes)
    assert (len(ok), len(refused)) == (succeed, 60 - succeed)
    assert sorted(Decimal(r.balance_after) for r in ok) == [Decimal(1000 - 25 * n) for n in range(succeed, 0, -1)]
    assert len({r.entry_id for r in ok}) == succeed
    for error in refused:
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(error)
        assert (info.reason, info.metadata["balance"]) == ("INSUFFICIENT_CREDITS", final)
    assert await assert_consistent(db, credit) == Decimal(final)
    account = await stored_account(db, CUSTOMER_ID, credit)
    assert account.ledger_rows == 1 + succeed


async def test_thirty_concurrent_calls_with_one_key_have_one_effect(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    await balance_of_exactly_1000(webhooks, "ai_tokens")
    request = consume_request("25", "one-key", "ai_tokens")
    outcomes = await asyncio.gather(*(outcome(stub.ConsumeCredits(request)) for _ in range(30)))

    ok = successes(outcomes)
    assert len(ok) == 30, [e.details() for e in failures(outcomes)]
    assert Counter(r.replayed for r in ok) == {True: 29, False: 1}
    assert {(r.entry_id, r.balance_after) for r in ok} == {(ok[0].entry_id, "975")}
    assert await assert_consistent(db, "ai_tokens") == Decimal(975)
    async with db.session() as session:
        rows = await session.scalar(text("SELECT count(*) FROM credit_ledger WHERE idempotency_key = 'one-key'"))
    assert rows == 1


async def test_one_key_sent_concurrently_with_different_amounts_takes_effect_once(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    await balance_of_exactly_1000(webhooks, "ai_tokens")
    outcomes = await asyncio.gather(
        *(outcome(stub.ConsumeCredits(consume_request(str(n), "contested", "ai_tokens"))) for n in range(1, 21))
    )

    ok, refused = successes(outcomes), failures(outcomes)
    assert len(ok) == 1
    assert not ok[0].replayed
    assert len(refused) == 19
    for error in refused:
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(error)
        assert (info.reason, info.metadata["entry_id"]) == ("IDEMPOTENCY_KEY_REUSED", ok[0].entry_id)
    spent = 1000 - Decimal(ok[0].balance_after)
    assert 1 <= spent <= 20
    assert await assert_consistent(db, "ai_tokens") == 1000 - spent


async def test_one_key_raced_on_two_credits_takes_effect_on_one_of_them_only(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    # Two credits are two accounts (two row locks): only the unique (customer, key) index can settle this race.
    await deliver(webhooks, subscription_event("subscription.active", timestamp=ACTIVATED_AT))
    await send_ok(webhooks, credit_ledger_event(entry_id="cle_start", amount="1000", at=DODO_AT), "msg_start")
    requests = [
        consume_request("5", "two-accounts", credit) for credit in ("ai_tokens", "api_calls") for _ in range(15)
    ]
    outcomes = await asyncio.gather(*(outcome(stub.ConsumeCredits(r)) for r in requests))

    ok, refused = successes(outcomes), failures(outcomes)
    assert Counter(r.replayed for r in ok) == {False: 1, True: 14}
    assert len({r.entry_id for r in ok}) == 1
    assert len(refused) == 15
    assert {(e.code(), error_info(e).reason) for e in refused} == {
        (grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED")
    }
    balances = {await assert_consistent(db, "ai_tokens"), await assert_consistent(db, "api_calls")}
    assert balances in ({Decimal(9995), Decimal(1000)}, {Decimal(10000), Decimal(995)})


async def test_consumption_concurrent_with_dodo_ledger_webhooks_loses_and_doubles_nothing(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    await balance_of_exactly_1000(webhooks, "api_calls")
    consumptions = [outcome(stub.ConsumeCredits(consume_request("10", f"use-{n}", "api_calls"))) for n in range(40)]
    additions = [credit_ledger_event(entry_id=f"cle_add_{n}", amount="5", at=DODO_AT) for n in range(20)]
    deductions = [
        credit_ledger_event("credit.deducted", entry_id=f"cle_ded_{n}", amount=3, is_credit=False, at=DODO_AT)
        for n in range(10)
    ]
    # Every ledger entry is delivered twice, under two webhook-ids, concurrently with everything else.
    deliveries = [
        send_ok(webhooks, event, f"msg_{event['data']['id']}_{copy}")
        for event in [*additions, *deductions]
        for copy in (1, 2)
    ]
    consumed, delivered = await asyncio.gather(asyncio.gather(*consumptions), asyncio.gather(*deliveries))

    assert len(successes(consumed)) == 40, [e.details() for e in failures(consumed)]
    assert Counter(delivered) == {"applied": 30, "duplicate_entry": 30}
    assert await assert_consistent(db, "api_calls") == Decimal(1000 - 400 + 100 - 30)
    account = await stored_account(db, CUSTOMER_ID, "api_calls")
    assert account.ledger_rows == 1 + 40 + 20 + 10


async def test_consumption_concurrent_with_a_period_renewal_keeps_the_ledger_and_grants_in_step(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    await deliver(webhooks, subscription_event("subscription.active", timestamp=ACTIVATED_AT))
    renewal = subscription_event(
        "subscription.renewed",
        timestamp=PERIOD_END + timedelta(minutes=1),
        previous_billing_date=PERIOD_END,
        next_billing_date=PERIOD_END + timedelta(days=31),
    )
    consumptions = [outcome(stub.ConsumeCredits(consume_request("100", f"use-{n}", "ai_tokens"))) for n in range(30)]
    consumed, renewed = await asyncio.gather(asyncio.gather(*consumptions), send_ok(webhooks, renewal, "msg_renewal"))

    assert renewed == "applied"
    assert len(successes(consumed)) == 30
    balance = await assert_consistent(db, "ai_tokens")
    async with db.session() as session:
        kinds = list(
            (
                await session.execute(
                    text("SELECT kind FROM credit_ledger WHERE credit = 'ai_tokens' ORDER BY id"),
                )
            ).scalars()
        )
    # What the old period had left expired at the renewal; only consumptions after it draw on the new grant.
    assert (kinds.count("plan_grant"), kinds.count("grant_expiry"), kinds.count("consumption")) == (2, 1, 30)
    after_renewal = kinds[kinds.index("grant_expiry") :].count("consumption")
    assert balance == Decimal(10000 - 100 * after_renewal)


@pytest.mark.parametrize(
    ("credit", "succeed"), [("ai_tokens", 40), ("api_calls", 44)], ids=["no-overage", "overage-100"]
)
async def test_sixty_consumers_spread_over_three_replicas_never_overspend(
    webhooks: WebhookPoster,
    database_url: str,
    clock: FakeClock,
    catalog: Catalog,
    db: Database,
    credit: str,
    succeed: int,
) -> None:
    """Each replica has its own writer: only the account's row lock stands between them and an overspend (one
    process with one writer would serialize them anyway, and could not notice a missing lock)."""
    await balance_of_exactly_1000(webhooks, credit)
    async with AsyncExitStack() as stack:
        stubs: list[Stub] = []
        for _ in range(3):
            running = await start(
                make_settings(database_url), clock=clock, catalog=catalog, db=Database.from_url(database_url)
            )
            stack.push_async_callback(running.stop, 0)
            channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}", interceptors=[BearerToken(API_TOKEN)])
            )
            stubs.append(pb_grpc.EntitlementServiceStub(channel))
        request = pb.ConsumeCreditsRequest
        outcomes = await asyncio.gather(
            *(
                stubs[n % 3].ConsumeCredits(
                    request(customer_id=CUSTOMER_ID, credit=credit, amount="25", idempotency_key=f"r{n}")
                )
                for n in range(60)
            ),
            return_exceptions=True,
        )
    ok = [o for o in outcomes if isinstance(o, pb.ConsumeCreditsResponse)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert (len(ok), len(refused)) == (succeed, 60 - succeed), [e.details() for e in refused]
    assert all(error_info(e).reason == "INSUFFICIENT_CREDITS" for e in refused)
    assert sorted(Decimal(r.balance_after) for r in ok) == [Decimal(1000 - 25 * n) for n in range(succeed, 0, -1)]
    await assert_consistent(db, credit)
