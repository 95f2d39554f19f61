"""Mirroring consumptions of Dodo-linked credits to Dodo's ledger (issue 12 item 3, DODO_WAVE2 §3 option A): through
the real gRPC stub, the real CreditMirror sender and the real SDK against the fake Dodo. The process's own sender is
off (tests.support.make_settings) so each test decides when a pass runs; the last test runs the process's own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any, TypeAlias

import aiohttp
import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from sqlalchemy import text

from service.app.credit_mirror import CreditMirror, mirror_reason
from service.app.dodo_gateway import DodoGateway
from service.app.reconciler import RateLimiter
from service.domain.catalog import Catalog
from service.reconcile_cli import run_credit_report
from service.server import Running, start
from storage.engine import Database
from tests.fakedodo import FakeDodo
from tests.support import (
    API_CALLS_ENTITLEMENT,
    API_TOKEN,
    CUSTOMER_ID,
    DODO_API_KEY,
    BearerToken,
    FakeClock,
    WebhookPoster,
    deliver,
    make_settings,
    stored_account,
    subscription_event,
    utc,
)

Stub: TypeAlias = "pb_grpc.EntitlementServiceAsyncStub"
CENT = API_CALLS_ENTITLEMENT
POST_DEBIT = "POST /credit-entitlements/*/ledger-entries"


@pytest.fixture
async def service(
    database_url: str, db: Database, clock: FakeClock, catalog: Catalog, fake_dodo: FakeDodo
) -> AsyncIterator[Running]:
    dodo = DodoGateway(DODO_API_KEY, fake_dodo.base_url, timeout=5.0, read_max_retries=0)
    settings = make_settings(database_url)  # the process's own sender off: each test runs its passes
    running = await start(settings, clock=clock, catalog=catalog, db=db, dodo=dodo)
    yield running
    if not running.stopped.is_set():
        await running.stop(0)


@pytest.fixture
def mirror(service: Running, db: Database) -> CreditMirror:
    # close_after=0: every open batch is due at the next pass.
    return CreditMirror(db, service.dodo, limiter=RateLimiter(60_000), close_after=0, lease=60)


async def activate(webhooks: WebhookPoster) -> None:
    """The fixture's Pro subscription: its credit cart lists the entitlement behind `api_calls`."""
    await deliver(webhooks, subscription_event("subscription.active", timestamp=utc("2026-09-01T10:15:40Z")))


async def fund(webhooks: WebhookPoster, fake: FakeDodo, amount: str) -> None:
    """A Dodo credit (a grant), and its `credit.added` webhook: both ledgers start equal."""
    entry = fake.add_ledger_entry(CENT, CUSTOMER_ID, amount, is_credit=True)
    await deliver(webhooks, fake.ledger_webhook(entry))


async def consume(stub: Stub, amount: str, key: str, credit: str = "api_calls") -> pb.ConsumeCreditsResponse:
    return await stub.ConsumeCredits(
        pb.ConsumeCreditsRequest(customer_id=CUSTOMER_ID, credit=credit, amount=amount, idempotency_key=key)
    )


async def ours(db: Database, credit: str = "api_calls") -> Decimal:
    return (await stored_account(db, CUSTOMER_ID, credit)).balance


async def batches(db: Database) -> list[dict[str, Any]]:
    async with db.session() as session:
        rows = await session.execute(text("SELECT * FROM credit_mirror_batches ORDER BY created_at, batch_id"))
        return [dict(row._mapping) for row in rows]


def debits(fake: FakeDodo) -> list[dict[str, Any]]:
    return [e for e in fake.ledger_of(CENT, CUSTOMER_ID) if not e["is_credit"]]


async def test_consumptions_reach_dodo_as_one_batched_debit_and_leave_both_balances_equal(
    webhooks: WebhookPoster, stub: Stub, db: Database, fake_dodo: FakeDodo, mirror: CreditMirror
) -> None:
    await activate(webhooks)
    await fund(webhooks, fake_dodo, "1000")
    await asyncio.gather(*(consume(stub, "7", f"k{n}") for n in range(10)))
    (batch,) = await batches(db)
    assert (batch["status"], batch["amount"]) == ("open", Decimal(70))

    assert await mirror.run_once()
    (sent,) = fake_dodo.requests_matching(POST_DEBIT)
    assert sent.json == {
        "amount": "70",
        "entry_type": "debit",
        "idempotency_key": batch["batch_id"],
        "reason": mirror_reason(batch["batch_id"]),
    }
    assert sent.retry_count == 0
    (debit,) = debits(fake_dodo)
    (batch,) = await batches(db)
    assert (batch["status"], batch["dodo_entry_id"]) == ("sent", debit["id"])
    assert fake_dodo.credit_balance(CENT, CUSTOMER_ID) == await ours(db) == Decimal(930)

    # A later consumption opens a new batch; the sent one is never sent again.
    await consume(stub, "30", "k-later")
    assert await mirror.run_once()
    assert len(fake_dodo.requests_matching(POST_DEBIT)) == 2
    assert [e["amount"] for e in debits(fake_dodo)] == ["70", "30"]
    assert fake_dodo.credit_balance(CENT, CUSTOMER_ID) == await ours(db) == Decimal(900)
    assert await mirror.run_once()
    assert len(fake_dodo.requests_matching(POST_DEBIT)) == 2


async def test_the_echo_after_our_201_is_acknowledged_without_changing_our_balance(
    webhooks: WebhookPoster, stub: Stub, db: Database, fake_dodo: FakeDodo, mirror: CreditMirror
) -> None:
    await activate(webhooks)
    await fund(webhooks, fake_dodo, "500")
    await consume(stub, "120", "k1")
    assert await mirror.run_once()
    (debit,) = debits(fake_dodo)
    echo = fake_dodo.ledger_webhook(debit)
    assert echo["type"] == "credit.deducted"
    assert await webhooks.send(echo) == (200, {"status": "mirror_echo"})
    # Redelivered under another webhook id: still the echo, still no change.
    assert await webhooks.send(echo, webhook_id="msg_echo_again") == (200, {"status": "mirror_echo"})
    assert await ours(db) == fake_dodo.credit_balance(CENT, CUSTOMER_ID) == Decimal(380)
    assert (await stored_account(db, CUSTOMER_ID, "api_calls")).ledger_sum == Decimal(380)


async def test_the_echo_that_beats_our_201_is_taken_as_the_batch_and_applied_once(
    webhooks: WebhookPoster, stub: Stub, db: Database, fake_dodo: FakeDodo, mirror: CreditMirror
) -> None:
    await activate(webhooks)
    await fund(webhooks, fake_dodo, "500")
    await consume(stub, "45", "k1")
    fake_dodo.ledger_answer_gate = asyncio.Event()
    sending = asyncio.create_task(mirror.run_once())
    async with asyncio.timeout(5):
        await fake_dodo.ledger_answer_held.wait()
    (batch,) = await batches(db)
    assert batch["status"] == "sending"
    (debit,) = debits(fake_dodo)
    # Dodo's webhook arrives while our POST still waits for its answer.
    assert await webhooks.send(fake_dodo.ledger_webhook(debit)) == (200, {"status": "mirror_echo"})
    assert await ours(db) == Decimal(455)
    fake_dodo.ledger_answer_gate.set()
    assert await sending
    (batch,) = await batches(db)
    assert (batch["status"], batch["dodo_entry_id"]) == ("sent", debit["id"])
    assert await ours(db) == fake_dodo.credit_balance(CENT, CUSTOMER_ID) == Decimal(455)


async def test_a_foreign_debit_from_the_dashboard_is_still_applied(
    webhooks: WebhookPoster, stub: Stub, db: Database, fake_dodo: FakeDodo, mirror: CreditMirror
) -> None:
    await activate(webhooks)
    await fund(webhooks, fake_dodo, "500")
    await consume(stub, "10", "k1")
    assert await mirror.run_once()
    manual = fake_dodo.add_ledger_entry(CENT, CUSTOMER_ID, "25", is_credit=False, transaction_type="manual_adjustment")
    await deliver(webhooks, fake_dodo.ledger_webhook(manual))
    assert await ours(db) == fake_dodo.credit_balance(CENT, CUSTOMER_ID) == Decimal(465)


async def test_a_foreign_debit_while_a_batch_is_sending_is_applied_when_its_amount_differs(
    webhooks: WebhookPoster, stub: Stub, db: Database, fake_dodo: FakeDodo, mirror: CreditMirror
) -> None:
    await activate(webhooks)
    await fund(webhooks, fake_dodo, "500")
    await consume(stub, "10", "k1")
    fake_dodo.fail_next(POST_DEBIT, 503)
    assert not await mirror.run_once()  # the batch stays `sending`
    manual = fake_dodo.add_ledger_entry(CENT, CUSTOMER_ID, "25", is_credit=False, transaction_type="manual_adjustment")
    await deliver(webhooks, fake_dodo.ledger_webhook(manual))
    assert await mirror.run_once()
    assert await ours(db) == fake_dodo.credit_balance(CENT, CUSTOMER_ID) == Decimal(465)


async def test_a_debit_whose_answer_was_lost_is_resolved_from_dodos_ledger_after_the_409(
    webhooks: WebhookPoster, stub: Stub, db: Database, fake_dodo: FakeDodo, mirror: CreditMirror
) -> None:
    await activate(webhooks)
    await fund(webhooks, fake_dodo, "500")
    await consume(stub, "33", "k1")
    fake_dodo.apply_then_fail(POST_DEBIT, 502)
    assert not await mirror.run_once()
    assert await mirror.run_once()  # the resend gets 409, the ledger names the entry
    posts = fake_dodo.requests_matching(POST_DEBIT)
    assert len(posts) == 2
    assert posts[0].json["idempotency_key"] == posts[1].json["idempotency_key"]
    (debit,) = debits(fake_dodo)
    (batch,) = await batches(db)
    assert (batch["status"], batch["dodo_entry_id"]) == ("sent", debit["id"])
    assert await webhooks.send(fake_dodo.ledger_webhook(debit)) == (200, {"status": "mirror_echo"})
    assert await ours(db) == fake_dodo.credit_balance(CENT, CUSTOMER_ID) == Decimal(467)


async def test_a_5xx_is_retried_with_the_same_key_and_applied_once_at_dodo(
    webhooks: WebhookPoster, stub: Stub, db: Database, fake_dodo: FakeDodo, mirror: CreditMirror
) -> None:
    await activate(webhooks)
    await fund(webhooks, fake_dodo, "500")
    await consume(stub, "12.5", "k1")
    fake_dodo.fail_next(POST_DEBIT, 500, times=2)
    assert not await mirror.run_once()
    assert not await mirror.run_once()
    (batch,) = await batches(db)
    assert (batch["status"], batch["attempts"]) == ("sending", 2)
    assert await mirror.run_once()
    keys = {r.json["idempotency_key"] for r in fake_dodo.requests_matching(POST_DEBIT)}
    assert keys == {batch["batch_id"]}
    assert len(fake_dodo.requests_matching(POST_DEBIT)) == 3
    assert [e["amount"] for e in debits(fake_dodo)] == ["12.5"]
    assert await ours(db) == fake_dodo.credit_balance(CENT, CUSTOMER_ID) == Decimal("487.5")


async def test_a_debit_dodo_refuses_is_parked_as_debt_and_sent_again_after_the_next_credit(
    webhooks: WebhookPoster, stub: Stub, db: Database, fake_dodo: FakeDodo, mirror: CreditMirror
) -> None:
    await activate(webhooks)
    await fund(webhooks, fake_dodo, "100")
    await consume(stub, "150", "k1")  # into our overage (catalog overage_limit 100); Dodo allows none
    assert await mirror.run_once()
    (batch,) = await batches(db)
    assert batch["status"] == "debt"
    assert debits(fake_dodo) == []
    await fund(webhooks, fake_dodo, "100")
    (batch,) = await batches(db)
    assert batch["status"] == "sending"
    assert await mirror.run_once()
    (batch,) = await batches(db)
    assert batch["status"] == "sent"
    assert await ours(db) == fake_dodo.credit_balance(CENT, CUSTOMER_ID) == Decimal(50)


async def test_refused_and_replayed_consumptions_add_nothing_to_the_batch(
    webhooks: WebhookPoster, stub: Stub, db: Database, fake_dodo: FakeDodo
) -> None:
    await activate(webhooks)
    await fund(webhooks, fake_dodo, "100")
    await consume(stub, "5", "k1")
    assert (await consume(stub, "5", "k1")).replayed
    with pytest.raises(Exception, match="not enough"):
        await consume(stub, "1000", "k2")
    (batch,) = await batches(db)
    assert batch["amount"] == Decimal(5)


async def test_a_credit_not_linked_to_dodo_is_never_mirrored(
    webhooks: WebhookPoster, stub: Stub, db: Database, fake_dodo: FakeDodo, mirror: CreditMirror
) -> None:
    await activate(webhooks)
    await consume(stub, "3", "k1", credit="ai_tokens")
    assert await mirror.run_once()
    assert await batches(db) == []
    assert fake_dodo.requests_matching(POST_DEBIT) == []


async def test_reconcile_credits_reports_each_account_and_exits_1_on_drift(
    database_url: str,
    webhooks: WebhookPoster,
    stub: Stub,
    db: Database,
    fake_dodo: FakeDodo,
    mirror: CreditMirror,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await activate(webhooks)
    await fund(webhooks, fake_dodo, "500")
    await consume(stub, "20", "k1")
    settings = make_settings(
        database_url, DODO_PAYMENTS_API_KEY=DODO_API_KEY, DODO_PAYMENTS_BASE_URL=fake_dodo.base_url
    )
    capsys.readouterr()
    # Not yet sent: Dodo's balance is 20 above ours, all of it on its way, so no drift.
    assert await run_credit_report(settings) == 0
    row, summary = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert row == {
        "customer_id": CUSTOMER_ID,
        "credit": "api_calls",
        "ours": "480",
        "dodo": "500",
        "unsent": "20",
        "drift": "0",
    }
    assert summary == {"checked": 1, "drifted": 0, "failed": 0}
    assert await mirror.run_once()
    # A dashboard debit whose webhook never came: Dodo is 7 below us.
    fake_dodo.add_ledger_entry(CENT, CUSTOMER_ID, "7", is_credit=False, transaction_type="manual_adjustment")
    assert await run_credit_report(settings) == 1
    row, summary = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (row["ours"], row["dodo"], row["unsent"], row["drift"]) == ("480", "473", "0", "-7")
    assert summary == {"checked": 1, "drifted": 1, "failed": 0}


async def test_the_process_runs_its_own_sender_when_enabled(
    database_url: str, db: Database, clock: FakeClock, catalog: Catalog, fake_dodo: FakeDodo
) -> None:
    dodo = DodoGateway(DODO_API_KEY, fake_dodo.base_url, timeout=5.0, read_max_retries=0)
    settings = make_settings(
        database_url, ENTITLEMENTS_CREDIT_MIRROR_POLL_SECONDS="0.05", ENTITLEMENTS_CREDIT_MIRROR_CLOSE_SECONDS="0"
    )
    running = await start(settings, clock=clock, catalog=catalog, db=db, dodo=dodo)
    try:
        assert "credit-mirror" in running.tasks.running
        async with aiohttp.ClientSession() as session:
            webhooks = WebhookPoster(f"http://127.0.0.1:{running.http_port}/webhooks/dodo", session)
            await activate(webhooks)
            await fund(webhooks, fake_dodo, "100")
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{running.grpc_port}", interceptors=[BearerToken(API_TOKEN)]
            ) as channel:
                await consume(pb_grpc.EntitlementServiceStub(channel), "9", "k1")
            async with asyncio.timeout(10):
                while fake_dodo.credit_balance(CENT, CUSTOMER_ID) != Decimal(91):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        assert await ours(db) == Decimal(91)
    finally:
        await running.stop(0)


async def test_an_echo_resolves_a_batch_left_unknown_after_a_409(
    webhooks: WebhookPoster, stub: Stub, db: Database, fake_dodo: FakeDodo, mirror: CreditMirror
) -> None:
    await activate(webhooks)
    await fund(webhooks, fake_dodo, "500")
    await consume(stub, "8", "k1")
    fake_dodo.apply_then_fail(POST_DEBIT, 502)
    assert not await mirror.run_once()
    fake_dodo.fail_next("GET /credit-entitlements/*/ledger", 500)
    assert not await mirror.run_once()  # 409, and the ledger cannot be read
    (batch,) = await batches(db)
    assert (batch["status"], batch["dodo_entry_id"]) == ("unknown", None)
    (debit,) = debits(fake_dodo)
    assert await webhooks.send(fake_dodo.ledger_webhook(debit)) == (200, {"status": "mirror_echo"})
    (batch,) = await batches(db)
    assert (batch["status"], batch["dodo_entry_id"]) == ("sent", debit["id"])
    assert await ours(db) == fake_dodo.credit_balance(CENT, CUSTOMER_ID) == Decimal(492)


async def test_an_expiry_of_the_same_amount_while_a_batch_is_sending_is_applied(
    webhooks: WebhookPoster, stub: Stub, db: Database, fake_dodo: FakeDodo, mirror: CreditMirror
) -> None:
    await activate(webhooks)
    await fund(webhooks, fake_dodo, "500")
    await consume(stub, "10", "k1")
    fake_dodo.fail_next(POST_DEBIT, 503)
    assert not await mirror.run_once()
    expired = fake_dodo.add_ledger_entry(CENT, CUSTOMER_ID, "10", is_credit=False, transaction_type="credit_expired")
    await deliver(webhooks, fake_dodo.ledger_webhook(expired))
    assert await mirror.run_once()
    assert await ours(db) == fake_dodo.credit_balance(CENT, CUSTOMER_ID) == Decimal(480)
