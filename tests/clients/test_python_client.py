"""The Python client package (clients/python, DESIGN §4 and §13, issue 10): both clients against the real in-process
server for every RPC (customers by id or by ref), typed results and typed errors with the server's ErrorInfo,
deadlines, retries on a real UNAVAILABLE (a grpc.aio server in front of the service) only where repeating is safe,
and TLS.

The sync client runs in a worker thread: the server under test shares this test's event loop."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements_client import (
    NO_RETRY,
    AccessDecision,
    AccessReason,
    CancelSubscriptionResult,
    ChangePlanResult,
    CheckAccessResult,
    CheckoutAddon,
    CheckoutItem,
    CheckoutSession,
    CustomerLink,
    DeadlineExceeded,
    EffectiveAt,
    EntitlementsClient,
    EntitlementsError,
    FailedPrecondition,
    FeatureKind,
    InsufficientCredits,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Plan,
    PortalSession,
    ProrationMode,
    ReconnectPolicy,
    ResourceExhausted,
    ResumeSubscriptionResult,
    RetryPolicy,
    Subscription,
    SyncEntitlementsClient,
    Tls,
    Unauthenticated,
    Unavailable,
)
from entitlements_client._rpcs import RPCS
from entitlements_client.models import ProtoEnum, UsageEvent
from google.rpc import error_details_pb2

from service.app.dodo_gateway import DodoGateway
from service.domain.catalog import Catalog
from service.server import Running, start
from storage.engine import Database
from tests.clients.python_client_support import (
    METHODS,
    SERVICE,
    Flaky,
    flaky_front,
    known_subscription,
    pro_customer,
)
from tests.fakedodo import ADDON_EXTRA_SEAT, FakeDodo
from tests.pki import make_pki
from tests.support import API_TOKEN, CUSTOMER_ID, PRO, SUB_ID, TEAM, FakeClock, WebhookPoster, make_settings, utc

UNKNOWN_CUSTOMER = "cus_0Zz9Yy8Xx7Ww6Vv5Uu4Tt"
REF = "org_1337"
PERIOD_START = utc("2026-09-01T10:15:02.481233Z")
PERIOD_END = utc("2026-10-01T10:15:02.481233Z")
# Retries in tests: quick, but still real sleeps between real attempts.
QUICK_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)
Client = EntitlementsClient | SyncEntitlementsClient


class Calls:
    """Either client behind one awaitable surface: `await calls.check_access(...)`."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self.client, name)
        if isinstance(self.client, EntitlementsClient):
            return method  # type: ignore[no-any-return]

        async def in_a_thread(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return in_a_thread

    async def close(self) -> None:
        if isinstance(self.client, EntitlementsClient):
            await self.client.close()
        else:
            self.client.close()


def open_client(kind: str, target: str, **options: Any) -> Calls:
    options.setdefault("token", API_TOKEN)
    factory = EntitlementsClient if kind == "async" else SyncEntitlementsClient
    return Calls(factory(target, **options))


@pytest.fixture(params=["async", "sync"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def target(service: Running) -> str:
    return f"127.0.0.1:{service.grpc_port}"


@pytest.fixture
async def calls(kind: str, target: str) -> AsyncIterator[Calls]:
    opened = open_client(kind, target)
    yield opened
    await opened.close()


@pytest.fixture
async def flaky(target: str) -> AsyncIterator[Flaky]:
    async with flaky_front(target) as front:
        yield front


@pytest.fixture(autouse=True)
def dodo_time(fake_dodo: FakeDodo, clock: FakeClock) -> None:
    """Dodo and the service agree on "now", so plan changes and their prices are deterministic."""
    fake_dodo.frozen_now = clock.now


def key() -> str:
    return f"req-{uuid.uuid4().hex}"


async def raised(call: Awaitable[object]) -> EntitlementsError:
    with pytest.raises(EntitlementsError) as caught:
        await call
    return caught.value


# ----------------------------------------------------------------------------------------------------- every RPC


async def test_check_access_answers_a_typed_decision_for_each_kind_of_feature(
    calls: Calls, webhooks: WebhookPoster
) -> None:
    await pro_customer(webhooks)

    dashboard = await calls.check_access(CUSTOMER_ID, "dashboard")
    projects = await calls.check_access(CUSTOMER_ID, "projects")
    tokens = await calls.check_access(CUSTOMER_ID, "ai_tokens")
    stranger = await calls.check_access(UNKNOWN_CUSTOMER, "dashboard")

    assert dashboard == CheckAccessResult(
        allowed=True,
        reason=AccessReason.ACTIVE,
        status="active",
        subscription_id=SUB_ID,
        product_id=PRO,
        access_ends_at=None,
        limit=0,
        balance=None,
        kind=FeatureKind.BOOLEAN,
        stale=False,
        customer_id=CUSTOMER_ID,
    )
    # Still comparable with the generated constants, as callers of the old client did.
    assert dashboard.reason == pb.ACCESS_REASON_ACTIVE
    assert (projects.kind, projects.limit) == (FeatureKind.LIMIT, 50)
    assert (tokens.kind, tokens.balance) == (FeatureKind.CREDIT, Decimal("10000"))
    assert (stranger.allowed, stranger.reason) == (False, AccessReason.NO_SUBSCRIPTION)


async def test_get_subscription_returns_plain_values_with_aware_datetimes_and_decimal_balances(
    calls: Calls, webhooks: WebhookPoster
) -> None:
    await pro_customer(webhooks)

    by_id: Subscription = await calls.get_subscription(subscription_id=SUB_ID)
    by_customer: Subscription = await calls.get_subscription(customer_id=CUSTOMER_ID)

    assert by_customer == by_id
    assert (by_id.subscription_id, by_id.customer_id, by_id.customer_email) == (SUB_ID, CUSTOMER_ID, "ada@example.com")
    assert by_id.customer_ref == "", "no ref linked"
    assert (by_id.product_id, by_id.plan_name, by_id.status, by_id.quantity) == (PRO, "Pro", "active", 1)
    assert (by_id.current_period_start, by_id.current_period_end) == (PERIOD_START, PERIOD_END)
    assert by_id.current_period_start is not None
    assert by_id.current_period_start.tzinfo == UTC
    assert by_id.updated_at is not None
    assert by_id.updated_at.tzinfo == UTC
    assert (by_id.trial_ends_at, by_id.cancelled_at, by_id.scheduled_change) == (None, None, None)
    assert by_id.access == AccessDecision(allowed=True, reason=AccessReason.ACTIVE, access_ends_at=None)
    assert by_id.features == ("dashboard", "pro")
    assert dict(by_id.limits) == {"projects": 50, "seats": 5}
    assert by_id.credits["ai_tokens"] == Decimal("10000")
    assert (by_id.recurring_amount, by_id.currency, by_id.billing_interval) == (2900, "USD", "1 Month")


async def test_consume_credits_returns_exact_decimals_and_replays_a_repeated_key(
    calls: Calls, webhooks: WebhookPoster
) -> None:
    await pro_customer(webhooks)
    first_key = key()

    spent = await calls.consume_credits(
        CUSTOMER_ID, "ai_tokens", "25", idempotency_key=first_key, description="chat", metadata={"model": "small"}
    )
    again = await calls.consume_credits(
        CUSTOMER_ID, "ai_tokens", "25", idempotency_key=first_key, description="chat", metadata={"model": "small"}
    )
    fraction = await calls.consume_credits(CUSTOMER_ID, "ai_tokens", Decimal("0.25"), key())

    assert (spent.balance_after, spent.overage_after, spent.replayed) == (Decimal("9975"), Decimal("0"), False)
    assert spent.entry_id
    assert (again.entry_id, again.balance_after, again.replayed) == (spent.entry_id, Decimal("9975"), True)
    assert fraction.balance_after == Decimal("9974.75")


async def test_list_credit_ledger_pages_newest_first_and_iterating_follows_every_page(
    kind: str, calls: Calls, webhooks: WebhookPoster
) -> None:
    await pro_customer(webhooks)
    await calls.consume_credits(CUSTOMER_ID, "ai_tokens", "25", key(), description="first", metadata={"n": "1"})
    await calls.consume_credits(CUSTOMER_ID, "ai_tokens", "5", key(), description="second")

    page = await calls.list_credit_ledger(CUSTOMER_ID, "ai_tokens", page_size=1)
    rest = await calls.list_credit_ledger(CUSTOMER_ID, "ai_tokens", page_token=page.next_page_token)
    client = calls.client
    if isinstance(client, EntitlementsClient):
        every = [entry async for entry in client.iter_credit_ledger(CUSTOMER_ID, "ai_tokens", page_size=1)]
    else:
        every = await asyncio.to_thread(lambda: list(client.iter_credit_ledger(CUSTOMER_ID, "ai_tokens", page_size=1)))

    (newest,) = page.entries
    assert page.next_page_token
    assert (newest.kind, newest.amount, newest.balance_after, newest.description) == (
        "consumption",
        Decimal("-5"),
        Decimal("9970"),
        "second",
    )
    assert newest.created_at is not None
    assert newest.created_at.tzinfo == UTC
    assert [(entry.kind, entry.amount) for entry in rest.entries] == [
        ("consumption", Decimal("-25")),
        ("plan_grant", Decimal("10000")),
    ]
    assert rest.next_page_token == ""
    assert dict(rest.entries[0].metadata) == {"n": "1"}
    assert every == [newest, *rest.entries]


async def test_change_plan_prices_a_preview_then_moves_the_plan_once_per_idempotency_key(
    calls: Calls, fake_dodo: FakeDodo
) -> None:
    sub = fake_dodo.add_subscription()
    change_key = key()

    preview: ChangePlanResult = await calls.change_plan(sub["subscription_id"], TEAM, preview=True)
    changed: ChangePlanResult = await calls.change_plan(
        sub["subscription_id"],
        TEAM,
        proration_mode=ProrationMode.FULL_IMMEDIATELY,
        effective_at=EffectiveAt.IMMEDIATELY,
        idempotency_key=change_key,
    )
    replayed: ChangePlanResult = await calls.change_plan(
        sub["subscription_id"],
        TEAM,
        proration_mode=ProrationMode.FULL_IMMEDIATELY,
        effective_at=EffectiveAt.IMMEDIATELY,
        idempotency_key=change_key,
    )

    assert preview.immediate_charge > 0
    assert preview.currency == "USD"
    assert preview.subscription is not None
    assert preview.subscription.product_id == TEAM
    assert changed.subscription is not None
    assert (changed.subscription.product_id, changed.subscription.plan_name, changed.replayed) == (TEAM, "Team", False)
    assert replayed.replayed
    (sent,) = fake_dodo.requests_matching("POST /subscriptions/*/change-plan")
    assert sent.json["proration_billing_mode"] == "full_immediately"


async def test_the_async_client_still_takes_a_change_plan_request_message(target: str, fake_dodo: FakeDodo) -> None:
    sub = fake_dodo.add_subscription()
    async with EntitlementsClient(target, token=API_TOKEN) as client:
        result = await client.change_plan(
            pb.ChangePlanRequest(subscription_id=sub["subscription_id"], product_id=TEAM, preview=True)
        )

    assert result.subscription is not None

    assert result.subscription.product_id == TEAM


# ------------------------------------------------------------------------------------------- customers by ref


async def test_link_customer_then_every_customer_call_answers_by_ref(
    kind: str, calls: Calls, webhooks: WebhookPoster
) -> None:
    await pro_customer(webhooks)

    link: CustomerLink = await calls.link_customer(REF, CUSTOMER_ID)
    decision = await calls.check_access(customer_ref=REF, feature="dashboard")
    by_ref: Subscription = await calls.get_subscription(customer_ref=REF)
    by_id: Subscription = await calls.get_subscription(subscription_id=SUB_ID)
    spent = await calls.consume_credits(customer_ref=REF, credit="ai_tokens", amount="25", idempotency_key=key())
    page = await calls.list_credit_ledger(customer_ref=REF, credit="ai_tokens", page_size=1)
    client = calls.client
    if isinstance(client, EntitlementsClient):
        every = [entry async for entry in client.iter_credit_ledger(customer_ref=REF, credit="ai_tokens", page_size=1)]
    else:
        every = await asyncio.to_thread(
            lambda: list(client.iter_credit_ledger(customer_ref=REF, credit="ai_tokens", page_size=1))
        )
    unlinked = await calls.check_access(customer_ref="org_nobody", feature="dashboard")

    assert link == CustomerLink(customer_ref=REF, customer_id=CUSTOMER_ID)
    assert link.to_dict() == {"customer_ref": REF, "customer_id": CUSTOMER_ID}
    assert (decision.allowed, decision.reason, decision.subscription_id) == (True, AccessReason.ACTIVE, SUB_ID)
    assert (by_ref.subscription_id, by_ref.customer_id, by_ref.customer_ref) == (SUB_ID, CUSTOMER_ID, REF)
    assert by_id == by_ref
    assert spent.balance_after == Decimal("9975")
    assert [entry.entry_id for entry in page.entries] == [spent.entry_id]
    assert [(entry.kind, entry.amount) for entry in every] == [
        ("consumption", Decimal("-25")),
        ("plan_grant", Decimal("10000")),
    ]
    assert (unlinked.allowed, unlinked.reason) == (False, AccessReason.NO_SUBSCRIPTION)


CUSTOMER_MISNAMED: dict[str, Callable[[Any], object]] = {
    "check-access-both": lambda c: c.check_access(CUSTOMER_ID, "dashboard", customer_ref=REF),
    "check-access-neither": lambda c: c.check_access(feature="dashboard"),
    "get-subscription-neither": lambda c: c.get_subscription(),
    "get-subscription-two": lambda c: c.get_subscription(customer_id=CUSTOMER_ID, customer_ref=REF),
    "consume-credits-both": lambda c: c.consume_credits(CUSTOMER_ID, "ai_tokens", "1", "k", customer_ref=REF),
    "consume-credits-neither": lambda c: c.consume_credits(credit="ai_tokens", amount="1", idempotency_key="k"),
    "list-credit-ledger-both": lambda c: c.list_credit_ledger(CUSTOMER_ID, "ai_tokens", customer_ref=REF),
    "iter-credit-ledger-neither": lambda c: next(c.iter_credit_ledger(credit="ai_tokens")),
    "create-portal-session-both": lambda c: c.create_portal_session(CUSTOMER_ID, customer_ref=REF),
    "create-portal-session-neither": lambda c: c.create_portal_session(),
    "create-checkout-both": lambda c: c.create_checkout(
        [PRO], idempotency_key="k", customer_id=CUSTOMER_ID, customer_ref=REF
    ),
}


@pytest.mark.parametrize("case", list(CUSTOMER_MISNAMED))
def test_a_call_naming_both_a_customer_id_and_a_ref_or_neither_is_refused_before_anything_is_sent(
    case: str, flaky: Flaky
) -> None:
    misnamed = r"(exactly|at most) one of .*customer_id.* and customer_ref"
    with SyncEntitlementsClient(flaky.target, retry=NO_RETRY) as client, pytest.raises(ValueError, match=misnamed):
        CUSTOMER_MISNAMED[case](client)

    assert sum(flaky.attempts.values()) == 0


def test_a_missing_required_argument_beside_a_ref_is_a_type_error() -> None:
    with SyncEntitlementsClient("127.0.0.1:1") as client, pytest.raises(TypeError, match="feature"):
        client.check_access(customer_ref=REF)  # type: ignore[call-overload]


# ------------------------------------------------------------------------------------------------ checkout


async def test_create_checkout_sends_the_cart_and_every_field_and_replays_a_repeated_key(
    calls: Calls, fake_dodo: FakeDodo
) -> None:
    cart = [CheckoutItem(PRO, quantity=2, addons=(CheckoutAddon(ADDON_EXTRA_SEAT, quantity=1),))]
    fields: dict[str, Any] = {
        "customer_ref": REF,
        "email": "ada@example.com",
        "name": "Ada Lovelace",
        "trial_period_days": 14,
        "return_url": "https://app.example/billing/done",
        "cancel_url": "https://app.example/billing/cancelled",
        "discount_code": "WELCOME10",
        "metadata": {"plan_page": "pricing-v2"},
    }
    checkout_key = key()

    created: CheckoutSession = await calls.create_checkout(cart, idempotency_key=checkout_key, **fields)
    again: CheckoutSession = await calls.create_checkout(cart, idempotency_key=checkout_key, **fields)
    no_trial = await calls.create_checkout(
        [PRO], idempotency_key=key(), customer_ref="org_2", email="bo@example.com", trial_period_days=0
    )
    products_trial = await calls.create_checkout([PRO], idempotency_key=key(), email="cy@example.com")

    assert created.session_id.startswith("cks_")
    assert created.checkout_url.startswith("http")
    assert created.expires_at is not None
    assert created.expires_at.tzinfo == UTC
    assert not created.replayed
    assert again == CheckoutSession(created.session_id, created.checkout_url, created.expires_at, replayed=True)
    assert len({created.session_id, no_trial.session_id, products_trial.session_id}) == 3
    first, zero, default = fake_dodo.requests_matching("POST /checkouts")
    assert first.json["product_cart"] == [
        {"product_id": PRO, "quantity": 2, "addons": [{"addon_id": ADDON_EXTRA_SEAT, "quantity": 1}]}
    ]
    assert first.json["subscription_data"] == {"trial_period_days": 14}
    assert first.json["metadata"] == {"plan_page": "pricing-v2", "customer_ref": REF}
    assert first.json["customer"]["email"] == "ada@example.com"
    assert first.json["discount_codes"] == ["WELCOME10"]
    assert (first.json["return_url"], first.json["cancel_url"]) == (fields["return_url"], fields["cancel_url"])
    assert [item["product_id"] for item in zero.json["product_cart"]] == [PRO]
    assert zero.json["subscription_data"] == {"trial_period_days": 0}, "0 is sent: no trial"
    assert "subscription_data" not in default.json, "unset keeps the product's trial"


async def test_a_checkout_for_a_customer_with_access_is_already_subscribed_unless_additional_is_allowed(
    calls: Calls, webhooks: WebhookPoster, fake_dodo: FakeDodo
) -> None:
    await pro_customer(webhooks)
    fake_dodo.customers.add(CUSTOMER_ID)

    refused = await raised(calls.create_checkout([TEAM], idempotency_key=key(), customer_id=CUSTOMER_ID))
    allowed = await calls.create_checkout([TEAM], idempotency_key=key(), customer_id=CUSTOMER_ID, allow_additional=True)
    foreign = await raised(calls.create_checkout(["pdt_not_ours"], idempotency_key=key(), email="a@example.com"))

    assert isinstance(refused, FailedPrecondition)
    assert (refused.code, refused.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_SUBSCRIBED")
    assert allowed.session_id
    assert isinstance(foreign, InvalidArgument)
    assert (foreign.reason, foreign.field) == ("PRODUCT_NOT_IN_CATALOG", "product_id")
    (sent,) = fake_dodo.requests_matching("POST /checkouts")
    assert sent.json["customer"] == {"customer_id": CUSTOMER_ID}


def test_a_checkout_cart_must_be_items_or_product_ids() -> None:
    with SyncEntitlementsClient("127.0.0.1:1") as client:
        with pytest.raises(TypeError, match="sequence"):
            client.create_checkout(PRO, idempotency_key="k", email="a@example.com")
        with pytest.raises(TypeError, match="CheckoutItem"):
            client.create_checkout([3], idempotency_key="k", email="a@example.com")  # type: ignore[list-item]


# ------------------------------------------------------------------------------------------ portal sessions


async def test_create_portal_session_opens_a_link_for_a_known_customer_by_id_or_ref(
    calls: Calls, webhooks: WebhookPoster, fake_dodo: FakeDodo
) -> None:
    await pro_customer(webhooks)
    fake_dodo.customers.add(CUSTOMER_ID)

    by_id: PortalSession = await calls.create_portal_session(CUSTOMER_ID, return_url="https://app.example/account")
    sent_by_id = dict(fake_dodo.portal_sessions[-1])
    await calls.link_customer(REF, CUSTOMER_ID)
    by_ref: PortalSession = await calls.create_portal_session(customer_ref=REF, send_email=True)
    unknown = await raised(calls.create_portal_session(UNKNOWN_CUSTOMER))
    unlinked = await raised(calls.create_portal_session(customer_ref="org_nobody"))

    assert by_id.url.startswith("http")
    assert by_id.expires_at is not None
    assert by_id.expires_at.tzinfo == UTC
    assert (sent_by_id["return_url"], sent_by_id["send_email"]) == ("https://app.example/account", False)
    assert by_ref.url.startswith("http")
    assert fake_dodo.portal_sessions[-1]["send_email"] is True
    assert isinstance(unknown, NotFound)
    assert isinstance(unlinked, NotFound)
    assert len(fake_dodo.portal_sessions) == 2


# ------------------------------------------------------------------------------------------ cancel and resume


async def test_cancel_at_period_end_keeps_access_then_resume_restores_it_and_keys_replay(
    calls: Calls, fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    sub_id = (await known_subscription(fake_dodo, webhooks, clock))["subscription_id"]
    cancel_key, resume_key = key(), key()

    cancelled: CancelSubscriptionResult = await calls.cancel_subscription(
        sub_id, idempotency_key=cancel_key, reason="cancelled_by_customer"
    )
    replayed: CancelSubscriptionResult = await calls.cancel_subscription(
        sub_id, idempotency_key=cancel_key, reason="cancelled_by_customer"
    )
    reused = await raised(calls.cancel_subscription(sub_id, idempotency_key=cancel_key, immediately=True))
    resumed: ResumeSubscriptionResult = await calls.resume_subscription(sub_id, idempotency_key=resume_key)
    resumed_again: ResumeSubscriptionResult = await calls.resume_subscription(sub_id, idempotency_key=resume_key)

    assert cancelled.subscription is not None
    assert (cancelled.subscription.subscription_id, cancelled.subscription.cancel_at_period_end) == (sub_id, True)
    assert cancelled.subscription.access.reason == AccessReason.CANCELLATION_SCHEDULED
    assert cancelled.subscription.access.allowed
    assert not cancelled.replayed
    assert replayed.replayed
    assert isinstance(reused, FailedPrecondition)
    assert reused.reason == "IDEMPOTENCY_KEY_REUSED"
    assert resumed.subscription is not None
    assert (resumed.subscription.cancel_at_period_end, resumed.subscription.access.reason) == (
        False,
        AccessReason.ACTIVE,
    )
    assert (resumed.replayed, resumed_again.replayed) == (False, True)
    cancel_patch, resume_patch = fake_dodo.requests_matching("PATCH /subscriptions/*")
    assert cancel_patch.json == {"cancel_at_next_billing_date": True, "cancel_reason": "cancelled_by_customer"}
    assert resume_patch.json == {"cancel_at_next_billing_date": False}


async def test_cancel_immediately_ends_access_now(
    calls: Calls, fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    sub_id = (await known_subscription(fake_dodo, webhooks, clock))["subscription_id"]

    cancelled = await calls.cancel_subscription(
        sub_id, idempotency_key=key(), immediately=True, reason="moving to a competitor"
    )

    assert cancelled.subscription is not None
    assert (cancelled.subscription.status, cancelled.subscription.access.allowed) == ("cancelled", False)
    (patch,) = fake_dodo.requests_matching("PATCH /subscriptions/*")
    assert patch.json == {"status": "cancelled", "cancellation_comment": "moving to a competitor"}


async def test_cancelling_an_unknown_subscription_is_not_found_and_resuming_an_active_one_failed_precondition(
    calls: Calls, fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    sub_id = (await known_subscription(fake_dodo, webhooks, clock))["subscription_id"]

    missing = await raised(calls.cancel_subscription("sub_0Nn0Nn0Nn0Nn0Nn0Nn0Nn", idempotency_key=key()))
    nothing_to_resume = await raised(calls.resume_subscription(sub_id, idempotency_key=key()))

    assert isinstance(missing, NotFound)
    assert isinstance(nothing_to_resume, FailedPrecondition)
    assert fake_dodo.requests_matching("PATCH /subscriptions/*") == []


async def test_a_cancellation_while_a_plan_change_is_in_flight_is_plan_change_in_progress(
    calls: Calls, fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    sub_id = (await known_subscription(fake_dodo, webhooks, clock))["subscription_id"]
    fake_dodo.latency = 0.6  # the plan change waits on Dodo while it holds the subscription
    asked = len(fake_dodo.requests)

    change = asyncio.ensure_future(calls.change_plan(sub_id, TEAM, idempotency_key=key()))
    # The change has claimed the subscription once it has asked Dodo anything.
    for _ in range(500):
        if len(fake_dodo.requests) > asked or change.done():
            break
        await asyncio.sleep(0.01)
    busy = await raised(calls.cancel_subscription(sub_id, idempotency_key=key()))
    changed: ChangePlanResult = await change

    assert isinstance(busy, FailedPrecondition)
    assert busy.reason == "PLAN_CHANGE_IN_PROGRESS"
    assert changed.subscription is not None
    assert changed.subscription.product_id == TEAM
    assert fake_dodo.requests_matching("PATCH /subscriptions/*") == []


# ------------------------------------------------------------------------------------------------- plans


async def test_list_plans_returns_the_catalog_with_dodos_prices(calls: Calls, fake_dodo: FakeDodo) -> None:
    plans = await calls.list_plans()

    assert isinstance(plans, tuple)
    by_id = {plan.product_id: plan for plan in plans}
    assert by_id[PRO] == Plan(
        product_id=PRO,
        name="Pro",
        features=("dashboard", "pro"),
        limits={"projects": 50, "seats": 5},
        credits={"ai_tokens": Decimal("10000")},
        trial_credits={"ai_tokens": Decimal("1000")},
        grace_period_days=3,
        price=fake_dodo.products[PRO],
        currency="USD",
        billing_interval="1 Month",
    )
    assert by_id[PRO].to_dict()["credits"] == {"ai_tokens": "10000"}
    assert TEAM in by_id


async def test_list_plans_without_dodo_access_has_no_prices(
    kind: str, database_url: str, db: Database, clock: FakeClock, catalog: Catalog
) -> None:
    running = await start(make_settings(database_url), clock=clock, catalog=catalog, db=db, dodo=DodoGateway(None))
    calls = open_client(kind, f"127.0.0.1:{running.grpc_port}")
    try:
        plans = await calls.list_plans()
    finally:
        await calls.close()
        await running.stop(0)

    assert {plan.product_id for plan in plans} == set(catalog.plans)
    assert all((plan.price, plan.currency) == (None, "") for plan in plans)


# ------------------------------------------------------------------------------------------------- typed errors


async def test_a_field_over_its_limit_is_invalid_argument_naming_the_field(
    calls: Calls, webhooks: WebhookPoster
) -> None:
    await pro_customer(webhooks)

    error = await raised(calls.consume_credits(CUSTOMER_ID, "ai_tokens", "1", key(), description="x" * 1001))

    assert isinstance(error, InvalidArgument)
    assert (error.code, error.reason, error.domain) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "FIELD_INVALID",
        "entitlements.v1",
    )
    assert (error.metadata["field"], error.field) == ("description", "description")
    assert error.message
    (info,) = [detail for detail in error.details if isinstance(detail, error_details_pb2.ErrorInfo)]
    assert info.reason == "FIELD_INVALID"


async def test_too_few_credits_is_insufficient_credits_carrying_the_balance(
    calls: Calls, webhooks: WebhookPoster
) -> None:
    await pro_customer(webhooks)

    error = await raised(calls.consume_credits(CUSTOMER_ID, "ai_tokens", "10001", key()))

    assert isinstance(error, InsufficientCredits)
    assert isinstance(error, ResourceExhausted)
    assert (error.code, error.reason, error.metadata["balance"]) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "INSUFFICIENT_CREDITS",
        "10000",
    )
    assert error.balance == Decimal("10000")
    assert str(error).startswith(f"RESOURCE_EXHAUSTED: {error.message} (reason=INSUFFICIENT_CREDITS, balance=10000")


async def test_an_unknown_subscription_is_not_found(calls: Calls) -> None:
    error = await raised(calls.get_subscription(subscription_id="sub_0Missing000000000000"))

    assert isinstance(error, NotFound)
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert str(error).startswith("NOT_FOUND: ")
    assert "sub_0Missing000000000000" in error.message


async def test_a_reused_idempotency_key_with_other_parameters_is_failed_precondition(
    calls: Calls, webhooks: WebhookPoster
) -> None:
    await pro_customer(webhooks)
    reused = key()
    await calls.consume_credits(CUSTOMER_ID, "ai_tokens", "1", reused)

    error = await raised(calls.consume_credits(CUSTOMER_ID, "ai_tokens", "2", reused))

    assert isinstance(error, FailedPrecondition)
    assert error.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_consuming_a_credit_without_access_is_permission_denied_with_the_access_reason(calls: Calls) -> None:
    error = await raised(calls.consume_credits(UNKNOWN_CUSTOMER, "ai_tokens", "1", key()))

    assert isinstance(error, PermissionDenied)
    assert error.reason == "ACCESS_REASON_NO_SUBSCRIPTION"


@pytest.mark.parametrize("token", [None, "not-the-token"], ids=["no-token", "wrong-token"])
async def test_a_missing_or_unknown_token_is_unauthenticated(kind: str, target: str, token: str | None) -> None:
    calls = open_client(kind, target, token=token)
    try:
        error = await raised(calls.check_access(CUSTOMER_ID, "dashboard"))
    finally:
        await calls.close()

    assert isinstance(error, Unauthenticated)


def test_a_token_grpc_could_not_send_is_refused_when_the_client_is_made_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="printable ASCII") as caught:
        SyncEntitlementsClient("127.0.0.1:1", token="sk_live_…secret")

    assert "secret" not in str(caught.value)


def test_a_client_certificate_without_its_key_is_refused() -> None:
    with pytest.raises(ValueError, match="go together"):
        Tls(certificate_chain=b"-----BEGIN CERTIFICATE-----")


def test_floats_are_refused_as_amounts_since_they_are_not_exact() -> None:
    client = SyncEntitlementsClient("127.0.0.1:1")
    try:
        with pytest.raises(TypeError, match="amount"):
            client.consume_credits(CUSTOMER_ID, "ai_tokens", 0.1, key())  # type: ignore[call-overload]
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class Known:
    """Subscriptions both the fake Dodo and the service know: one active, one with its cancellation scheduled."""

    active: str
    scheduled: str


Case = tuple[str, Callable[[Calls, Known], Awaitable[object]]]

SAFE_CALLS: dict[str, Case] = {
    "check-access": ("CheckAccess", lambda c, k: c.check_access(CUSTOMER_ID, "dashboard")),
    "check-access-by-ref": ("CheckAccess", lambda c, k: c.check_access(customer_ref=REF, feature="dashboard")),
    "get-subscription": ("GetSubscription", lambda c, k: c.get_subscription(subscription_id=SUB_ID)),
    "list-credit-ledger": ("ListCreditLedger", lambda c, k: c.list_credit_ledger(CUSTOMER_ID, "ai_tokens")),
    "consume-credits-with-key": (
        "ConsumeCredits",
        lambda c, k: c.consume_credits(CUSTOMER_ID, "ai_tokens", "1", key()),
    ),
    "change-plan-preview": ("ChangePlan", lambda c, k: c.change_plan(k.active, TEAM, preview=True)),
    "change-plan-with-key": ("ChangePlan", lambda c, k: c.change_plan(k.active, TEAM, idempotency_key=key())),
    "create-checkout-with-key": (
        "CreateCheckout",
        lambda c, k: c.create_checkout([PRO], idempotency_key=key(), customer_ref="org_new", email="a@example.com"),
    ),
    "cancel-subscription-with-key": (
        "CancelSubscription",
        lambda c, k: c.cancel_subscription(k.active, idempotency_key=key()),
    ),
    "resume-subscription-with-key": (
        "ResumeSubscription",
        lambda c, k: c.resume_subscription(k.scheduled, idempotency_key=key()),
    ),
    "list-plans": ("ListPlans", lambda c, k: c.list_plans()),
    "link-customer": ("LinkCustomer", lambda c, k: c.link_customer(REF, CUSTOMER_ID)),
    "create-charge-with-key": ("CreateCharge", lambda c, k: c.create_charge(k.active, 2500, idempotency_key=key())),
    "get-charge": ("GetCharge", lambda c, k: _charge_then_get(c, k)),
    "record-usage": (
        "RecordUsage",
        lambda c, k: c.record_usage(CUSTOMER_ID, [UsageEvent(key(), "api.tokens", properties={"tokens": 3})]),
    ),
    "get-usage": ("GetUsage", lambda c, k: c.get_usage(CUSTOMER_ID, "api.tokens")),
    # A stream is not retried but resumed from its cursor: the watch reconnects after each UNAVAILABLE.
    "watch-entitlements": ("WatchEntitlements", lambda c, k: _first_heartbeat(c)),
}
UNSAFE_CALLS: dict[str, Case] = {
    "create-charge-without-key": ("CreateCharge", lambda c, k: c.create_charge(k.active, 2500, idempotency_key="")),
    "consume-credits-without-key": (
        "ConsumeCredits",
        lambda c, k: c.consume_credits(CUSTOMER_ID, "ai_tokens", "1", ""),
    ),
    "change-plan-without-key": ("ChangePlan", lambda c, k: c.change_plan(k.active, TEAM)),
    "cancel-subscription-without-key": (
        "CancelSubscription",
        lambda c, k: c.cancel_subscription(k.active, idempotency_key=""),
    ),
    "create-portal-session": ("CreatePortalSession", lambda c, k: c.create_portal_session(CUSTOMER_ID)),
    "create-portal-session-sending-email": (
        "CreatePortalSession",
        lambda c, k: c.create_portal_session(CUSTOMER_ID, send_email=True),
    ),
}


async def _first_heartbeat(calls: Calls) -> object:
    quick = ReconnectPolicy(initial_backoff=0.01, max_backoff=0.05)
    if isinstance(calls.client, EntitlementsClient):
        async with calls.client.watch(heartbeats=True, reconnect=quick) as watch:
            return await anext(watch)
    sync = calls.client

    def first() -> object:
        with sync.watch(heartbeats=True, reconnect=quick) as watch:
            return next(watch)

    return await asyncio.to_thread(first)


async def _charge_then_get(calls: Calls, known: Known) -> object:
    charge_key = key()
    await calls.create_charge(known.active, 2500, idempotency_key=charge_key)
    return await calls.get_charge(idempotency_key=charge_key)


async def known(fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock) -> Known:
    """Everything a retry case may call succeeds against: the fixture customer (on Pro, known at Dodo, its ref
    linked) and two subscriptions known on both sides."""
    await pro_customer(webhooks)
    fake_dodo.customers.add(CUSTOMER_ID)
    active = await known_subscription(fake_dodo, webhooks, clock)
    scheduled = await known_subscription(fake_dodo, webhooks, clock, cancel_at_next_billing_date=True)
    return Known(active["subscription_id"], scheduled["subscription_id"])


@pytest.mark.parametrize("case", list(SAFE_CALLS))
async def test_a_call_safe_to_repeat_is_retried_on_unavailable_until_it_succeeds(
    kind: str, case: str, flaky: Flaky, webhooks: WebhookPoster, fake_dodo: FakeDodo, clock: FakeClock
) -> None:
    subscriptions = await known(fake_dodo, webhooks, clock)
    calls = open_client(kind, flaky.target, retry=QUICK_RETRY)
    method, call = SAFE_CALLS[case]
    try:
        await calls.link_customer(REF, CUSTOMER_ID)
        flaky.attempts.clear()
        flaky.fail_first = 2
        await call(calls, subscriptions)
    finally:
        await calls.close()

    assert flaky.attempts[method] == 3


@pytest.mark.parametrize("case", list(UNSAFE_CALLS))
async def test_a_call_that_is_not_safe_to_repeat_is_tried_once_on_unavailable(
    kind: str, case: str, flaky: Flaky, webhooks: WebhookPoster, fake_dodo: FakeDodo, clock: FakeClock
) -> None:
    # Set up so that a (wrong) second attempt would succeed.
    subscriptions = await known(fake_dodo, webhooks, clock)
    method, call = UNSAFE_CALLS[case]
    flaky.fail_first = 1
    calls = open_client(kind, flaky.target, retry=QUICK_RETRY)
    try:
        error = await raised(call(calls, subscriptions))
    finally:
        await calls.close()

    assert isinstance(error, Unavailable)
    assert flaky.attempts[method] == 1
    assert fake_dodo.portal_sessions == []


def test_every_rpc_has_a_retry_case_saying_whether_it_is_repeated() -> None:
    covered = {method for method, _ in (*SAFE_CALLS.values(), *UNSAFE_CALLS.values())}

    assert sorted(set(METHODS) - covered) == []


async def test_retries_stop_after_the_policys_attempts_with_the_last_unavailable(kind: str, flaky: Flaky) -> None:
    flaky.fail_first = 1000
    calls = open_client(kind, flaky.target, retry=QUICK_RETRY)
    try:
        error = await raised(calls.check_access(CUSTOMER_ID, "dashboard"))
    finally:
        await calls.close()

    assert isinstance(error, Unavailable)
    assert "attempt 4" in error.message
    assert flaky.attempts["CheckAccess"] == QUICK_RETRY.max_attempts


async def test_no_retry_policy_means_one_attempt(kind: str, flaky: Flaky) -> None:
    flaky.fail_first = 1
    calls = open_client(kind, flaky.target, retry=NO_RETRY)
    try:
        error = await raised(calls.check_access(CUSTOMER_ID, "dashboard"))
    finally:
        await calls.close()

    assert isinstance(error, Unavailable)
    assert flaky.attempts["CheckAccess"] == 1


async def test_failures_other_than_unavailable_are_never_retried(kind: str, flaky: Flaky) -> None:
    calls = open_client(kind, flaky.target, retry=QUICK_RETRY)
    try:
        error = await raised(calls.check_access(CUSTOMER_ID, "no_such_feature"))
    finally:
        await calls.close()

    assert isinstance(error, InvalidArgument)
    assert flaky.attempts["CheckAccess"] == 1


async def test_retries_back_off_between_attempts(kind: str, flaky: Flaky) -> None:
    flaky.fail_first = 2
    spaced = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=1.0, jitter=0)
    calls = open_client(kind, flaky.target, retry=spaced)
    started = time.monotonic()
    try:
        await calls.check_access(CUSTOMER_ID, "dashboard")
    finally:
        await calls.close()

    # 0.2 s before the second attempt, 0.4 s before the third.
    assert time.monotonic() - started >= 0.6
    assert flaky.attempts["CheckAccess"] == 3


async def test_retries_never_outlast_the_calls_deadline(kind: str, flaky: Flaky) -> None:
    flaky.fail_first = 1000
    patient = RetryPolicy(max_attempts=100, initial_backoff=0.05, max_backoff=0.2)
    calls = open_client(kind, flaky.target, retry=patient, timeout=0.6)
    started = time.monotonic()
    try:
        error = await raised(calls.check_access(CUSTOMER_ID, "dashboard"))
    finally:
        await calls.close()

    assert isinstance(error, Unavailable | DeadlineExceeded)
    assert time.monotonic() - started < 0.6 + 0.5
    assert 1 < flaky.attempts["CheckAccess"] < 100


def test_backoff_grows_exponentially_up_to_its_cap_with_jitter_inside_bounds() -> None:
    policy = RetryPolicy(initial_backoff=0.1, multiplier=2, max_backoff=1.0, jitter=0.5)
    rng = random.Random(7)
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]

    drawn = {retry: [policy.backoff(retry, rng) for _ in range(200)] for retry in range(1, len(caps) + 1)}

    for retry, cap in enumerate(caps, start=1):
        assert all(cap / 2 <= delay <= cap for delay in drawn[retry]), retry
        assert len(set(drawn[retry])) > 100, "no jitter"
    assert RetryPolicy(initial_backoff=0.1, jitter=0).backoff(3) == pytest.approx(0.4)


# --------------------------------------------------------------------------------------------------- deadlines


async def test_a_call_gets_the_clients_default_timeout_as_its_deadline(kind: str, flaky: Flaky) -> None:
    flaky.stall = 5.0
    calls = open_client(kind, flaky.target, timeout=0.3)
    started = time.monotonic()
    try:
        error = await raised(calls.check_access(CUSTOMER_ID, "dashboard"))
    finally:
        await calls.close()

    assert isinstance(error, DeadlineExceeded)
    assert time.monotonic() - started < 2.0
    assert flaky.attempts["CheckAccess"] == 1


async def test_a_per_call_timeout_overrides_the_clients_default(kind: str, flaky: Flaky) -> None:
    flaky.stall = 0.5
    calls = open_client(kind, flaky.target, timeout=0.2)
    try:
        answered = await calls.check_access(CUSTOMER_ID, "dashboard", timeout=10)
        started = time.monotonic()
        flaky.stall = 5.0
        error = await raised(calls.check_access(CUSTOMER_ID, "dashboard", timeout=0.3))
        elapsed = time.monotonic() - started
    finally:
        await calls.close()

    assert answered.reason == AccessReason.NO_SUBSCRIPTION
    assert isinstance(error, DeadlineExceeded)
    assert elapsed < 2.0


# --------------------------------------------------------------------------------------------------------- TLS


async def test_mutual_tls_with_a_private_ca_is_answered_and_a_client_without_a_certificate_is_not(
    kind: str, database_url: str, db: Database, clock: FakeClock, catalog: Catalog, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    running = await start(
        make_settings(database_url, **pki.server_env()),
        clock=clock,
        catalog=catalog,
        db=Database.from_url(database_url, pool_size=4),
    )
    target = f"127.0.0.1:{running.grpc_port}"
    mutual = Tls.from_files(pki.ca.cert_path, pki.client.cert_path, pki.client.key_path)
    try:
        trusted = open_client(kind, target, tls=mutual)
        without_certificate = open_client(kind, target, tls=Tls.from_files(pki.ca.cert_path), retry=NO_RETRY)
        plaintext = open_client(kind, target, retry=NO_RETRY)
        try:
            answered = await trusted.check_access(CUSTOMER_ID, "dashboard")
            refused = [
                await raised(other.check_access(CUSTOMER_ID, "dashboard")) for other in (without_certificate, plaintext)
            ]
        finally:
            for opened in (trusted, without_certificate, plaintext):
                await opened.close()
    finally:
        await running.stop(0)

    assert answered.reason == AccessReason.NO_SUBSCRIPTION
    assert [type(error) for error in refused] == [Unavailable, Unavailable]


def test_tls_files_that_cannot_be_read_are_refused_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValueError, match=r"CA certificate: cannot read .*nope\.pem"):
        Tls.from_files(missing)


# ------------------------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (AccessReason, pb.AccessReason),
        (FeatureKind, pb.FeatureKind),
        (ProrationMode, pb.ProrationMode),
        (EffectiveAt, pb.EffectiveAt),
    ],
    ids=lambda kind: getattr(kind, "__name__", "proto"),
)
def test_client_enums_mirror_the_proto_enums(ours: type[ProtoEnum], theirs: Any) -> None:
    assert {member.proto_name: int(member) for member in ours} == dict(theirs.items())


def test_an_enum_value_from_a_newer_server_reads_as_unspecified() -> None:
    assert AccessReason(42) is AccessReason.UNSPECIFIED


def snake_case(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def test_every_rpc_the_client_covers_is_in_the_contract_with_the_same_messages() -> None:
    mismatched = {
        name: rpc.response_type.DESCRIPTOR.full_name
        for name, rpc in RPCS.items()
        if name not in SERVICE.methods_by_name
        or SERVICE.methods_by_name[name].output_type.full_name != rpc.response_type.DESCRIPTOR.full_name
    }

    assert mismatched == {}


def test_the_client_covers_every_rpc_the_contract_declares() -> None:
    assert sorted(set(METHODS) - set(RPCS)) == []


def test_every_rpc_the_contract_declares_has_a_method_on_both_clients() -> None:
    missing = [
        f"{client.__name__}.{snake_case(name)}"
        for client in (EntitlementsClient, SyncEntitlementsClient)
        for name in METHODS
        if not callable(getattr(client, snake_case(name), None))
    ]

    assert missing == []
