"""DodoGateway against the fake Dodo API, through the real dodopayments SDK."""

from __future__ import annotations

import copy
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import dodopayments
import pytest
from dodopayments.types.scheduled_plan_change import ScheduledPlanChange
from dodopayments.types.subscription import Subscription
from dodopayments.types.subscription_change_plan_response import SubscriptionChangePlanResponse
from dodopayments.types.subscription_preview_change_plan_response import SubscriptionPreviewChangePlanResponse

from service.app.dodo_gateway import DodoGateway, PlanChangePreview
from service.domain.errors import DodoMisconfigured, DodoRefused, DodoUnavailable, SubscriptionNotFound
from service.domain.values import Addon
from tests.fakedodo import (
    ADDON_EXTRA_PROJECTS,
    ADDON_EXTRA_SEAT,
    PRODUCT_PRO,
    PRODUCT_STARTER,
    PRODUCT_TEAM,
    FakeDodo,
    start_fake_dodo,
)

API_KEY = "test_key_9f8e7d6c5b4a"
TIMEOUT = 0.5
CHANGE_PLAN = "POST /subscriptions/*/change-plan"
PREVIEW = "POST /subscriptions/*/change-plan/preview"
# Makes the SDK's retry back-off 10 ms instead of 0.5 s or more, so retry tests stay fast.
FAST_RETRY = {"retry-after-ms": "10"}


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeDodo, str]]:
    async with start_fake_dodo(API_KEY) as served:
        yield served


@pytest.fixture
def fake(served: tuple[FakeDodo, str]) -> FakeDodo:
    return served[0]


@pytest.fixture
async def gateway(served: tuple[FakeDodo, str]) -> AsyncIterator[DodoGateway]:
    gateway = DodoGateway(api_key=API_KEY, base_url=served[1], timeout=TIMEOUT)
    yield gateway
    await gateway.close()


@pytest.fixture
async def no_retry_gateway(served: tuple[FakeDodo, str]) -> AsyncIterator[DodoGateway]:
    """For failure tests on reads, where the SDK's back-off would only slow the test down."""
    gateway = DodoGateway(api_key=API_KEY, base_url=served[1], timeout=TIMEOUT, read_max_retries=0)
    yield gateway
    await gateway.close()


def change_args(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "product_id": PRODUCT_TEAM,
        "quantity": 3,
        "proration_billing_mode": "prorated_immediately",
        "effective_at": "immediately",
        "addons": [],
    }
    args.update(overrides)
    return args


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---------------------------------------------------------------------------------------------- reading


async def test_get_subscription_returns_dodo_json_beside_the_parsed_snapshot(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    sub = fake.add_subscription(metadata={"app_user_id": "u_1"})

    got = await gateway.get_subscription(sub["subscription_id"])

    assert got.payload == sub
    assert got.state.subscription_id == sub["subscription_id"]
    assert got.payload["customer"]["customer_id"] == sub["customer"]["customer_id"]
    assert got.payload["next_billing_date"] == sub["next_billing_date"]


async def test_get_subscription_keeps_fields_newer_than_the_sdk(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription()
    fake.set_subscription(sub["subscription_id"], loyalty_tier={"level": 3})

    got = await gateway.get_subscription(sub["subscription_id"])

    assert got.payload["loyalty_tier"] == {"level": 3}


async def test_requests_carry_the_bearer_key(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription()

    await gateway.get_subscription(sub["subscription_id"])

    (request,) = fake.requests
    assert request.method == "GET"
    assert request.path == f"/subscriptions/{sub['subscription_id']}"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"


async def test_get_retries_a_transient_failure(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription()
    fake.fail_next("GET", 503, times=2, headers=FAST_RETRY)

    got = await gateway.get_subscription(sub["subscription_id"])

    assert got.payload["subscription_id"] == sub["subscription_id"]
    assert [r.retry_count for r in fake.requests_matching("GET")] == [0, 1, 2]


async def test_get_gives_up_as_unavailable_when_retries_run_out(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription()
    fake.fail_next("GET", 500, times=3, headers=FAST_RETRY)

    with pytest.raises(DodoUnavailable) as err:
        await gateway.get_subscription(sub["subscription_id"])

    assert err.value.status == 500
    assert len(fake.requests_matching("GET")) == 3


# ---------------------------------------------------------------------------------------------- changing


async def test_change_plan_immediately_switches_product_quantity_and_addons(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    sub = fake.add_subscription(product_id=PRODUCT_PRO, addons=[{"addon_id": ADDON_EXTRA_SEAT, "quantity": 1}])
    sub_id = sub["subscription_id"]

    await gateway.change_plan(sub_id, **change_args(addons=[Addon(ADDON_EXTRA_PROJECTS, 2)]))

    (request,) = fake.requests_matching(CHANGE_PLAN)
    assert request.json == {
        "product_id": PRODUCT_TEAM,
        "quantity": 3,
        "proration_billing_mode": "prorated_immediately",
        "effective_at": "immediately",
        "addons": [{"addon_id": ADDON_EXTRA_PROJECTS, "quantity": 2}],
    }
    after = await gateway.get_subscription(sub_id)
    assert after.payload["product_id"] == PRODUCT_TEAM
    assert after.payload["quantity"] == 3
    assert after.payload["addons"] == [{"addon_id": ADDON_EXTRA_PROJECTS, "quantity": 2}]
    assert after.payload["recurring_pre_tax_amount"] == 3 * 9900 + 2 * 1500
    assert after.payload["scheduled_change"] is None


async def test_change_plan_at_next_billing_date_only_schedules_the_change(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription(product_id=PRODUCT_PRO)
    sub_id = sub["subscription_id"]

    await gateway.change_plan(sub_id, **change_args(effective_at="next_billing_date"))

    after = await gateway.get_subscription(sub_id)
    assert after.payload["product_id"] == PRODUCT_PRO
    assert after.payload["quantity"] == 1
    scheduled = ScheduledPlanChange.model_validate(after.payload["scheduled_change"])
    assert scheduled.product_id == PRODUCT_TEAM
    assert scheduled.quantity == 3
    assert after.payload["scheduled_change"]["effective_at"] == sub["next_billing_date"]


async def test_addons_passed_to_change_plan_are_kept(fake: FakeDodo, gateway: DodoGateway) -> None:
    addons: list[dict[str, Any]] = [
        {"addon_id": ADDON_EXTRA_SEAT, "quantity": 2},
        {"addon_id": ADDON_EXTRA_PROJECTS, "quantity": 1},
    ]
    sub = fake.add_subscription(addons=addons)
    sub_id = sub["subscription_id"]

    await gateway.change_plan(sub_id, **change_args(addons=[Addon(a["addon_id"], a["quantity"]) for a in addons]))

    assert (await gateway.get_subscription(sub_id)).payload["addons"] == addons
    (request,) = fake.requests_matching(CHANGE_PLAN)
    assert request.json["addons"] == addons


async def test_change_plan_with_no_addons_removes_them_as_dodo_does(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription(addons=[{"addon_id": ADDON_EXTRA_SEAT, "quantity": 2}])

    await gateway.change_plan(sub["subscription_id"], **change_args(addons=[]))

    assert (await gateway.get_subscription(sub["subscription_id"])).payload["addons"] == []
    (request,) = fake.requests_matching(CHANGE_PLAN)
    assert request.json["addons"] == []


async def test_change_plan_passes_on_payment_failure_only_when_given(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription()
    sub_id = sub["subscription_id"]

    await gateway.change_plan(sub_id, **change_args(on_payment_failure="prevent_change"))
    await gateway.change_plan(sub_id, **change_args(product_id=PRODUCT_STARTER))

    first, second = fake.requests_matching(CHANGE_PLAN)
    assert first.json["on_payment_failure"] == "prevent_change"
    assert "on_payment_failure" not in second.json


# ---------------------------------------------------------------------------------------------- previewing


async def test_preview_returns_the_charge_and_currency_and_changes_nothing(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    sub = fake.add_subscription(product_id=PRODUCT_PRO)
    sub_id = sub["subscription_id"]
    before = copy.deepcopy(fake.subscriptions)

    preview = await gateway.preview_change_plan(sub_id, **change_args(quantity=1))

    # Pro (2900) → Team (9900) with 20 of 30 days left: (9900 - 2900) x 20/30, rounded.
    assert preview == PlanChangePreview(immediate_charge=4667, currency="USD", new_plan=preview.new_plan)
    assert preview.new_plan.payload["product_id"] == PRODUCT_TEAM
    assert preview.new_plan.payload["subscription_id"] == sub_id
    assert fake.subscriptions == before
    assert fake.requests_matching(CHANGE_PLAN) == []
    assert len(fake.requests_matching(PREVIEW)) == 1


async def test_preview_of_a_downgrade_charges_nothing(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription(product_id=PRODUCT_TEAM)

    preview = await gateway.preview_change_plan(
        sub["subscription_id"], **change_args(product_id=PRODUCT_STARTER, quantity=1)
    )

    assert preview.immediate_charge == 0
    assert preview.new_plan.payload["product_id"] == PRODUCT_STARTER


async def test_preview_of_a_change_at_next_billing_date_charges_nothing_now(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    sub = fake.add_subscription(product_id=PRODUCT_PRO)

    preview = await gateway.preview_change_plan(sub["subscription_id"], **change_args(effective_at="next_billing_date"))

    assert preview.immediate_charge == 0
    assert preview.new_plan.payload["scheduled_change"]["product_id"] == PRODUCT_TEAM
    assert fake.subscriptions[sub["subscription_id"]]["scheduled_change"] is None


async def test_preview_charges_in_the_subscription_currency(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription(currency="EUR")

    preview = await gateway.preview_change_plan(sub["subscription_id"], **change_args())

    assert preview.currency == "EUR"


# ---------------------------------------------------------------------------------------------- Dodo refuses


async def test_change_while_a_change_is_scheduled_is_rejected_with_dodos_message(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    sub = fake.add_subscription()
    await gateway.change_plan(sub["subscription_id"], **change_args(effective_at="next_billing_date"))

    with pytest.raises(DodoRefused) as err:
        await gateway.change_plan(sub["subscription_id"], **change_args(product_id=PRODUCT_STARTER))

    assert err.value.status == 409
    assert err.value.code == "PLAN_CHANGE_ALREADY_SCHEDULED"
    assert err.value.dodo_message == "A plan change is already scheduled for this subscription"


async def test_change_of_an_inactive_subscription_is_rejected(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription(status="on_hold")

    with pytest.raises(DodoRefused) as err:
        await gateway.change_plan(sub["subscription_id"], **change_args())

    assert err.value.status == 422
    assert "on_hold" in err.value.dodo_message
    assert fake.subscriptions[sub["subscription_id"]]["product_id"] == PRODUCT_PRO


async def test_change_to_an_unknown_product_is_rejected(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription()

    with pytest.raises(DodoRefused) as err:
        await gateway.change_plan(sub["subscription_id"], **change_args(product_id="pdt_nope"))

    assert err.value.status == 422
    assert "pdt_nope" in err.value.dodo_message


async def test_preview_is_rejected_like_the_change_itself(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription(status="cancelled")

    with pytest.raises(DodoRefused) as err:
        await gateway.preview_change_plan(sub["subscription_id"], **change_args())

    assert err.value.status == 422


async def test_unknown_subscription_is_not_found(gateway: DodoGateway) -> None:
    with pytest.raises(SubscriptionNotFound):
        await gateway.get_subscription("sub_missing")
    with pytest.raises(SubscriptionNotFound):
        await gateway.change_plan("sub_missing", **change_args())
    with pytest.raises(SubscriptionNotFound):
        await gateway.preview_change_plan("sub_missing", **change_args())


async def test_wrong_api_key_is_an_auth_error_logged_loudly_without_the_key(
    served: tuple[FakeDodo, str], caplog: pytest.LogCaptureFixture
) -> None:
    fake, base_url = served
    sub = fake.add_subscription()
    wrong_key = "sk_wrong_5e4d3c2b1a"
    gateway = DodoGateway(api_key=wrong_key, base_url=base_url, timeout=TIMEOUT)
    try:
        with caplog.at_level(logging.DEBUG, logger="entitlements.dodo"), pytest.raises(DodoMisconfigured) as err:
            await gateway.get_subscription(sub["subscription_id"])
    finally:
        await gateway.close()

    assert err.value.status == 401
    errors = [r for r in caplog.records if r.name == "entitlements.dodo" and r.levelno >= logging.ERROR]
    assert errors
    assert all(wrong_key not in r.getMessage() for r in caplog.records)
    assert wrong_key not in str(err.value)
    # A 401 is not retried: the key will not get better.
    assert len(fake.requests) == 1


async def test_forbidden_is_an_auth_error(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription()
    fake.fail_next(CHANGE_PLAN, 403)

    with pytest.raises(DodoMisconfigured) as err:
        await gateway.change_plan(sub["subscription_id"], **change_args())

    assert err.value.status == 403


async def test_missing_api_key_fails_every_call_without_calling_dodo(
    fake: FakeDodo, served: tuple[FakeDodo, str]
) -> None:
    gateway = DodoGateway(api_key=None, base_url=served[1], timeout=TIMEOUT)

    with pytest.raises(DodoMisconfigured):
        await gateway.get_subscription("sub_any")
    with pytest.raises(DodoMisconfigured):
        await gateway.change_plan("sub_any", **change_args())
    await gateway.close()

    assert fake.requests == []


# ---------------------------------------------------------------------------------------------- Dodo unavailable


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_error_on_change_plan_is_unavailable_with_unknown_outcome(
    fake: FakeDodo, gateway: DodoGateway, status: int
) -> None:
    sub = fake.add_subscription()
    fake.fail_next(CHANGE_PLAN, status, times=5, headers=FAST_RETRY)

    with pytest.raises(DodoUnavailable) as err:
        await gateway.change_plan(sub["subscription_id"], **change_args())

    assert err.value.status == status
    assert err.value.outcome_unknown
    assert len(fake.requests_matching(CHANGE_PLAN)) == 1


async def test_rate_limited_change_plan_is_unavailable_and_certainly_not_applied(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    sub = fake.add_subscription()
    fake.fail_next(CHANGE_PLAN, 429, times=5, headers=FAST_RETRY)

    with pytest.raises(DodoUnavailable) as err:
        await gateway.change_plan(sub["subscription_id"], **change_args())

    assert err.value.status == 429
    assert not err.value.outcome_unknown
    assert len(fake.requests_matching(CHANGE_PLAN)) == 1


async def test_rate_limited_read_is_unavailable(fake: FakeDodo, no_retry_gateway: DodoGateway) -> None:
    sub = fake.add_subscription()
    fake.fail_next("GET", 429)

    with pytest.raises(DodoUnavailable) as err:
        await no_retry_gateway.get_subscription(sub["subscription_id"])

    assert err.value.status == 429


async def test_conflict_on_change_plan_is_not_retried(fake: FakeDodo, gateway: DodoGateway) -> None:
    # The SDK would retry a 409 ("lock timeout"); a change-plan 409 from Dodo means a change is pending.
    sub = fake.add_subscription()
    fake.fail_next(CHANGE_PLAN, 409, times=5, headers=FAST_RETRY)

    with pytest.raises(DodoRefused):
        await gateway.change_plan(sub["subscription_id"], **change_args())

    assert len(fake.requests_matching(CHANGE_PLAN)) == 1


async def test_change_plan_timeout_is_unavailable_and_sent_once(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription()
    fake.timeout_next(CHANGE_PLAN, times=5)

    with pytest.raises(DodoUnavailable) as err:
        await gateway.change_plan(sub["subscription_id"], **change_args())

    assert err.value.outcome_unknown
    assert len(fake.requests_matching(CHANGE_PLAN)) == 1


async def test_read_timeout_is_unavailable(fake: FakeDodo, no_retry_gateway: DodoGateway) -> None:
    sub = fake.add_subscription()
    fake.timeout_next("GET")

    with pytest.raises(DodoUnavailable):
        await no_retry_gateway.get_subscription(sub["subscription_id"])


async def test_applied_change_whose_answer_was_lost_shows_on_a_later_read(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription(product_id=PRODUCT_PRO)
    fake.apply_then_fail(status=502)

    with pytest.raises(DodoUnavailable) as err:
        await gateway.change_plan(sub["subscription_id"], **change_args())

    assert err.value.outcome_unknown
    assert len(fake.requests_matching(CHANGE_PLAN)) == 1
    assert (await gateway.get_subscription(sub["subscription_id"])).state.product_id == PRODUCT_TEAM


async def test_applied_change_whose_answer_timed_out_is_sent_once(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription(product_id=PRODUCT_PRO)
    fake.apply_then_fail(timeout=True)

    with pytest.raises(DodoUnavailable):
        await gateway.change_plan(sub["subscription_id"], **change_args())

    assert len(fake.requests_matching(CHANGE_PLAN)) == 1
    assert fake.subscriptions[sub["subscription_id"]]["product_id"] == PRODUCT_TEAM


async def test_proxy_error_page_is_unavailable(fake: FakeDodo, no_retry_gateway: DodoGateway) -> None:
    sub = fake.add_subscription()
    fake.fail_next("GET", 502, body="<html><body>Bad Gateway</body></html>")

    with pytest.raises(DodoUnavailable) as err:
        await no_retry_gateway.get_subscription(sub["subscription_id"])

    assert err.value.status == 502


async def test_success_status_with_a_body_that_is_not_json_is_unavailable(
    fake: FakeDodo, no_retry_gateway: DodoGateway
) -> None:
    sub = fake.add_subscription()
    fake.fail_next("GET", 200, body="<html><body>Maintenance</body></html>")

    with pytest.raises(DodoUnavailable):
        await no_retry_gateway.get_subscription(sub["subscription_id"])


async def test_connection_refused_is_unavailable_and_certainly_not_applied() -> None:
    gateway = DodoGateway(api_key=API_KEY, base_url=f"http://127.0.0.1:{closed_port()}", timeout=TIMEOUT)
    try:
        with pytest.raises(DodoUnavailable) as err:
            await gateway.change_plan("sub_any", **change_args())
        assert not err.value.outcome_unknown
    finally:
        await gateway.close()


async def test_connection_refused_on_read_is_unavailable() -> None:
    gateway = DodoGateway(
        api_key=API_KEY, base_url=f"http://127.0.0.1:{closed_port()}", timeout=TIMEOUT, read_max_retries=0
    )
    try:
        with pytest.raises(DodoUnavailable):
            await gateway.get_subscription("sub_any")
    finally:
        await gateway.close()


# ---------------------------------------------------------------------------------------------- the fake itself


async def test_fake_answers_match_the_sdk_models_under_strict_validation(
    fake: FakeDodo, served: tuple[FakeDodo, str]
) -> None:
    sub = fake.add_subscription(addons=[{"addon_id": ADDON_EXTRA_SEAT, "quantity": 1}])
    sub_id = sub["subscription_id"]
    client = dodopayments.AsyncDodoPayments(
        bearer_token=API_KEY, base_url=served[1], max_retries=0, _strict_response_validation=True
    )
    try:
        got = await client.subscriptions.retrieve(sub_id)
        preview = await client.subscriptions.preview_change_plan(
            sub_id,
            product_id=PRODUCT_TEAM,
            quantity=2,
            proration_billing_mode="prorated_immediately",
            addons=[{"addon_id": ADDON_EXTRA_PROJECTS, "quantity": 1}],
        )
        changed = await client.subscriptions.change_plan(
            sub_id,
            product_id=PRODUCT_TEAM,
            quantity=2,
            proration_billing_mode="prorated_immediately",
            effective_at="next_billing_date",
        )
        scheduled = await client.subscriptions.retrieve(sub_id)
    finally:
        await client.close()

    assert isinstance(got, Subscription)
    assert got.addons[0].addon_id == ADDON_EXTRA_SEAT
    assert isinstance(preview, SubscriptionPreviewChangePlanResponse)
    assert [item.type for item in preview.immediate_charge.line_items] == ["subscription", "addon"]
    assert isinstance(changed, SubscriptionChangePlanResponse)
    assert scheduled.scheduled_change is not None
    assert scheduled.scheduled_change.product_id == PRODUCT_TEAM
    # Plain pydantic validation too: the stored dicts are what webhooks-shaped fixtures look like.
    Subscription.model_validate(fake.subscriptions[sub_id])


async def test_the_sdk_on_its_own_would_resend_a_change_plan(fake: FakeDodo, served: tuple[FakeDodo, str]) -> None:
    # Pins why the gateway turns retries off for writes: the SDK resends POSTs without an idempotency key.
    sub = fake.add_subscription()
    fake.fail_next(CHANGE_PLAN, 503, times=2, headers=FAST_RETRY)
    client = dodopayments.AsyncDodoPayments(bearer_token=API_KEY, base_url=served[1], max_retries=2)
    try:
        await client.subscriptions.change_plan(
            sub["subscription_id"],
            product_id=PRODUCT_TEAM,
            quantity=1,
            proration_billing_mode="prorated_immediately",
        )
    finally:
        await client.close()

    sent = fake.requests_matching(CHANGE_PLAN)
    assert [r.retry_count for r in sent] == [0, 1, 2]
    assert not any("idempotency-key" in r.headers for r in sent)


async def test_fake_records_unauthenticated_requests_and_answers_401_in_dodos_shape(
    fake: FakeDodo, served: tuple[FakeDodo, str]
) -> None:
    client = dodopayments.AsyncDodoPayments(bearer_token="nope", base_url=served[1], max_retries=0)
    try:
        with pytest.raises(dodopayments.AuthenticationError) as err:
            await client.subscriptions.retrieve("sub_any")
    finally:
        await client.close()

    assert err.value.body == {
        "code": "UNAUTHORIZED",
        "message": "Authentication failed: the API key is missing or invalid",
    }
    assert fake.requests[0].headers["authorization"] == "Bearer nope"


async def test_fake_latency_delays_every_answer(fake: FakeDodo, no_retry_gateway: DodoGateway) -> None:
    sub = fake.add_subscription()
    fake.latency = TIMEOUT * 2

    with pytest.raises(DodoUnavailable):
        await no_retry_gateway.get_subscription(sub["subscription_id"])


async def test_fake_renewal_applies_a_scheduled_change(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription(product_id=PRODUCT_PRO)
    old_period_end = sub["next_billing_date"]
    await gateway.change_plan(sub["subscription_id"], **change_args(effective_at="next_billing_date"))

    fake.apply_scheduled_change(sub["subscription_id"])

    after = await gateway.get_subscription(sub["subscription_id"])
    assert (after.payload["product_id"], after.payload["quantity"], after.payload["scheduled_change"]) == (
        PRODUCT_TEAM,
        3,
        None,
    )
    assert after.payload["previous_billing_date"] == old_period_end
    Subscription.model_validate(after.payload)
