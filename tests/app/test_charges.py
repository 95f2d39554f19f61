"""CreateCharge / GetCharge (issue 12, DESIGN §13): on-demand charges through generated stubs on the real server,
against the fake Dodo through the real SDK. A charge retried after a lost answer is one payment at Dodo."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from entitlements_client import EntitlementsClient
from entitlements_client.models import ChargeStatus

from service.app.charges import CHARGE_ID_KEY, Charges
from service.app.dodo_gateway import PAYMENTS_PAGE_SIZE, DodoGateway
from service.server import Running
from storage.engine import Database
from tests.fakedodo import FakeDodo
from tests.support import API_TOKEN, DODO_API_KEY, WebhookPoster, error_info

Stub: TypeAlias = "pb_grpc.EntitlementServiceAsyncStub"
CHARGE = "POST /subscriptions/*/charge"


def charge(subscription_id: str, key: str = "chg-1", **fields: Any) -> pb.CreateChargeRequest:
    base: dict[str, Any] = {
        "subscription_id": subscription_id,
        "amount": 2500,
        "currency": "USD",
        "description": "Usage 2026-11",
        "metadata": {"invoice": "inv_42"},
        "idempotency_key": key,
    }
    return pb.CreateChargeRequest(**{**base, **fields})


async def failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


async def expire_leases(db: Database) -> None:
    """As if the charge lease had run out: no POST of any charge can still be in flight."""
    async with db.tx() as connection:
        await connection.execute("UPDATE charges SET lease_until = now() - interval '1 second'")


async def test_a_charge_is_sent_once_with_our_charge_id_in_metadata_and_is_pending(
    stub: Stub, fake_dodo: FakeDodo
) -> None:
    sub = fake_dodo.add_subscription()
    created = await stub.CreateCharge(charge(sub["subscription_id"]))
    assert not created.replayed
    got = created.charge
    assert got.charge_id.startswith("chg_")
    assert got.status == pb.CHARGE_STATUS_PENDING
    assert (got.subscription_id, got.amount, got.currency) == (sub["subscription_id"], 2500, "USD")
    assert got.payment_id.startswith("pay_")
    assert got.created_at.seconds > 0
    (sent,) = fake_dodo.requests_matching(CHARGE)
    assert sent.json == {
        "product_price": 2500,
        "product_currency": "USD",
        "product_description": "Usage 2026-11",
        "metadata": {"invoice": "inv_42", CHARGE_ID_KEY: got.charge_id},
    }
    assert sent.retry_count == 0
    (payment,) = fake_dodo.charges_of(sub["subscription_id"])
    assert payment["payment_id"] == got.payment_id


async def test_the_same_key_and_request_replays_the_stored_charge_without_a_second_post(
    stub: Stub, fake_dodo: FakeDodo
) -> None:
    sub = fake_dodo.add_subscription()
    first = await stub.CreateCharge(charge(sub["subscription_id"]))
    again = await stub.CreateCharge(charge(sub["subscription_id"]))
    assert again.replayed
    assert again.charge == first.charge
    assert len(fake_dodo.requests_matching(CHARGE)) == 1


async def test_the_same_key_with_other_parameters_is_idempotency_key_reused(stub: Stub, fake_dodo: FakeDodo) -> None:
    sub = fake_dodo.add_subscription()
    await stub.CreateCharge(charge(sub["subscription_id"]))
    refused = await failure(stub.CreateCharge(charge(sub["subscription_id"], amount=2600)))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(refused).reason == "IDEMPOTENCY_KEY_REUSED"
    assert len(fake_dodo.requests_matching(CHARGE)) == 1


async def test_get_charge_by_id_and_by_key_and_not_found(stub: Stub, fake_dodo: FakeDodo) -> None:
    sub = fake_dodo.add_subscription()
    created = (await stub.CreateCharge(charge(sub["subscription_id"], key="get-me"))).charge
    by_id = await stub.GetCharge(pb.GetChargeRequest(charge_id=created.charge_id))
    by_key = await stub.GetCharge(pb.GetChargeRequest(idempotency_key="get-me"))
    assert by_id.charge == created == by_key.charge
    missing = await failure(stub.GetCharge(pb.GetChargeRequest(charge_id="chg_nope")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    missing = await failure(stub.GetCharge(pb.GetChargeRequest(idempotency_key="never-used")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_a_charge_retried_after_a_lost_answer_is_one_payment_resolved_from_dodos_payments(
    stub: Stub, fake_dodo: FakeDodo
) -> None:
    sub = fake_dodo.add_subscription()
    fake_dodo.apply_then_fail(CHARGE, timeout=True)
    first = await stub.CreateCharge(charge(sub["subscription_id"]))
    assert first.charge.status == pb.CHARGE_STATUS_UNKNOWN
    assert first.charge.payment_id == ""
    (payment,) = fake_dodo.charges_of(sub["subscription_id"])

    retried = await stub.CreateCharge(charge(sub["subscription_id"]))
    assert retried.replayed
    assert retried.charge.charge_id == first.charge.charge_id
    assert retried.charge.status == pb.CHARGE_STATUS_PENDING
    assert retried.charge.payment_id == payment["payment_id"]
    assert len(fake_dodo.requests_matching(CHARGE)) == 1
    assert len(fake_dodo.charges_of(sub["subscription_id"])) == 1
    (listed,) = fake_dodo.requests_matching("GET /payments")
    assert listed.query["subscription_id"] == sub["subscription_id"]


async def test_a_5xx_after_applying_is_resolved_the_same_way(stub: Stub, fake_dodo: FakeDodo) -> None:
    sub = fake_dodo.add_subscription()
    fake_dodo.apply_then_fail(CHARGE, 502)
    first = await stub.CreateCharge(charge(sub["subscription_id"]))
    assert first.charge.status == pb.CHARGE_STATUS_UNKNOWN
    retried = await stub.CreateCharge(charge(sub["subscription_id"]))
    assert retried.charge.status == pb.CHARGE_STATUS_PENDING
    assert len(fake_dodo.charges_of(sub["subscription_id"])) == 1


async def test_a_lost_charge_that_dodo_never_made_is_sent_once_more_after_its_lease(
    stub: Stub, fake_dodo: FakeDodo, db: Database
) -> None:
    sub = fake_dodo.add_subscription()
    fake_dodo.timeout_next(CHARGE)
    first = await stub.CreateCharge(charge(sub["subscription_id"]))
    assert first.charge.status == pb.CHARGE_STATUS_UNKNOWN
    assert fake_dodo.charges_of(sub["subscription_id"]) == []

    # Within the lease the first POST might still land: nothing is sent, the charge stays UNKNOWN.
    early = await stub.CreateCharge(charge(sub["subscription_id"]))
    assert early.charge.status == pb.CHARGE_STATUS_UNKNOWN
    assert len(fake_dodo.requests_matching(CHARGE)) == 1

    await expire_leases(db)
    retried = await stub.CreateCharge(charge(sub["subscription_id"]))
    assert retried.charge.status == pb.CHARGE_STATUS_PENDING
    assert retried.charge.charge_id == first.charge.charge_id
    assert len(fake_dodo.requests_matching(CHARGE)) == 2
    (payment,) = fake_dodo.charges_of(sub["subscription_id"])
    assert payment["metadata"][CHARGE_ID_KEY] == first.charge.charge_id

    # Resolved now: further retries are replays.
    again = await stub.CreateCharge(charge(sub["subscription_id"]))
    assert again.charge == retried.charge
    assert len(fake_dodo.requests_matching(CHARGE)) == 2


async def test_a_sending_charge_left_by_a_crashed_process_resolves_after_its_lease(
    stub: Stub, fake_dodo: FakeDodo, db: Database
) -> None:
    sub = fake_dodo.add_subscription()
    # The process "crashed" after Dodo made the payment: the row stays 'sending', the answer never recorded.
    fake_dodo.apply_then_fail(CHARGE, timeout=True)
    first = await stub.CreateCharge(charge(sub["subscription_id"]))
    async with db.tx() as connection:
        await connection.execute(
            "UPDATE charges SET status = 'sending', lease_until = now() + interval '1 hour' WHERE charge_id = $1",
            first.charge.charge_id,
        )
    busy = await failure(stub.CreateCharge(charge(sub["subscription_id"])))
    assert busy.code() == grpc.StatusCode.UNAVAILABLE
    assert len(fake_dodo.requests_matching(CHARGE)) == 1

    await expire_leases(db)
    seen = await stub.GetCharge(pb.GetChargeRequest(charge_id=first.charge.charge_id))
    assert seen.charge.status == pb.CHARGE_STATUS_UNKNOWN
    retried = await stub.CreateCharge(charge(sub["subscription_id"]))
    (payment,) = fake_dodo.charges_of(sub["subscription_id"])
    assert retried.charge.payment_id == payment["payment_id"]
    assert retried.charge.status == pb.CHARGE_STATUS_PENDING
    assert len(fake_dodo.requests_matching(CHARGE)) == 1


async def test_a_refused_charge_is_failed_with_dodos_error_code_and_not_resent(stub: Stub, fake_dodo: FakeDodo) -> None:
    sub = fake_dodo.add_subscription()
    fake_dodo.fail_next(
        CHARGE,
        422,
        body={"code": "PREVIOUS_PAYMENT_PENDING", "message": "Cannot create new charge as previous payment is not"},
    )
    refused = await stub.CreateCharge(charge(sub["subscription_id"]))
    assert refused.charge.status == pb.CHARGE_STATUS_FAILED
    assert refused.charge.error_code == "PREVIOUS_PAYMENT_PENDING"
    again = await stub.CreateCharge(charge(sub["subscription_id"]))
    assert again.replayed
    assert again.charge == refused.charge
    assert len(fake_dodo.requests_matching(CHARGE)) == 1


async def test_an_inactive_subscription_is_a_failed_charge_with_subscription_inactive(
    stub: Stub, fake_dodo: FakeDodo
) -> None:
    sub = fake_dodo.add_subscription(status="on_hold")
    refused = await stub.CreateCharge(charge(sub["subscription_id"]))
    assert refused.charge.status == pb.CHARGE_STATUS_FAILED
    assert refused.charge.error_code == "SUBSCRIPTION_INACTIVE"


async def test_an_unknown_subscription_is_not_found_and_frees_the_key(stub: Stub, fake_dodo: FakeDodo) -> None:
    missing = await failure(stub.CreateCharge(charge("sub_doesnotexist")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    gone = await failure(stub.GetCharge(pb.GetChargeRequest(idempotency_key="chg-1")))
    assert gone.code() == grpc.StatusCode.NOT_FOUND


async def test_payment_webhooks_move_the_charge_to_succeeded_and_failed_and_never_back(
    stub: Stub, fake_dodo: FakeDodo, webhooks: WebhookPoster
) -> None:
    sub = fake_dodo.add_subscription()
    paid = (await stub.CreateCharge(charge(sub["subscription_id"], key="paid"))).charge
    declined = (await stub.CreateCharge(charge(sub["subscription_id"], key="declined"))).charge

    status, body = await webhooks.send(fake_dodo.settle_payment(paid.payment_id, "succeeded"))
    assert (status, body) == (200, {"status": "applied"})
    status, body = await webhooks.send(
        fake_dodo.settle_payment(declined.payment_id, "failed", error_code="INSUFFICIENT_FUNDS")
    )
    assert (status, body) == (200, {"status": "applied"})

    got = (await stub.GetCharge(pb.GetChargeRequest(charge_id=paid.charge_id))).charge
    assert got.status == pb.CHARGE_STATUS_SUCCEEDED
    got = (await stub.GetCharge(pb.GetChargeRequest(idempotency_key="declined"))).charge
    assert (got.status, got.error_code) == (pb.CHARGE_STATUS_FAILED, "INSUFFICIENT_FUNDS")

    # A late processing event does not move a final charge back.
    status, body = await webhooks.send(fake_dodo.settle_payment(paid.payment_id, "processing"))
    assert (status, body) == (200, {"status": "recorded"})
    got = (await stub.GetCharge(pb.GetChargeRequest(charge_id=paid.charge_id))).charge
    assert got.status == pb.CHARGE_STATUS_SUCCEEDED


async def test_a_webhook_resolves_an_unknown_charge_by_our_charge_id_in_its_metadata(
    stub: Stub, fake_dodo: FakeDodo, webhooks: WebhookPoster
) -> None:
    sub = fake_dodo.add_subscription()
    fake_dodo.apply_then_fail(CHARGE, 502)
    first = (await stub.CreateCharge(charge(sub["subscription_id"]))).charge
    assert first.status == pb.CHARGE_STATUS_UNKNOWN
    (payment,) = fake_dodo.charges_of(sub["subscription_id"])
    status, _ = await webhooks.send(fake_dodo.settle_payment(payment["payment_id"], "succeeded"))
    assert status == 200
    got = (await stub.GetCharge(pb.GetChargeRequest(charge_id=first.charge_id))).charge
    assert (got.status, got.payment_id) == (pb.CHARGE_STATUS_SUCCEEDED, payment["payment_id"])
    retried = await stub.CreateCharge(charge(sub["subscription_id"]))
    assert retried.charge == got
    assert len(fake_dodo.requests_matching(CHARGE)) == 1
    assert fake_dodo.requests_matching("GET /payments") == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"subscription_id": ""}, "subscription_id"),
        ({"subscription_id": "sub\x00x"}, "subscription_id"),
        ({"amount": 0}, "amount"),
        ({"amount": -5}, "amount"),
        ({"amount": 10**12 + 1}, "amount"),
        ({"currency": "usd"}, "currency"),
        ({"currency": "DOLLARS"}, "currency"),
        ({"description": "x" * 1001}, "description"),
        ({"description": "bad\x07bell"}, "description"),
        ({"metadata": {f"k{i}": "v" for i in range(51)}}, "metadata"),
        ({"metadata": {"k" * 41: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 501}}, "metadata"),
        ({"metadata": {CHARGE_ID_KEY: "chg_mine"}}, "metadata"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "k" * 256}, "idempotency_key"),
    ],
)
async def test_create_charge_input_limits_are_invalid_argument_naming_the_field(
    stub: Stub, fake_dodo: FakeDodo, fields: dict[str, Any], field: str
) -> None:
    sub = fake_dodo.add_subscription()
    base = charge(sub["subscription_id"])
    request = pb.CreateChargeRequest()
    request.CopyFrom(base)
    for name, value in fields.items():
        if name == "metadata":
            request.metadata.clear()
            request.metadata.update(value)
        else:
            setattr(request, name, value)
    refused = await failure(stub.CreateCharge(request))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(refused)
    assert (info.reason, info.metadata["field"]) == ("FIELD_INVALID", field)
    assert fake_dodo.requests == []


async def test_get_charge_needs_a_selector(stub: Stub) -> None:
    refused = await failure(stub.GetCharge(pb.GetChargeRequest()))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------------------------------------ resolver, gateway


def gateway(fake_dodo: FakeDodo) -> DodoGateway:
    return DodoGateway(DODO_API_KEY, fake_dodo.base_url, timeout=1.0, read_max_retries=0)


async def test_the_background_resolver_takes_dodos_payment_for_an_unknown_charge_and_never_sends(
    stub: Stub, fake_dodo: FakeDodo, db: Database
) -> None:
    found = fake_dodo.add_subscription()
    lost = fake_dodo.add_subscription()
    fake_dodo.apply_then_fail(CHARGE, timeout=True)
    applied = (await stub.CreateCharge(charge(found["subscription_id"], key="applied"))).charge
    fake_dodo.timeout_next(CHARGE)
    never = (await stub.CreateCharge(charge(lost["subscription_id"], key="never"))).charge
    await expire_leases(db)

    dodo = gateway(fake_dodo)
    try:
        looked_at = await Charges(db, dodo).resolve_pending()
    finally:
        await dodo.close()

    assert looked_at == 2
    (payment,) = fake_dodo.charges_of(found["subscription_id"])
    got = (await stub.GetCharge(pb.GetChargeRequest(charge_id=applied.charge_id))).charge
    assert (got.status, got.payment_id) == (pb.CHARGE_STATUS_PENDING, payment["payment_id"])
    # No payment at Dodo: it stays UNKNOWN for the caller's retry to send; the resolver itself never sends.
    got = (await stub.GetCharge(pb.GetChargeRequest(charge_id=never.charge_id))).charge
    assert got.status == pb.CHARGE_STATUS_UNKNOWN
    assert len(fake_dodo.requests_matching(CHARGE)) == 2


async def test_list_payments_reads_every_page_of_the_subscriptions_payments(fake_dodo: FakeDodo) -> None:
    sub = fake_dodo.add_subscription()
    other = fake_dodo.add_subscription()
    dodo = gateway(fake_dodo)
    try:
        made = [
            await dodo.charge_subscription(
                sub["subscription_id"], amount=100 + i, currency="", description="", metadata={"n": str(i)}
            )
            for i in range(PAYMENTS_PAGE_SIZE + 5)
        ]
        await dodo.charge_subscription(other["subscription_id"], amount=1, currency="", description="", metadata={})
        listed = await dodo.list_payments(sub["subscription_id"])
    finally:
        await dodo.close()
    assert sorted(p.payment_id for p in listed) == sorted(made)
    assert {p.subscription_id for p in listed} == {sub["subscription_id"]}
    assert len(fake_dodo.requests_matching("GET /payments")) == 2
    first = next(p for p in listed if p.payment_id == made[0])
    assert (first.status, first.total_amount, first.currency, first.metadata) == ("processing", 100, "USD", {"n": "0"})


async def test_the_python_client_creates_and_reads_a_charge(service: Running, fake_dodo: FakeDodo) -> None:
    sub = fake_dodo.add_subscription()
    async with EntitlementsClient(f"127.0.0.1:{service.grpc_port}", token=API_TOKEN) as client:
        created = await client.create_charge(
            sub["subscription_id"], 700, idempotency_key="py-1", currency="USD", metadata={"a": "b"}
        )
        assert created.charge is not None
        read = await client.get_charge(idempotency_key="py-1")
    assert not created.replayed
    assert read == created.charge
    assert (read.status, read.amount, read.currency) == (ChargeStatus.PENDING, 700, "USD")
    assert read.to_dict()["status"] == "CHARGE_STATUS_PENDING"
