"""Reconciliation heals missed webhooks: subscriptions fetched from the fake Dodo API through the real SDK and applied
like webhook snapshots, by `python -m service reconcile` and by the background loop of `serve`, within Dodo's rate
limit."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeAlias

import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from service.app.dodo_gateway import DodoGateway
from service.app.reconciler import RateLimiter, ReconcileReport, StalePolicy, all_ids, reconcile, stale_ids
from service.domain.catalog import Catalog
from service.domain.dodo_payloads import DodoSubscription
from service.reconcile_cli import run_reconcile, stale_policy
from service.server import Running, start
from service.settings import Settings
from storage.engine import Database
from tests.fakedodo import FakeDodo
from tests.support import (
    CUSTOMER_ID,
    DODO_API_KEY,
    REPO_ROOT,
    SUB_ID,
    WEBHOOK_SECRET,
    FakeClock,
    WebhookPoster,
    deliver,
    load_event,
    make_settings,
    subscription_event,
    utc,
)

Stub: TypeAlias = "pb_grpc.EntitlementServiceAsyncStub"

RENEWED_START = "2026-10-01T10:15:02.481233Z"
RENEWED_END = "2026-11-01T10:15:02.481233Z"
NOW = utc("2026-10-20T00:00:00Z")
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
UNKNOWN_AT_DODO = "sub_0Gone0Gone0Gone0Gone0G"
FAST = 6000  # per minute: 10 ms apart, for tests that are not about the rate


def ts(value: str) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(utc(value))
    return stamp


def dodo_copy(data: dict[str, Any]) -> dict[str, Any]:
    """A webhook's `data` as GET /subscriptions/{id} would send it."""
    return {key: value for key, value in copy.deepcopy(data).items() if key != "payload_type"}


async def known_here_and_at_dodo(webhooks: WebhookPoster, fake: FakeDodo, *events: dict[str, Any]) -> None:
    """Subscriptions whose webhooks arrived and whose state at Dodo is still what those webhooks said."""
    await deliver(webhooks, *events)
    for event in events:
        fake.add_subscription(**dodo_copy(event["data"]))


async def access_settles(
    stub: Stub, feature: str, done: Callable[[pb.CheckAccessResponse], bool], *, within: float = 3.0
) -> pb.CheckAccessResponse:
    """CheckAccess once the change reached this replica's cache (invalidated by Postgres NOTIFY, asynchronously)."""
    deadline = time.monotonic() + within
    while True:
        response = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature=feature))
        if done(response) or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.02)


async def period_end(stub: Stub, subscription_id: str = SUB_ID) -> Timestamp:
    response = await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=subscription_id))
    return response.subscription.current_period_end


async def reconcile_now(ids: list[str], service: Running, clock: FakeClock, catalog: Catalog) -> ReconcileReport:
    return await reconcile(
        ids, db=service.db, dodo=service.dodo, catalog=catalog, clock=clock, limiter=RateLimiter(FAST)
    )


# ------------------------------------------------------------------------------------------------ healing


async def test_reconciling_the_stale_set_heals_a_missed_renewal_and_access_stays_active(
    service: Running,
    fake_dodo: FakeDodo,
    webhooks: WebhookPoster,
    stub: Stub,
    clock: FakeClock,
    catalog: Catalog,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="entitlements.reconcile")
    await deliver(webhooks, load_event("subscription_active"))  # period 2026-09-01 → 2026-10-01
    fake_dodo.add_subscription(**dodo_copy(load_event("subscription_renewed")["data"]))  # the renewal we never heard
    clock.set("2026-10-02T00:00:00Z")
    dashboard = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="dashboard"))
    assert dashboard.reason == pb.ACCESS_REASON_ACTIVE

    stale = await stale_ids(service.db, clock(), StalePolicy())
    report = await reconcile_now(stale, service, clock, catalog)

    assert stale == [SUB_ID]
    assert report == ReconcileReport(checked=1, changed=[SUB_ID])
    (logged,) = [record for record in caplog.records if record.getMessage() == "reconcile.changed"]
    assert logged.__dict__["subscription_id"] == SUB_ID
    assert logged.__dict__["before"] != logged.__dict__["after"]
    got = (await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=SUB_ID))).subscription
    assert (got.current_period_start, got.current_period_end) == (ts(RENEWED_START), ts(RENEWED_END))
    assert got.access == pb.AccessDecision(allowed=True, reason=pb.ACCESS_REASON_ACTIVE)
    after = await access_settles(stub, "dashboard", lambda r: True)
    assert (after.allowed, after.reason) == (True, pb.ACCESS_REASON_ACTIVE)
    # The new period's plan credits come with the renewal, as if its webhook had arrived.
    tokens = await access_settles(stub, "ai_tokens", lambda r: r.allowed)
    assert (tokens.allowed, tokens.balance) == (True, "10000")
    assert await stale_ids(service.db, clock(), StalePolicy()) == []


async def test_reconciling_a_subscription_heals_a_missed_cancellation_and_access_ends(
    database_url: str,
    service: Running,
    fake_dodo: FakeDodo,
    webhooks: WebhookPoster,
    stub: Stub,
    clock: FakeClock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    fake_dodo.add_subscription(**dodo_copy(load_event("subscription_cancelled")["data"]))  # cancelled at Dodo
    clock.set("2026-09-21T00:00:00Z")
    assert (await access_settles(stub, "dashboard", lambda r: True)).allowed
    settings = make_settings(
        database_url, DODO_PAYMENTS_API_KEY=DODO_API_KEY, DODO_PAYMENTS_BASE_URL=fake_dodo.base_url
    )

    code = await run_reconcile(settings, subscriptions=[SUB_ID], stale=False)

    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"checked": 1, "changed": [SUB_ID], "missing": [], "failed": []}
    denied = await access_settles(stub, "dashboard", lambda r: not r.allowed)
    assert (denied.reason, denied.status) == (pb.ACCESS_REASON_SUBSCRIPTION_INACTIVE, "cancelled")


async def test_a_subscription_unknown_to_dodo_is_reported_missing_and_the_others_are_still_reconciled(
    service: Running, fake_dodo: FakeDodo, webhooks: WebhookPoster, stub: Stub, clock: FakeClock, catalog: Catalog
) -> None:
    await deliver(
        webhooks,
        load_event("subscription_active"),
        subscription_event(
            "subscription.active",
            timestamp=utc("2026-09-02T00:00:00Z"),
            subscription_id=UNKNOWN_AT_DODO,
            customer={"customer_id": "cus_0Other0Other0Other0Ot", "email": "bob@example.com", "name": "Bob"},
        ),
    )
    fake_dodo.add_subscription(**dodo_copy(load_event("subscription_renewed")["data"]))
    clock.set("2026-10-02T00:00:00Z")
    kept = (await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=UNKNOWN_AT_DODO))).subscription

    report = await reconcile_now(await all_ids(service.db), service, clock, catalog)

    assert report == ReconcileReport(checked=2, changed=[SUB_ID], missing=[UNKNOWN_AT_DODO])
    assert await period_end(stub) == ts(RENEWED_END)
    still = (await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=UNKNOWN_AT_DODO))).subscription
    assert still == kept


async def test_a_dodo_failure_on_one_subscription_is_reported_failed_and_the_command_exits_non_zero(
    database_url: str,
    service: Running,
    fake_dodo: FakeDodo,
    webhooks: WebhookPoster,
    stub: Stub,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = "sub_1Other1Other1Other1Ot"
    await deliver(
        webhooks,
        load_event("subscription_active"),
        subscription_event("subscription.active", timestamp=utc("2026-09-02T00:00:00Z"), subscription_id=other),
    )
    fake_dodo.add_subscription(**dodo_copy(load_event("subscription_renewed")["data"]))
    fake_dodo.fail_next(f"GET /subscriptions/{other}", 503, times=3, headers={"retry-after-ms": "10"})
    settings = make_settings(
        database_url, DODO_PAYMENTS_API_KEY=DODO_API_KEY, DODO_PAYMENTS_BASE_URL=fake_dodo.base_url
    )

    code = await run_reconcile(settings, subscriptions=[other, SUB_ID], stale=False)

    assert code == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"checked": 2, "changed": [SUB_ID], "missing": [], "failed": [other]}
    assert await period_end(stub) == ts(RENEWED_END)


async def test_a_subscription_already_up_to_date_is_checked_but_not_reported_changed(
    service: Running, fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock, catalog: Catalog
) -> None:
    await known_here_and_at_dodo(webhooks, fake_dodo, load_event("subscription_active"))

    report = await reconcile_now([SUB_ID], service, clock, catalog)

    assert report == ReconcileReport(checked=1)


# ------------------------------------------------------------------------------------------ stale selection


def update(subscription_id: str, *, heard: datetime = NOW - DAY, **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"next_billing_date": NOW + 10 * DAY, "status": "active"}
    fields.update(changes)
    return subscription_event("subscription.updated", timestamp=heard, subscription_id=subscription_id, **fields)


STALE_CASES = [
    update("sub_a_overdue", next_billing_date=NOW - DAY),
    update("sub_b_within_margin", next_billing_date=NOW - HOUR),
    update("sub_c_on_hold", status="on_hold"),
    update("sub_d_past_due", status="past_due"),
    update("sub_e_cancel_past_end", cancel_at_next_billing_date=True, next_billing_date=NOW - HOUR),
    update("sub_f_cancel_ahead", cancel_at_next_billing_date=True, next_billing_date=NOW + 5 * DAY),
    update("sub_g_quiet", heard=NOW - 8 * DAY),
    update("sub_h_fresh"),
    update("sub_i_cancelled", status="cancelled", cancel_at_next_billing_date=True, next_billing_date=NOW - DAY),
]


async def test_the_stale_set_is_exactly_the_subscriptions_whose_local_state_may_be_out_of_date(
    service: Running, webhooks: WebhookPoster
) -> None:
    await deliver(webhooks, *STALE_CASES)

    stale = await stale_ids(service.db, NOW, StalePolicy(renewal_margin=6 * HOUR, refresh_after=7 * DAY))

    assert stale == [
        "sub_a_overdue",
        "sub_c_on_hold",
        "sub_d_past_due",
        "sub_e_cancel_past_end",
        "sub_g_quiet",
    ]


async def test_the_renewal_margin_and_refresh_age_come_from_settings(
    database_url: str, service: Running, webhooks: WebhookPoster
) -> None:
    await deliver(webhooks, *STALE_CASES)
    settings = make_settings(
        database_url, ENTITLEMENTS_RECONCILE_RENEWAL_MARGIN_HOURS="0", ENTITLEMENTS_RECONCILE_REFRESH_DAYS="30"
    )

    stale = await stale_ids(service.db, NOW, stale_policy(settings))

    # No margin: an hour overdue is stale. Thirty days' patience: eight quiet days are not.
    assert stale == [
        "sub_a_overdue",
        "sub_b_within_margin",
        "sub_c_on_hold",
        "sub_d_past_due",
        "sub_e_cancel_past_end",
    ]


async def test_a_quiet_subscription_is_no_longer_stale_once_reconciled(
    service: Running, fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock, catalog: Catalog
) -> None:
    quiet = update("sub_g_quiet", heard=NOW - 8 * DAY)
    await known_here_and_at_dodo(webhooks, fake_dodo, quiet)
    clock.set(NOW)
    assert await stale_ids(service.db, NOW, StalePolicy()) == ["sub_g_quiet"]

    await reconcile_now(["sub_g_quiet"], service, clock, catalog)

    assert await stale_ids(service.db, NOW, StalePolicy()) == []


# ---------------------------------------------------------------------------------------------- rate limit


def test_by_default_reconciliation_stays_under_dodos_100_requests_a_minute_and_the_loop_is_off(
    database_url: str,
) -> None:
    settings = make_settings(database_url)

    assert settings.reconcile_rate_per_minute < 100
    assert settings.reconcile_interval_seconds == 0


class FakeTime:
    """A monotonic clock that only moves when the code under test sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def test_the_rate_limiter_waits_exactly_one_interval_between_back_to_back_calls() -> None:
    fake = FakeTime()
    limiter = RateLimiter(60, monotonic=fake.monotonic, sleep=fake.sleep)

    for _ in range(5):
        await limiter.wait()

    assert fake.sleeps == [1.0, 1.0, 1.0, 1.0]


async def test_the_rate_limiter_counts_time_already_passed_and_never_bursts_to_catch_up() -> None:
    fake = FakeTime()
    limiter = RateLimiter(60, monotonic=fake.monotonic, sleep=fake.sleep)

    await limiter.wait()  # first call: no wait
    fake.now += 0.25
    await limiter.wait()  # a quarter of the interval already passed
    fake.now += 10.0
    await limiter.wait()  # idle for long: no wait...
    await limiter.wait()  # ...but no burst either

    assert fake.sleeps == [0.75, 1.0]


async def test_at_600_a_minute_calls_are_a_tenth_of_a_second_apart() -> None:
    fake = FakeTime()
    limiter = RateLimiter(600, monotonic=fake.monotonic, sleep=fake.sleep)

    for _ in range(4):
        await limiter.wait()

    assert fake.sleeps == pytest.approx([0.1, 0.1, 0.1])


async def test_reconcile_waits_on_the_limiter_before_every_fetch(
    service: Running, fake_dodo: FakeDodo, clock: FakeClock, catalog: Catalog
) -> None:
    ids = [fake_dodo.add_subscription()["subscription_id"] for _ in range(3)]
    fake = FakeTime()

    await reconcile(
        ids,
        db=service.db,
        dodo=service.dodo,
        catalog=catalog,
        clock=clock,
        limiter=RateLimiter(60, monotonic=fake.monotonic, sleep=fake.sleep),
    )

    assert fake.sleeps == [1.0, 1.0]
    assert len(fake_dodo.requests_matching("GET")) == 3


class TimedGateway(DodoGateway):
    """The real gateway, noting when each fetch starts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started: list[float] = []

    async def get_subscription(self, subscription_id: str) -> DodoSubscription:
        self.started.append(time.monotonic())
        return await super().get_subscription(subscription_id)


async def test_reconcile_against_dodo_spaces_fetches_by_the_rate_limit(
    service: Running, fake_dodo: FakeDodo, clock: FakeClock, catalog: Catalog
) -> None:
    ids = [fake_dodo.add_subscription()["subscription_id"] for _ in range(5)]
    gateway = TimedGateway(DODO_API_KEY, fake_dodo.base_url, timeout=1.0, read_max_retries=0)
    started = time.monotonic()
    try:
        report = await reconcile(
            ids, db=service.db, dodo=gateway, catalog=catalog, clock=clock, limiter=RateLimiter(600)
        )
    finally:
        await gateway.close()
    elapsed = time.monotonic() - started

    assert report.checked == 5
    assert elapsed >= 4 * 0.1
    # Fetches sit on a 0.1 s grid from the first one: five span 0.4 s even when a wake-up comes late under load.
    span = gateway.started[-1] - gateway.started[0]
    assert span >= 4 * 0.1 - 0.005, gateway.started


# -------------------------------------------------------------------------------------------- serve's loop


def loop_settings(database_url: str) -> Settings:
    return make_settings(
        database_url, ENTITLEMENTS_RECONCILE_INTERVAL_SECONDS="0.2", ENTITLEMENTS_RECONCILE_RATE_PER_MINUTE="600"
    )


async def start_with_loop(database_url: str, clock: FakeClock, catalog: Catalog, fake: FakeDodo) -> Running:
    return await start(
        loop_settings(database_url),
        clock=clock,
        catalog=catalog,
        db=Database.from_url(database_url, pool_size=4),
        dodo=DodoGateway(DODO_API_KEY, fake.base_url, timeout=1.0, read_max_retries=0),
    )


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.05)
    return await check()


async def test_the_serve_loop_heals_a_stale_subscription_and_stops_cleanly(
    database_url: str,
    service: Running,
    fake_dodo: FakeDodo,
    webhooks: WebhookPoster,
    stub: Stub,
    clock: FakeClock,
    catalog: Catalog,
) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    fake_dodo.add_subscription(**dodo_copy(load_event("subscription_renewed")["data"]))
    clock.set("2026-10-02T00:00:00Z")

    running = await start_with_loop(database_url, clock, catalog, fake_dodo)
    try:
        loop = running.tasks.running["reconcile"]

        async def healed() -> bool:
            return await period_end(stub) == ts(RENEWED_END)

        assert await eventually(healed, within=3.0)
    finally:
        await running.stop(0)

    assert loop.cancelled()
    fetched = len(fake_dodo.requests)
    await asyncio.sleep(0.5)
    assert len(fake_dodo.requests) == fetched  # nothing runs after stop
    tokens = await access_settles(stub, "ai_tokens", lambda r: r.allowed)
    assert tokens.allowed


async def test_the_serve_loop_is_off_unless_an_interval_is_configured(
    service: Running, fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock
) -> None:
    await known_here_and_at_dodo(webhooks, fake_dodo, load_event("subscription_active"))
    clock.set("2026-10-02T00:00:00Z")  # stale

    await asyncio.sleep(0.3)

    assert "reconcile" not in service.tasks.running
    assert fake_dodo.requests == []


async def test_the_serve_loop_respects_its_rate_limit(
    database_url: str,
    service: Running,
    fake_dodo: FakeDodo,
    webhooks: WebhookPoster,
    clock: FakeClock,
    catalog: Catalog,
) -> None:
    # Eight subscriptions overdue here and still overdue at Dodo: every pass fetches all of them again.
    overdue = [update(f"sub_{n}_overdue", next_billing_date=NOW - DAY) for n in range(8)]
    await known_here_and_at_dodo(webhooks, fake_dodo, *overdue)
    clock.set(NOW)

    started = time.monotonic()
    running = await start_with_loop(database_url, clock, catalog, fake_dodo)
    try:
        await asyncio.sleep(1.0)
    finally:
        await running.stop(0)
    elapsed = time.monotonic() - started

    fetches = len(fake_dodo.requests_matching("GET"))
    # 600 a minute: one every 0.1 s. Unlimited, eight fetches per 0.2 s pass would be about 40.
    assert 3 <= fetches <= elapsed / 0.1 + 1, (fetches, elapsed)


# ------------------------------------------------------------------------------------------- the command


async def test_the_reconcile_command_heals_a_subscription_and_prints_a_json_report(
    database_url: str, service: Running, fake_dodo: FakeDodo, webhooks: WebhookPoster, stub: Stub, clock: FakeClock
) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    fake_dodo.add_subscription(**dodo_copy(load_event("subscription_cancelled")["data"]))
    clock.set("2026-09-21T00:00:00Z")
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "TMPDIR") if name in os.environ}
    env.update(
        {
            "PYTHONDONTWRITEBYTECODE": "1",
            "DATABASE_URL": database_url,
            "DODO_PAYMENTS_WEBHOOK_KEY": WEBHOOK_SECRET,
            "DODO_PAYMENTS_API_KEY": DODO_API_KEY,
            "DODO_PAYMENTS_BASE_URL": fake_dodo.base_url,
        }
    )

    # A child process, while this event loop keeps the fake Dodo API answering it.
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "reconcile",
        "--subscription",
        SUB_ID,
        "--subscription",
        UNKNOWN_AT_DODO,
        env=env,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), timeout=30)

    assert child.returncode == 0, err.decode()
    assert json.loads(out) == {"checked": 2, "changed": [SUB_ID], "missing": [UNKNOWN_AT_DODO], "failed": []}
    denied = await access_settles(stub, "dashboard", lambda r: not r.allowed)
    assert (denied.allowed, denied.status) == (False, "cancelled")
