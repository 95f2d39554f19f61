"""The CLI (`entitlements` / `python -m entitlements_client`) against the real in-process server: every RPC as a
subcommand printing one snake_case JSON object, and every failure as exactly one line on stderr with an exit status
for its class (1: the call failed, 2: the command line is wrong), never a traceback.

`main(argv)` runs in a worker thread (the server shares this test's event loop); a few cases run as processes."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from entitlements_client._rpcs import RPCS
from entitlements_client.cli import COMMANDS, command_name, main

from service.domain.catalog import Catalog
from service.server import Running, start
from storage.engine import Database
from tests.clients.python_client_support import (
    METHODS,
    Flaky,
    flaky_front,
    known_subscription,
    pro_customer,
)
from tests.fakedodo import ADDON_EXTRA_SEAT, FakeDodo
from tests.pki import make_pki
from tests.support import API_TOKEN, CUSTOMER_ID, PRO, SUB_ID, TEAM, FakeClock, WebhookPoster, make_settings

UNKNOWN_CUSTOMER = "cus_0Zz9Yy8Xx7Ww6Vv5Uu4Tt"
REF = "org_1337"
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert (self.code, self.stderr) == (0, ""), self.stderr
        return json.loads(self.stdout)

    def error_line(self) -> str:
        """The one line a failure prints; fails unless there is exactly one and nothing went to stdout."""
        lines = self.stderr.splitlines()
        assert len(lines) == 1, self.stderr
        assert self.stdout == ""
        assert "Traceback" not in self.stderr
        assert lines[0].startswith("error: ")
        return lines[0]


async def cli(*argv: str, environ: dict[str, str] | None = None) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(main, list(argv), environ=environ or {}, stdout=out, stderr=err)
    return Outcome(code, out.getvalue(), err.getvalue())


@pytest.fixture
def target(service: Running) -> str:
    return f"127.0.0.1:{service.grpc_port}"


@pytest.fixture
def connect(target: str) -> tuple[str, ...]:
    return ("--target", target, "--token", API_TOKEN)


@pytest.fixture(autouse=True)
def dodo_time(fake_dodo: FakeDodo, clock: FakeClock) -> None:
    fake_dodo.frozen_now = clock.now


@pytest.fixture
async def flaky(target: str) -> AsyncIterator[Flaky]:
    async with flaky_front(target) as front:
        yield front


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def key() -> str:
    return f"req-{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------------------------------ success


async def test_check_access_prints_one_snake_case_json_object(
    connect: tuple[str, ...], webhooks: WebhookPoster
) -> None:
    await pro_customer(webhooks)

    by_options = await cli(*connect, "check-access", "--customer-id", CUSTOMER_ID, "--feature", "dashboard")
    positional = await cli(*connect, "check-access", CUSTOMER_ID, "dashboard")
    credit = await cli(*connect, "check-access", CUSTOMER_ID, "ai_tokens")

    assert by_options.json() == {
        "allowed": True,
        "reason": "ACCESS_REASON_ACTIVE",
        "status": "active",
        "subscription_id": SUB_ID,
        "product_id": PRO,
        "access_ends_at": None,
        "limit": 0,
        "balance": None,
        "kind": "FEATURE_KIND_BOOLEAN",
        "stale": False,
        "customer_id": CUSTOMER_ID,
    }
    assert positional.json() == by_options.json()
    assert (credit.json()["balance"], credit.json()["kind"]) == ("10000", "FEATURE_KIND_CREDIT")


async def test_connection_options_may_also_follow_the_subcommand(connect: tuple[str, ...]) -> None:
    outcome = await cli("check-access", *connect, "--customer-id", UNKNOWN_CUSTOMER, "--feature", "dashboard")

    assert outcome.json()["reason"] == "ACCESS_REASON_NO_SUBSCRIPTION"


async def test_target_and_token_fall_back_to_the_environment(target: str) -> None:
    environ = {"ENTITLEMENTS_TARGET": target, "ENTITLEMENTS_TOKEN": API_TOKEN}

    outcome = await cli("check-access", UNKNOWN_CUSTOMER, "dashboard", environ=environ)
    without_token = await cli("check-access", UNKNOWN_CUSTOMER, "dashboard", environ={"ENTITLEMENTS_TARGET": target})

    assert outcome.json()["allowed"] is False
    assert without_token.error_line().startswith("error: UNAUTHENTICATED: ")


async def test_get_subscription_prints_the_subscription_by_id_or_by_customer(
    connect: tuple[str, ...], webhooks: WebhookPoster
) -> None:
    await pro_customer(webhooks)

    by_id = (await cli(*connect, "get-subscription", "--subscription-id", SUB_ID)).json()
    by_customer = (await cli(*connect, "get-subscription", "--customer-id", CUSTOMER_ID)).json()

    assert by_customer == by_id
    assert (by_id["product_id"], by_id["plan_name"], by_id["status"]) == (PRO, "Pro", "active")
    assert by_id["current_period_start"] == "2026-09-01T10:15:02.481233Z"
    assert by_id["access"] == {"allowed": True, "reason": "ACCESS_REASON_ACTIVE", "access_ends_at": None}
    assert by_id["credits"]["ai_tokens"] == "10000"
    assert by_id["limits"] == {"projects": 50, "seats": 5}
    assert by_id["scheduled_change"] is None


async def test_consume_credits_then_list_credit_ledger_show_the_entry_with_its_metadata(
    connect: tuple[str, ...], webhooks: WebhookPoster
) -> None:
    await pro_customer(webhooks)
    consume = (*connect, "consume-credits", "--customer-id", CUSTOMER_ID, "--credit", "ai_tokens", "--amount", "25")

    spent = await cli(
        *consume, "--idempotency-key", key(), "--description", "chat", "--metadata", "model=small", "--metadata", "n=1"
    )
    ledger = (*connect, "list-credit-ledger", "--customer-id", CUSTOMER_ID, "--credit", "ai_tokens")
    first_page = (await cli(*ledger, "--page-size", "1")).json()
    everything = (await cli(*ledger, "--page-size", "1", "--all")).json()

    assert {name: spent.json()[name] for name in ("balance_after", "overage_after", "replayed")} == {
        "balance_after": "9975",
        "overage_after": "0",
        "replayed": False,
    }
    (newest,) = first_page["entries"]
    assert (newest["entry_id"], newest["amount"], newest["kind"]) == (spent.json()["entry_id"], "-25", "consumption")
    assert (newest["description"], newest["metadata"]) == ("chat", {"model": "small", "n": "1"})
    assert newest["created_at"].endswith("Z")
    assert first_page["next_page_token"]
    assert [entry["kind"] for entry in everything["entries"]] == ["consumption", "plan_grant"]
    assert everything["next_page_token"] == ""


async def test_change_plan_previews_and_changes_with_every_request_field(
    connect: tuple[str, ...], fake_dodo: FakeDodo
) -> None:
    sub = fake_dodo.add_subscription()["subscription_id"]
    change = (*connect, "change-plan", "--subscription-id", sub, "--product-id", TEAM)

    preview = (await cli(*change, "--preview")).json()
    changed = (
        await cli(
            *change,
            "--quantity",
            "2",
            "--proration-mode",
            "full-immediately",
            "--effective-at",
            "immediately",
            "--idempotency-key",
            key(),
        )
    ).json()

    assert isinstance(preview["immediate_charge"], int)
    assert preview["immediate_charge"] > 0
    assert preview["currency"] == "USD"
    assert (changed["subscription"]["product_id"], changed["subscription"]["quantity"]) == (TEAM, 2)
    (sent,) = fake_dodo.requests_matching("POST /subscriptions/*/change-plan")
    assert (sent.json["proration_billing_mode"], sent.json["quantity"]) == ("full_immediately", 2)


async def test_customer_ref_names_the_customer_wherever_customer_id_does(
    connect: tuple[str, ...], webhooks: WebhookPoster
) -> None:
    await pro_customer(webhooks)

    linked = (await cli(*connect, "link-customer", "--customer-ref", REF, "--customer-id", CUSTOMER_ID)).json()
    positional = (await cli(*connect, "check-access", "--customer-ref", REF, "dashboard")).json()
    by_option = (await cli(*connect, "check-access", "--customer-ref", REF, "--feature", "ai_tokens")).json()
    subscription = (await cli(*connect, "get-subscription", "--customer-ref", REF)).json()
    spent = await cli(
        *connect, "consume-credits", "--customer-ref", REF, "--credit", "ai_tokens", "--amount", "25",
        "--idempotency-key", key(),
    )  # fmt: skip
    ledger = (
        await cli(*connect, "list-credit-ledger", "--customer-ref", REF, "--credit", "ai_tokens", "--page-size", "1")
    ).json()
    every = (await cli(*connect, "list-credit-ledger", "--customer-ref", REF, "--credit", "ai_tokens", "--all")).json()

    assert linked == {"customer_ref": REF, "customer_id": CUSTOMER_ID}
    assert (positional["allowed"], positional["subscription_id"]) == (True, SUB_ID)
    assert (by_option["kind"], by_option["balance"]) == ("FEATURE_KIND_CREDIT", "10000")
    assert (subscription["subscription_id"], subscription["customer_ref"]) == (SUB_ID, REF)
    assert spent.json()["balance_after"] == "9975"
    assert [entry["entry_id"] for entry in ledger["entries"]] == [spent.json()["entry_id"]]
    assert [entry["kind"] for entry in every["entries"]] == ["consumption", "plan_grant"]


async def test_create_checkout_sends_items_add_ons_and_every_option_and_replays_its_key(
    connect: tuple[str, ...], fake_dodo: FakeDodo
) -> None:
    checkout = (
        *connect, "create-checkout", "--customer-ref", REF, "--email", "ada@example.com", "--name", "Ada Lovelace",
        "--item", f"{PRO}:2", "--addon", f"{PRO}:{ADDON_EXTRA_SEAT}:3", "--item", TEAM, "--trial-days", "14",
        "--return-url", "https://app.example/done", "--cancel-url", "https://app.example/cancelled",
        "--discount-code", "WELCOME10", "--metadata", "plan_page=pricing-v2", "--idempotency-key", key(),
    )  # fmt: skip

    created = (await cli(*checkout)).json()
    again = (await cli(*checkout)).json()
    no_trial = await cli(
        *connect, "create-checkout", "--email", "bo@example.com", "--item", PRO, "--trial-days", "0",
        "--idempotency-key", key(),
    )  # fmt: skip
    products_trial = await cli(
        *connect, "create-checkout", "--email", "cy@example.com", "--item", PRO, "--idempotency-key", key()
    )  # fmt: skip

    assert set(created) == {"session_id", "checkout_url", "expires_at", "replayed"}
    assert created["session_id"].startswith("cks_")
    assert created["expires_at"].endswith("Z")
    assert (created["replayed"], again["replayed"], again["session_id"]) == (False, True, created["session_id"])
    assert no_trial.code == products_trial.code == 0
    first, zero, default = fake_dodo.requests_matching("POST /checkouts")
    assert first.json["product_cart"] == [
        {"product_id": PRO, "quantity": 2, "addons": [{"addon_id": ADDON_EXTRA_SEAT, "quantity": 3}]},
        {"product_id": TEAM, "quantity": 1},
    ]
    assert first.json["subscription_data"] == {"trial_period_days": 14}
    assert first.json["metadata"] == {"plan_page": "pricing-v2", "customer_ref": REF}
    assert first.json["discount_codes"] == ["WELCOME10"]
    assert (first.json["return_url"], first.json["cancel_url"]) == (
        "https://app.example/done",
        "https://app.example/cancelled",
    )
    assert zero.json["subscription_data"] == {"trial_period_days": 0}
    assert "subscription_data" not in default.json, "--trial-days is only sent when given"


async def test_a_checkout_for_a_subscribed_customer_is_one_already_subscribed_line_unless_additional(
    connect: tuple[str, ...], webhooks: WebhookPoster, fake_dodo: FakeDodo
) -> None:
    await pro_customer(webhooks)
    fake_dodo.customers.add(CUSTOMER_ID)
    checkout = (*connect, "create-checkout", "--customer-id", CUSTOMER_ID, "--item", TEAM)

    refused = await cli(*checkout, "--idempotency-key", key())
    allowed = await cli(*checkout, "--idempotency-key", key(), "--allow-additional")

    assert refused.code == 1
    assert refused.error_line().startswith("error: FAILED_PRECONDITION: ")
    assert "(reason=ALREADY_SUBSCRIBED" in refused.error_line()
    assert allowed.json()["session_id"]


async def test_create_portal_session_prints_the_link_and_an_unknown_customer_is_not_found(
    connect: tuple[str, ...], webhooks: WebhookPoster, fake_dodo: FakeDodo
) -> None:
    await pro_customer(webhooks)
    fake_dodo.customers.add(CUSTOMER_ID)
    assert (await cli(*connect, "link-customer", "--customer-ref", REF, "--customer-id", CUSTOMER_ID)).code == 0

    by_id = await cli(
        *connect, "create-portal-session", "--customer-id", CUSTOMER_ID, "--return-url", "https://app.example/account"
    )
    by_ref = await cli(*connect, "create-portal-session", "--customer-ref", REF, "--send-email")
    missing = await cli(*connect, "create-portal-session", "--customer-ref", "org_nobody")

    assert set(by_id.json()) == {"url", "expires_at"}
    assert by_id.json()["url"].startswith("http")
    assert by_ref.json()["url"].startswith("http")
    assert [(sent["return_url"], sent["send_email"]) for sent in fake_dodo.portal_sessions] == [
        ("https://app.example/account", False),
        (None, True),
    ]
    assert missing.code == 1
    assert missing.error_line().startswith("error: NOT_FOUND: ")


async def test_cancel_and_resume_subscription_print_the_subscription(
    connect: tuple[str, ...], fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    at_period_end = (await known_subscription(fake_dodo, webhooks, clock))["subscription_id"]
    now = (await known_subscription(fake_dodo, webhooks, clock))["subscription_id"]

    scheduled = await cli(
        *connect, "cancel-subscription", "--subscription-id", at_period_end, "--reason", "cancelled_by_customer",
        "--idempotency-key", key(),
    )  # fmt: skip
    resumed = await cli(*connect, "resume-subscription", "--subscription-id", at_period_end, "--idempotency-key", key())
    ended = await cli(
        *connect, "cancel-subscription", "--subscription-id", now, "--immediately", "--reason", "too expensive",
        "--idempotency-key", key(),
    )  # fmt: skip
    missing = await cli(
        *connect, "cancel-subscription", "--subscription-id", "sub_0Nn0Nn0Nn0Nn0Nn0Nn0Nn", "--idempotency-key", key()
    )

    assert scheduled.json()["replayed"] is False
    assert scheduled.json()["subscription"]["cancel_at_period_end"] is True
    assert scheduled.json()["subscription"]["access"]["reason"] == "ACCESS_REASON_CANCELLATION_SCHEDULED"
    assert resumed.json()["subscription"]["cancel_at_period_end"] is False
    assert resumed.json()["subscription"]["access"]["reason"] == "ACCESS_REASON_ACTIVE"
    assert (ended.json()["subscription"]["status"], ended.json()["subscription"]["access"]["allowed"]) == (
        "cancelled",
        False,
    )
    assert [sent.json for sent in fake_dodo.requests_matching("PATCH /subscriptions/*")] == [
        {"cancel_at_next_billing_date": True, "cancel_reason": "cancelled_by_customer"},
        {"cancel_at_next_billing_date": False},
        {"status": "cancelled", "cancellation_comment": "too expensive"},
    ]
    assert missing.code == 1
    assert missing.error_line().startswith("error: NOT_FOUND: ")


async def test_list_plans_prints_every_plan_with_its_price(connect: tuple[str, ...], fake_dodo: FakeDodo) -> None:
    listed = (await cli(*connect, "list-plans")).json()

    by_id = {plan["product_id"]: plan for plan in listed["plans"]}
    assert set(listed) == {"plans"}
    assert by_id[PRO] == {
        "product_id": PRO,
        "name": "Pro",
        "features": ["dashboard", "pro"],
        "limits": {"projects": 50, "seats": 5},
        "credits": {"ai_tokens": "10000"},
        "trial_credits": {"ai_tokens": "1000"},
        "grace_period_days": 3,
        "price": fake_dodo.products[PRO],
        "currency": "USD",
        "billing_interval": "1 Month",
    }


async def test_a_retry_safe_subcommand_is_retried_and_create_portal_session_is_not(
    flaky: Flaky, webhooks: WebhookPoster, fake_dodo: FakeDodo, clock: FakeClock
) -> None:
    await pro_customer(webhooks)
    fake_dodo.customers.add(CUSTOMER_ID)
    sub = (await known_subscription(fake_dodo, webhooks, clock))["subscription_id"]
    connect = ("--target", flaky.target, "--token", API_TOKEN, "--max-attempts", "3")
    flaky.fail_first = 2

    cancelled = await cli(*connect, "cancel-subscription", "--subscription-id", sub, "--idempotency-key", key())
    plans = await cli(*connect, "list-plans")
    portal = await cli(*connect, "create-portal-session", "--customer-id", CUSTOMER_ID)

    assert cancelled.json()["subscription"]["cancel_at_period_end"] is True
    assert plans.json()["plans"]
    assert portal.code == 1
    assert portal.error_line().startswith("error: UNAVAILABLE: ")
    assert (flaky.attempts["CancelSubscription"], flaky.attempts["ListPlans"]) == (3, 3)
    assert flaky.attempts["CreatePortalSession"] == 1
    assert fake_dodo.portal_sessions == []


async def test_help_goes_to_stdout_and_exits_zero() -> None:
    outcome = await cli("--help")

    assert (outcome.code, outcome.stderr) == (0, "")
    assert all(name in outcome.stdout for name in COMMANDS)


def test_every_rpc_the_contract_declares_has_a_subcommand_and_nothing_else_does() -> None:
    assert sorted(COMMANDS) == sorted(command_name(name) for name in METHODS)
    assert sorted(COMMANDS) == sorted(command_name(name) for name in RPCS)


# ------------------------------------------------------------------------------------------------------ failures


async def test_an_unknown_subscription_is_one_not_found_line_and_exit_1(connect: tuple[str, ...]) -> None:
    outcome = await cli(*connect, "get-subscription", "--subscription-id", "sub_0Missing000000000000")

    assert outcome.code == 1
    assert outcome.error_line().startswith("error: NOT_FOUND: ")
    assert "sub_0Missing000000000000" in outcome.error_line()


async def test_a_field_over_its_limit_names_reason_and_field_on_its_one_line(
    connect: tuple[str, ...], webhooks: WebhookPoster
) -> None:
    await pro_customer(webhooks)

    outcome = await cli(
        *connect, "consume-credits", "--customer-id", CUSTOMER_ID, "--credit", "ai_tokens", "--amount", "1",
        "--idempotency-key", key(), "--description", "x" * 1001,
    )  # fmt: skip

    assert outcome.code == 1
    line = outcome.error_line()
    assert line.startswith("error: INVALID_ARGUMENT: ")
    assert "(reason=FIELD_INVALID, field=description" in line


async def test_too_few_credits_is_one_resource_exhausted_line_with_the_balance(
    connect: tuple[str, ...], webhooks: WebhookPoster
) -> None:
    await pro_customer(webhooks)

    outcome = await cli(
        *connect, "consume-credits", "--customer-id", CUSTOMER_ID, "--credit", "ai_tokens", "--amount", "10001",
        "--idempotency-key", key(),
    )  # fmt: skip

    assert outcome.code == 1
    line = outcome.error_line()
    assert line.startswith("error: RESOURCE_EXHAUSTED: ")
    assert "(reason=INSUFFICIENT_CREDITS, balance=10000" in line


async def test_a_reused_key_and_a_credit_without_access_are_one_line_each(
    connect: tuple[str, ...], webhooks: WebhookPoster
) -> None:
    await pro_customer(webhooks)
    reused = key()
    consume = (*connect, "consume-credits", "--credit", "ai_tokens")
    assert (await cli(*consume, "--customer-id", CUSTOMER_ID, "--amount", "1", "--idempotency-key", reused)).code == 0

    conflict = await cli(*consume, "--customer-id", CUSTOMER_ID, "--amount", "2", "--idempotency-key", reused)
    denied = await cli(*consume, "--customer-id", UNKNOWN_CUSTOMER, "--amount", "1", "--idempotency-key", key())

    assert conflict.code == denied.code == 1
    assert conflict.error_line().startswith("error: FAILED_PRECONDITION: ")
    assert "(reason=IDEMPOTENCY_KEY_REUSED" in conflict.error_line()
    assert denied.error_line().startswith("error: PERMISSION_DENIED: ")
    assert "(reason=ACCESS_REASON_NO_SUBSCRIPTION" in denied.error_line()


async def test_a_wrong_token_is_one_unauthenticated_line(target: str) -> None:
    outcome = await cli("--target", target, "--token", "wrong", "check-access", CUSTOMER_ID, "dashboard")

    assert outcome.code == 1
    assert outcome.error_line().startswith("error: UNAUTHENTICATED: ")


async def test_an_unreachable_server_is_one_unavailable_line() -> None:
    outcome = await cli(
        "--target", f"127.0.0.1:{closed_port()}", "--max-attempts", "2", "check-access", CUSTOMER_ID, "dashboard"
    )

    assert outcome.code == 1
    assert outcome.error_line().startswith("error: UNAVAILABLE: ")


async def test_a_server_slower_than_timeout_is_one_deadline_exceeded_line(flaky: Flaky) -> None:
    flaky.stall = 5.0

    outcome = await cli("--target", flaky.target, "--timeout", "0.3", "check-access", CUSTOMER_ID, "dashboard")

    assert outcome.code == 1
    assert outcome.error_line().startswith("error: DEADLINE_EXCEEDED: ")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["frobnicate"], "invalid choice"),
        ([], "required: COMMAND"),
        (["check-access", CUSTOMER_ID], "required: --feature"),
        (["check-access", CUSTOMER_ID, "a", "--feature", "b"], "--feature given twice"),
        (["consume-credits", "--customer-id", CUSTOMER_ID, "--amount", "1"], "required: --credit"),
        (["consume-credits", "--customer-id", "c", "--credit", "k", "--amount", "1", "--metadata", "x"], "KEY=VALUE"),
        (["change-plan", "--subscription-id", "s", "--product-id", "p", "--proration-mode", "sometimes"], "one of"),
        (["get-subscription", "--subscription-id", "s", "--customer-id", "c"], "exactly one"),
        (["get-subscription"], "exactly one"),
        (["get-subscription", "--customer-id", "c", "--customer-ref", "r"], "exactly one"),
        (["check-access", "--customer-id", "c", "--customer-ref", "r", "--feature", "f"], "exactly one"),
        (["check-access", "--customer-ref", "r", "c", "f"], "exactly one"),
        (["check-access", "--customer-ref", "r"], "required: --feature"),
        (
            ["consume-credits", "--customer-ref", "r", "--customer-id", "c", "--credit", "k", "--amount", "1"],
            "not allowed",
        ),
        (["list-credit-ledger", "--credit", "k"], "--customer-id --customer-ref is required"),
        (["create-checkout", "--email", "a@example.com"], "required: --item"),
        (["create-checkout", "--item", "p:two"], "not a whole number"),
        (["create-checkout", "--item", "p:0"], "at least 1"),
        (["create-checkout", "--item", "p", "--addon", "p"], "PRODUCT:ADDON[:QTY]"),
        (["create-checkout", "--item", "p", "--addon", "q:a"], "'q' is not an --item"),
        (["create-checkout", "--item", "p", "--item", "p", "--addon", "p:a"], "'p' is more than one --item"),
        (["create-checkout", "--item", "p", "--trial-days", "-1"], "cannot be negative"),
        (["create-checkout", "--item", "p", "--customer-id", "c", "--customer-ref", "r"], "not allowed"),
        (["create-portal-session"], "--customer-id --customer-ref is required"),
        (["cancel-subscription", "--idempotency-key", "k"], "required: --subscription-id"),
        (["resume-subscription"], "required: --subscription-id"),
        (["link-customer", "--customer-ref", "r"], "required: --customer-id"),
        (["--timeout", "-1", "check-access", "c", "f"], "must be positive"),
        (["--ca", "/nonexistent/ca.pem", "check-access", "c", "f"], "cannot read /nonexistent/ca.pem"),
        (["--cert", "/dev/null", "check-access", "c", "f"], "go together"),
        (["--token", "tok…", "check-access", "c", "f"], "printable ASCII"),
    ],
    ids=[
        "unknown-command",
        "no-command",
        "missing-field",
        "field-twice",
        "missing-option",
        "bad-metadata",
        "bad-enum",
        "two-selectors",
        "no-selector",
        "id-and-ref-selectors",
        "id-and-ref",
        "ref-and-positional-id",
        "ref-without-feature",
        "consume-id-and-ref",
        "ledger-no-customer",
        "checkout-no-item",
        "checkout-bad-quantity",
        "checkout-zero-quantity",
        "checkout-bad-addon",
        "checkout-addon-without-item",
        "checkout-addon-ambiguous",
        "checkout-negative-trial",
        "checkout-id-and-ref",
        "portal-no-customer",
        "cancel-no-subscription",
        "resume-no-subscription",
        "link-no-customer-id",
        "bad-timeout",
        "unreadable-ca",
        "cert-without-key",
        "non-ascii-token",
    ],
)
async def test_a_wrong_command_line_is_one_line_and_exit_2(argv: list[str], says: str) -> None:
    outcome = await cli("--target", f"127.0.0.1:{closed_port()}", *argv)

    assert outcome.code == 2
    assert says in outcome.error_line()


# ----------------------------------------------------------------------------------------------------------- TLS


async def test_mutual_tls_options_reach_a_server_that_requires_client_certificates(
    database_url: str, db: Database, clock: FakeClock, catalog: Catalog, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    running = await start(
        make_settings(database_url, **pki.server_env()),
        clock=clock,
        catalog=catalog,
        db=Database.from_url(database_url, pool_size=4),
    )
    connect = ("--target", f"127.0.0.1:{running.grpc_port}", "--token", API_TOKEN, "--max-attempts", "1")
    try:
        trusted = await cli(
            *connect, "--ca", str(pki.ca.cert_path), "--cert", str(pki.client.cert_path),
            "--key", str(pki.client.key_path), "check-access", UNKNOWN_CUSTOMER, "dashboard",
        )  # fmt: skip
        plaintext = await cli(*connect, "check-access", UNKNOWN_CUSTOMER, "dashboard")
    finally:
        await running.stop(0)

    assert trusted.json()["reason"] == "ACCESS_REASON_NO_SUBSCRIPTION"
    assert plaintext.error_line().startswith("error: UNAVAILABLE: ")


# ------------------------------------------------------------------------------------------------------ processes


async def run_process(*argv: str) -> Outcome:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return Outcome(process.returncode, out.decode(), err.decode())


async def test_the_module_and_the_console_script_answer_as_processes_without_tracebacks(
    connect: tuple[str, ...],
) -> None:
    as_module = await run_process(
        sys.executable, "-m", "entitlements_client", *connect, "check-access", CUSTOMER_ID, "x"
    )
    console = await run_process(str(VENV_BIN / "entitlements"), *connect, "check-access", UNKNOWN_CUSTOMER, "dashboard")
    usage = await run_process(sys.executable, "-m", "entitlements_client", "check-access")

    assert as_module.code == 1
    assert as_module.error_line().startswith("error: INVALID_ARGUMENT: ")
    assert console.json()["reason"] == "ACCESS_REASON_NO_SUBSCRIPTION"
    assert usage.code == 2
    assert usage.error_line().startswith("error: ")
