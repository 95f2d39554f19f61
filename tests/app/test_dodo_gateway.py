"""DodoGateway against the fake Dodo API, through the real dodopayments SDK."""

from __future__ import annotations

import copy
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import dodopayments
import pytest
from dodopayments.types.checkout_session_response import CheckoutSessionResponse
from dodopayments.types.customer_portal_session import CustomerPortalSession
from dodopayments.types.product_list_response import ProductListResponse
from dodopayments.types.scheduled_plan_change import ScheduledPlanChange
from dodopayments.types.subscription import Subscription
from dodopayments.types.subscription_change_plan_response import SubscriptionChangePlanResponse
from dodopayments.types.subscription_preview_change_plan_response import SubscriptionPreviewChangePlanResponse

from service.app.dodo_gateway import DodoGateway, PlanChangePreview
from service.app.metrics import Metrics
from service.domain.errors import (
    CustomerNotFound,
    DodoMisconfigured,
    DodoNotConfigured,
    DodoRefused,
    DodoUnavailable,
    SubscriptionNotFound,
)
from service.domain.values import Addon, CheckoutCustomer, CheckoutItem, CheckoutSession, DodoProduct
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
PATCH = "PATCH /subscriptions/*"
CHECKOUT = "POST /checkouts"
PORTAL = "POST /customers/*/customer-portal/session"
PRODUCTS = "GET /products"
NOW = datetime(2026, 3, 14, 9, 26, 53, tzinfo=UTC)
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
async def clocked_gateway(served: tuple[FakeDodo, str]) -> AsyncIterator[DodoGateway]:
    """A gateway whose clock stands still at NOW, for the expiry it reports."""
    gateway = DodoGateway(api_key=API_KEY, base_url=served[1], timeout=TIMEOUT, clock=lambda: NOW)
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

    with pytest.raises(DodoNotConfigured):
        await gateway.get_subscription("sub_any")
    with pytest.raises(DodoNotConfigured):
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


# ---------------------------------------------------------------------------------------------- checkout sessions


def checkout_args(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "items": [CheckoutItem(PRODUCT_PRO)],
        "customer": CheckoutCustomer(email="grace@example.com", name="Grace Hopper"),
        "trial_period_days": None,
        "return_url": None,
        "cancel_url": None,
        "discount_code": None,
        "metadata": {},
    }
    args.update(overrides)
    return args


async def test_create_checkout_sends_the_cart_customer_trial_urls_discount_and_metadata(
    fake: FakeDodo, clocked_gateway: DodoGateway
) -> None:
    fake.customers.add("cus_5Hq2LrT9vX")

    session = await clocked_gateway.create_checkout(
        items=[
            CheckoutItem(PRODUCT_TEAM, quantity=3, addons=(Addon(ADDON_EXTRA_SEAT, 2),)),
            CheckoutItem(PRODUCT_STARTER),
        ],
        customer=CheckoutCustomer(customer_id="cus_5Hq2LrT9vX"),
        trial_period_days=14,
        return_url="https://app.example/billing/done",
        cancel_url="https://app.example/pricing",
        discount_code="LAUNCH20",
        metadata={"customer_ref": "org_42"},
    )

    (request,) = fake.requests_matching(CHECKOUT)
    assert request.json == {
        "product_cart": [
            {"product_id": PRODUCT_TEAM, "quantity": 3, "addons": [{"addon_id": ADDON_EXTRA_SEAT, "quantity": 2}]},
            {"product_id": PRODUCT_STARTER, "quantity": 1},
        ],
        "customer": {"customer_id": "cus_5Hq2LrT9vX"},
        "subscription_data": {"trial_period_days": 14},
        "return_url": "https://app.example/billing/done",
        "cancel_url": "https://app.example/pricing",
        "discount_codes": ["LAUNCH20"],
        "metadata": {"customer_ref": "org_42"},
    }
    (stored,) = fake.checkout_sessions.values()
    assert session == CheckoutSession(
        session_id=stored["session_id"], checkout_url=stored["checkout_url"], expires_at=NOW + timedelta(hours=24)
    )
    assert session.session_id.startswith("cks_")


async def test_create_checkout_for_a_new_customer_sends_email_and_name_and_nothing_not_given(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    await gateway.create_checkout(**checkout_args())

    (request,) = fake.requests_matching(CHECKOUT)
    assert request.json == {
        "product_cart": [{"product_id": PRODUCT_PRO, "quantity": 1}],
        "customer": {"email": "grace@example.com", "name": "Grace Hopper"},
        "metadata": {},
    }


async def test_create_checkout_sends_a_zero_day_trial_to_override_the_products_trial(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    await gateway.create_checkout(**checkout_args(trial_period_days=0))

    (request,) = fake.requests_matching(CHECKOUT)
    assert request.json["subscription_data"] == {"trial_period_days": 0}


async def test_create_checkout_without_a_customer_lets_the_checkout_page_ask(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    await gateway.create_checkout(**checkout_args(customer=CheckoutCustomer()))

    (request,) = fake.requests_matching(CHECKOUT)
    assert "customer" not in request.json


async def test_create_checkout_expires_a_day_after_it_was_asked_for(
    served: tuple[FakeDodo, str],
) -> None:
    times = iter([NOW, NOW + timedelta(hours=5)])
    gateway = DodoGateway(api_key=API_KEY, base_url=served[1], timeout=TIMEOUT, clock=lambda: next(times))
    try:
        first = await gateway.create_checkout(**checkout_args())
        second = await gateway.create_checkout(**checkout_args())
    finally:
        await gateway.close()

    assert first.expires_at == NOW + timedelta(hours=24)
    assert second.expires_at == NOW + timedelta(hours=29)
    assert first.session_id != second.session_id


async def test_create_checkout_of_a_product_unknown_at_dodo_is_refused_with_dodos_message(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    with pytest.raises(DodoRefused) as err:
        await gateway.create_checkout(**checkout_args(items=[CheckoutItem("pdt_nope")]))

    assert err.value.status == 422
    assert err.value.code == "PRODUCT_NOT_FOUND"
    assert err.value.dodo_message == "Product pdt_nope does not exist"
    assert fake.checkout_sessions == {}


async def test_create_checkout_for_a_customer_unknown_at_dodo_is_customer_not_found(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    with pytest.raises(CustomerNotFound) as err:
        await gateway.create_checkout(**checkout_args(customer=CheckoutCustomer(customer_id="cus_missing")))

    assert err.value.customer_id == "cus_missing"
    assert fake.checkout_sessions == {}


async def test_create_checkout_with_an_unreadable_answer_is_unavailable_with_unknown_outcome(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    fake.fail_next(CHECKOUT, 200, body={"checkout_url": None})

    with pytest.raises(DodoUnavailable) as err:
        await gateway.create_checkout(**checkout_args())

    assert err.value.outcome_unknown


# ---------------------------------------------------------------------------------------------- customer portal


async def test_create_portal_session_returns_dodos_link_and_sends_only_query_parameters(
    fake: FakeDodo, clocked_gateway: DodoGateway
) -> None:
    sub = fake.add_subscription()
    customer_id = sub["customer"]["customer_id"]

    link, expires_at = await clocked_gateway.create_portal_session(
        customer_id, return_url="https://app.example/account?tab=billing", send_email=False
    )

    (request,) = fake.requests_matching(PORTAL)
    assert request.path == f"/customers/{customer_id}/customer-portal/session"
    assert request.query == {"return_url": "https://app.example/account?tab=billing", "send_email": "false"}
    assert request.json is None
    (created,) = fake.portal_sessions
    assert link == created["link"]
    assert expires_at == NOW + timedelta(hours=24)


async def test_create_portal_session_can_ask_dodo_to_mail_the_link_without_a_return_url(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    fake.customers.add("cus_5Hq2LrT9vX")

    await gateway.create_portal_session("cus_5Hq2LrT9vX", return_url=None, send_email=True)

    (request,) = fake.requests_matching(PORTAL)
    assert request.query == {"send_email": "true"}
    assert fake.portal_sessions[0]["send_email"] is True


async def test_create_portal_session_for_a_customer_unknown_at_dodo_is_customer_not_found(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    with pytest.raises(CustomerNotFound) as err:
        await gateway.create_portal_session("cus_missing", return_url=None, send_email=False)

    assert err.value.customer_id == "cus_missing"
    assert "at Dodo" in err.value.message
    assert fake.portal_sessions == []


async def test_create_portal_session_refused_by_dodo_carries_dodos_message(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    fake.customers.add("cus_5Hq2LrT9vX")
    fake.fail_next(PORTAL, 422, body={"code": "INVALID_REQUEST_BODY", "message": "return_url is not a valid URL"})

    with pytest.raises(DodoRefused) as err:
        await gateway.create_portal_session("cus_5Hq2LrT9vX", return_url="not a url", send_email=False)

    assert err.value.status == 422
    assert err.value.dodo_message == "return_url is not a valid URL"


async def test_create_portal_session_with_no_link_in_the_answer_is_unavailable(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    fake.customers.add("cus_5Hq2LrT9vX")
    fake.fail_next(PORTAL, 200, body={"url": "https://elsewhere.example"})

    with pytest.raises(DodoUnavailable):
        await gateway.create_portal_session("cus_5Hq2LrT9vX", return_url=None, send_email=False)


# ---------------------------------------------------------------------------------------------- PATCH a subscription


async def test_cancel_at_period_end_keeps_the_subscription_active_with_the_flag_set(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    sub = fake.add_subscription()

    await gateway.update_subscription(sub["subscription_id"], cancel_at_next_billing_date=True)

    (request,) = fake.requests_matching(PATCH)
    assert request.path == f"/subscriptions/{sub['subscription_id']}"
    assert request.json == {"cancel_at_next_billing_date": True}
    after = await gateway.get_subscription(sub["subscription_id"])
    assert after.state.status == "active"
    assert after.state.cancel_at_next_billing_date is True
    assert after.payload["cancelled_at"] is None


async def test_withdrawing_a_scheduled_cancellation_sends_false(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription(cancel_at_next_billing_date=True)

    await gateway.update_subscription(sub["subscription_id"], cancel_at_next_billing_date=False)

    (request,) = fake.requests_matching(PATCH)
    assert request.json == {"cancel_at_next_billing_date": False}
    assert fake.subscriptions[sub["subscription_id"]]["cancel_at_next_billing_date"] is False


async def test_cancel_now_with_a_reason_cancels_the_subscription(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription()

    await gateway.update_subscription(sub["subscription_id"], status="cancelled", cancel_reason="cancelled_by_customer")

    (request,) = fake.requests_matching(PATCH)
    assert request.json == {"status": "cancelled", "cancel_reason": "cancelled_by_customer"}
    after = await gateway.get_subscription(sub["subscription_id"])
    assert after.state.status == "cancelled"
    assert after.state.cancelled_at is not None


async def test_resuming_a_paused_subscription_sends_status_active_alone(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription(status="paused", paused_at="2026-03-01T00:00:00Z")

    await gateway.update_subscription(sub["subscription_id"], status="active")

    (request,) = fake.requests_matching(PATCH)
    assert request.json == {"status": "active"}
    assert fake.subscriptions[sub["subscription_id"]]["status"] == "active"
    assert fake.subscriptions[sub["subscription_id"]]["paused_at"] is None


async def test_pausing_sets_the_subscription_paused(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription()

    await gateway.update_subscription(sub["subscription_id"], status="paused")

    assert fake.subscriptions[sub["subscription_id"]]["status"] == "paused"


async def test_status_active_combined_with_another_field_is_refused_with_dodos_message(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    sub = fake.add_subscription(status="paused", paused_at="2026-03-01T00:00:00Z")
    before = copy.deepcopy(sub)

    with pytest.raises(DodoRefused) as err:
        await gateway.update_subscription(sub["subscription_id"], status="active", cancel_at_next_billing_date=False)

    assert err.value.status == 422
    assert err.value.dodo_message == "status active must be sent alone, without other fields"
    assert fake.subscriptions[sub["subscription_id"]] == before


async def test_update_of_a_subscription_unknown_at_dodo_is_subscription_not_found(gateway: DodoGateway) -> None:
    with pytest.raises(SubscriptionNotFound) as err:
        await gateway.update_subscription("sub_missing", cancel_at_next_billing_date=True)

    assert err.value.subscription_id == "sub_missing"
    assert "at Dodo" in err.value.message


async def test_update_with_nothing_to_change_is_a_programming_error_and_sends_nothing(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    with pytest.raises(ValueError, match="at least one field"):
        await gateway.update_subscription("sub_any")

    assert fake.requests == []


async def test_applied_update_whose_answer_was_lost_shows_on_a_later_read(fake: FakeDodo, gateway: DodoGateway) -> None:
    sub = fake.add_subscription()
    fake.apply_then_fail(PATCH, status=502)

    with pytest.raises(DodoUnavailable) as err:
        await gateway.update_subscription(sub["subscription_id"], status="cancelled")

    assert err.value.outcome_unknown
    assert len(fake.requests_matching(PATCH)) == 1
    assert (await gateway.get_subscription(sub["subscription_id"])).state.status == "cancelled"


# ---------------------------------------------------------------------------------------------- every new call


Call = Callable[[DodoGateway, dict[str, Any]], Awaitable[object]]


async def _checkout(gateway: DodoGateway, sub: dict[str, Any]) -> object:
    return await gateway.create_checkout(**checkout_args())


async def _portal(gateway: DodoGateway, sub: dict[str, Any]) -> object:
    return await gateway.create_portal_session(sub["customer"]["customer_id"], return_url=None, send_email=True)


async def _cancel(gateway: DodoGateway, sub: dict[str, Any]) -> object:
    await gateway.update_subscription(sub["subscription_id"], cancel_at_next_billing_date=True)
    return None


async def _products(gateway: DodoGateway, sub: dict[str, Any]) -> object:
    return await gateway.list_products()


MUTATIONS: list[Any] = [
    pytest.param("create_checkout", CHECKOUT, _checkout, id="create_checkout"),
    pytest.param("create_portal_session", PORTAL, _portal, id="create_portal_session"),
    pytest.param("update_subscription", PATCH, _cancel, id="update_subscription"),
]
ALL_CALLS: list[Any] = [*MUTATIONS, pytest.param("list_products", PRODUCTS, _products, id="list_products")]


@pytest.mark.parametrize(("endpoint", "spec", "call"), MUTATIONS)
@pytest.mark.parametrize("status", [500, 503])
async def test_server_error_on_a_mutation_is_unavailable_with_unknown_outcome_and_not_resent(
    fake: FakeDodo, gateway: DodoGateway, endpoint: str, spec: str, call: Call, status: int
) -> None:
    sub = fake.add_subscription()
    fake.fail_next(spec, status, times=5, headers=FAST_RETRY)

    with pytest.raises(DodoUnavailable) as err:
        await call(gateway, sub)

    assert err.value.status == status
    assert err.value.outcome_unknown
    assert len(fake.requests_matching(spec)) == 1


@pytest.mark.parametrize(("endpoint", "spec", "call"), MUTATIONS)
async def test_timeout_on_a_mutation_is_unavailable_with_unknown_outcome_and_sent_once(
    fake: FakeDodo, gateway: DodoGateway, endpoint: str, spec: str, call: Call
) -> None:
    sub = fake.add_subscription()
    fake.timeout_next(spec, times=5)

    with pytest.raises(DodoUnavailable) as err:
        await call(gateway, sub)

    assert err.value.outcome_unknown
    assert len(fake.requests_matching(spec)) == 1


@pytest.mark.parametrize(("endpoint", "spec", "call"), MUTATIONS)
async def test_conflict_on_a_mutation_is_refused_and_not_resent(
    fake: FakeDodo, gateway: DodoGateway, endpoint: str, spec: str, call: Call
) -> None:
    # The SDK would retry a 409 on its own.
    sub = fake.add_subscription()
    fake.fail_next(spec, 409, times=5, headers=FAST_RETRY)

    with pytest.raises(DodoRefused):
        await call(gateway, sub)

    assert len(fake.requests_matching(spec)) == 1


@pytest.mark.parametrize(("endpoint", "spec", "call"), ALL_CALLS)
async def test_a_refused_api_key_is_misconfigured_for_every_new_call(
    fake: FakeDodo, served: tuple[FakeDodo, str], endpoint: str, spec: str, call: Call
) -> None:
    sub = fake.add_subscription()
    gateway = DodoGateway(api_key="sk_wrong_5e4d3c2b1a", base_url=served[1], timeout=TIMEOUT)
    try:
        with pytest.raises(DodoMisconfigured) as err:
            await call(gateway, sub)
    finally:
        await gateway.close()

    assert err.value.status == 401
    assert len(fake.requests_matching(spec)) == 1


@pytest.mark.parametrize(("endpoint", "spec", "call"), ALL_CALLS)
async def test_no_api_key_fails_every_new_call_without_calling_dodo(
    fake: FakeDodo, served: tuple[FakeDodo, str], endpoint: str, spec: str, call: Call
) -> None:
    sub = fake.add_subscription()
    gateway = DodoGateway(api_key=None, base_url=served[1], timeout=TIMEOUT)

    with pytest.raises(DodoNotConfigured):
        await call(gateway, sub)
    await gateway.close()

    assert fake.requests == []


@pytest.mark.parametrize(("endpoint", "spec", "call"), ALL_CALLS)
async def test_every_new_call_is_counted_under_its_method_name(
    fake: FakeDodo, served: tuple[FakeDodo, str], endpoint: str, spec: str, call: Call
) -> None:
    sub = fake.add_subscription()
    metrics = Metrics()
    gateway = DodoGateway(api_key=API_KEY, base_url=served[1], timeout=TIMEOUT, metrics=metrics, read_max_retries=0)
    fake.fail_next(spec, 422)
    try:
        with pytest.raises(DodoRefused):
            await call(gateway, sub)
        await call(gateway, sub)
    finally:
        await gateway.close()

    def count(status: str) -> float | None:
        return metrics.registry.get_sample_value(
            "entitlements_dodo_requests_total", {"endpoint": endpoint, "status": status}
        )

    assert (count("422"), count("ok")) == (1.0, 1.0)
    duration = metrics.registry.get_sample_value(
        "entitlements_dodo_request_duration_seconds_count", {"endpoint": endpoint}
    )
    assert duration == 2.0


async def test_refusals_are_logged_as_dotted_events_naming_the_subject(
    fake: FakeDodo, gateway: DodoGateway, caplog: pytest.LogCaptureFixture
) -> None:
    fake.customers.add("cus_5Hq2LrT9vX")
    fake.fail_next(PORTAL, 422)

    with caplog.at_level(logging.INFO, logger="entitlements.dodo"), pytest.raises(DodoRefused):
        await gateway.create_portal_session("cus_5Hq2LrT9vX", return_url=None, send_email=False)

    (record,) = [r for r in caplog.records if r.getMessage() == "dodo.refused"]
    assert record.__dict__["operation"] == "create_portal_session"
    assert record.__dict__["customer_id"] == "cus_5Hq2LrT9vX"
    assert record.__dict__["status"] == 422


# ---------------------------------------------------------------------------------------------- products


async def test_list_products_maps_each_recurring_price_and_name(fake: FakeDodo, gateway: DodoGateway) -> None:
    fake.product_overrides[PRODUCT_TEAM] = {
        "price_detail": {**fake.product_item(PRODUCT_TEAM)["price_detail"], "currency": "EUR", "price": 8900},
    }
    fake.product_overrides[PRODUCT_STARTER] = {
        "price_detail": {
            **fake.product_item(PRODUCT_STARTER)["price_detail"],
            "payment_frequency_count": 3,
            "payment_frequency_interval": "Month",
        },
    }

    products = await gateway.list_products()

    assert products == [
        DodoProduct(PRODUCT_STARTER, "Starter", 900, "USD", 3, "Month"),
        DodoProduct(PRODUCT_PRO, "Pro", 2900, "USD", 1, "Month"),
        DodoProduct(PRODUCT_TEAM, "Team", 8900, "EUR", 1, "Month"),
    ]
    (request,) = fake.requests_matching(PRODUCTS)
    assert request.query == {"page_number": "0", "page_size": "100"}


async def test_list_products_maps_one_time_and_usage_based_prices(fake: FakeDodo, gateway: DodoGateway) -> None:
    fake.product_overrides[PRODUCT_STARTER] = {
        "is_recurring": False,
        "price_detail": {"type": "one_time_price", "currency": "INR", "price": 49900, "discount": 0},
    }
    fake.product_overrides[PRODUCT_TEAM] = {
        "price_detail": {
            "type": "usage_based_price",
            "currency": "USD",
            "fixed_price": 2500,
            "payment_frequency_count": 1,
            "payment_frequency_interval": "Year",
            "subscription_period_count": 20,
            "subscription_period_interval": "Year",
            "meters": [{"meter_id": "mtr_9Kd2", "price_per_unit": "0.05", "free_threshold": 1000}],
        },
    }

    products = {p.product_id: p for p in await gateway.list_products()}

    assert products[PRODUCT_STARTER] == DodoProduct(PRODUCT_STARTER, "Starter", 49900, "INR", 0, "")
    assert products[PRODUCT_TEAM] == DodoProduct(PRODUCT_TEAM, "Team", 2500, "USD", 1, "Year")


async def test_list_products_skips_unreadable_prices_and_keeps_the_rest(
    fake: FakeDodo, gateway: DodoGateway, caplog: pytest.LogCaptureFixture
) -> None:
    fake.product_overrides[PRODUCT_STARTER] = {"price_detail": {"type": "tiered_price", "currency": "USD"}}
    fake.product_overrides[PRODUCT_TEAM] = {"price_detail": None, "name": None}

    with caplog.at_level(logging.WARNING, logger="entitlements.dodo"):
        products = await gateway.list_products()

    assert products == [DodoProduct(PRODUCT_PRO, "Pro", 2900, "USD", 1, "Month")]
    skipped = {r.__dict__["product_id"]: r.__dict__["why"] for r in caplog.records if r.msg == "dodo.product_skipped"}
    assert skipped == {PRODUCT_STARTER: "price type 'tiered_price' unknown", PRODUCT_TEAM: "no price_detail"}


async def test_list_products_reads_every_page_until_a_short_one(fake: FakeDodo, gateway: DodoGateway) -> None:
    extra = {f"pdt_extra{n}": 100 * n for n in range(1, 3)}
    fake.products.update(extra)

    products = await gateway.list_products(page_size=2)

    assert [p.product_id for p in products] == [PRODUCT_STARTER, PRODUCT_PRO, PRODUCT_TEAM, *extra]
    assert [r.query["page_number"] for r in fake.requests_matching(PRODUCTS)] == ["0", "1", "2"]


async def test_list_products_stops_at_an_empty_page_after_full_ones(fake: FakeDodo, gateway: DodoGateway) -> None:
    fake.products["pdt_extra"] = 100

    products = await gateway.list_products(page_size=2)

    assert len(products) == 4
    assert [r.query["page_number"] for r in fake.requests_matching(PRODUCTS)] == ["0", "1", "2"]


async def test_list_products_reads_at_most_max_pages_and_says_so(
    fake: FakeDodo, gateway: DodoGateway, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="entitlements.dodo"):
        products = await gateway.list_products(page_size=1, max_pages=2)

    assert [p.product_id for p in products] == [PRODUCT_STARTER, PRODUCT_PRO]
    assert len(fake.requests_matching(PRODUCTS)) == 2
    assert any(r.msg == "dodo.products_truncated" for r in caplog.records)


async def test_list_products_keeps_a_product_listed_twice_once(fake: FakeDodo, gateway: DodoGateway) -> None:
    # Pages 0 and 1 both answer with Pro, as a server that ignored page_number would.
    fake.fail_next(PRODUCTS, 200, times=2, body={"items": [fake.product_item(PRODUCT_PRO)]})

    products = await gateway.list_products(page_size=1)

    assert [p.product_id for p in products] == [PRODUCT_PRO, PRODUCT_TEAM]


async def test_list_products_retries_a_transient_failure(fake: FakeDodo, gateway: DodoGateway) -> None:
    fake.fail_next(PRODUCTS, 503, headers=FAST_RETRY)

    products = await gateway.list_products()

    assert len(products) == 3
    assert [r.retry_count for r in fake.requests_matching(PRODUCTS)] == [0, 1]


async def test_list_products_gives_up_as_unavailable_when_retries_run_out(fake: FakeDodo, gateway: DodoGateway) -> None:
    fake.fail_next(PRODUCTS, 500, times=3, headers=FAST_RETRY)

    with pytest.raises(DodoUnavailable) as err:
        await gateway.list_products()

    assert err.value.status == 500
    assert len(fake.requests_matching(PRODUCTS)) == 3


async def test_list_products_timeout_is_unavailable(fake: FakeDodo, no_retry_gateway: DodoGateway) -> None:
    fake.timeout_next(PRODUCTS)

    with pytest.raises(DodoUnavailable):
        await no_retry_gateway.list_products()


@pytest.mark.parametrize("body", ["<html><body>Maintenance</body></html>", {"products": []}, {"items": {}}])
async def test_list_products_page_that_cannot_be_read_is_unavailable(
    fake: FakeDodo, no_retry_gateway: DodoGateway, body: Any
) -> None:
    fake.fail_next(PRODUCTS, 200, body=body)

    with pytest.raises(DodoUnavailable) as err:
        await no_retry_gateway.list_products()

    assert not err.value.outcome_unknown


async def test_list_products_refused_is_refused_with_dodos_message(fake: FakeDodo, gateway: DodoGateway) -> None:
    fake.fail_next(PRODUCTS, 400, body={"code": "INVALID_QUERY", "message": "page_size too large"})

    with pytest.raises(DodoRefused) as err:
        await gateway.list_products()

    assert err.value.dodo_message == "page_size too large"


async def test_the_sdk_paginator_on_its_own_would_skip_page_one(fake: FakeDodo, served: tuple[FakeDodo, str]) -> None:
    # Pins why list_products numbers its pages itself: Dodo's pages start at 0, the SDK continues at page 2.
    client = dodopayments.AsyncDodoPayments(bearer_token=API_KEY, base_url=served[1], max_retries=0)
    try:
        listed = [product.product_id async for product in client.products.list(page_size=1)]
    finally:
        await client.close()

    assert listed == [PRODUCT_STARTER, PRODUCT_TEAM]
    assert PRODUCT_PRO not in listed


# ------------------------------------------------------------------------------------------ the fake's new endpoints


async def test_fake_wave2_answers_match_the_sdk_models_under_strict_validation(
    fake: FakeDodo, served: tuple[FakeDodo, str]
) -> None:
    sub = fake.add_subscription()
    customer_id = sub["customer"]["customer_id"]
    fake.product_overrides[PRODUCT_STARTER] = {
        "price_detail": {"type": "one_time_price", "currency": "USD", "price": 900},
    }
    client = dodopayments.AsyncDodoPayments(
        bearer_token=API_KEY, base_url=served[1], max_retries=0, _strict_response_validation=True
    )
    try:
        session = await client.checkout_sessions.create(
            product_cart=[{"product_id": PRODUCT_PRO, "quantity": 1}], customer={"customer_id": customer_id}
        )
        portal = await client.customers.customer_portal.create(customer_id, send_email=False)
        updated = await client.subscriptions.update(sub["subscription_id"], cancel_at_next_billing_date=True)
        page = await client.products.list(page_number=0, page_size=100)
    finally:
        await client.close()

    assert isinstance(session, CheckoutSessionResponse)
    assert session.checkout_url is not None
    assert isinstance(portal, CustomerPortalSession)
    assert isinstance(updated, Subscription)
    assert updated.cancel_at_next_billing_date is True
    assert all(isinstance(item, ProductListResponse) for item in page.items)
    assert [item.price_detail.type for item in page.items if item.price_detail is not None] == [
        "one_time_price",
        "recurring_price",
        "recurring_price",
    ]


async def test_fake_patch_cancel_now_stamps_cancelled_at_and_stays_a_valid_subscription(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    fake.frozen_now = NOW
    sub = fake.add_subscription()

    await gateway.update_subscription(sub["subscription_id"], status="cancelled")

    stored = fake.subscriptions[sub["subscription_id"]]
    assert (stored["status"], stored["cancelled_at"]) == ("cancelled", "2026-03-14T09:26:53Z")
    Subscription.model_validate(stored)


async def test_fake_completing_a_checkout_stores_the_subscription_it_bought(
    fake: FakeDodo, gateway: DodoGateway
) -> None:
    session = await gateway.create_checkout(
        **checkout_args(
            items=[CheckoutItem(PRODUCT_TEAM, 2, (Addon(ADDON_EXTRA_PROJECTS, 1),))],
            trial_period_days=7,
            metadata={"customer_ref": "org_42"},
        )
    )

    sub = fake.complete_checkout(session.session_id)

    got = await gateway.get_subscription(sub["subscription_id"])
    assert (got.state.product_id, got.payload["quantity"], got.payload["trial_period_days"]) == (PRODUCT_TEAM, 2, 7)
    assert got.payload["metadata"] == {"customer_ref": "org_42"}
    assert got.payload["customer"]["email"] == "grace@example.com"
    assert got.payload["customer"]["customer_id"] in fake.known_customers()
