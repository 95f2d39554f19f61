"""`python -m service.dev.send_webhook`: signs a Dodo payload like the dashboard's "send test event" and posts it
to a running service. Driven through its `main()` in a thread (it blocks on urllib) against the real HTTP port."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from sqlalchemy import select

from service.dev import send_webhook as send
from service.server import Running
from storage.engine import Database
from storage.models import WebhookInbox
from tests.support import (
    NOTHING_STORED,
    OTHER_SECRET,
    SUB_ID,
    WEBHOOK_SECRET,
    inbox_statuses,
    load_event,
    stored_counts,
    utc,
)


def event_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(load_event(name)))
    return path


def url(service: Running) -> str:
    return f"http://127.0.0.1:{service.http_port}/webhooks/dodo"


async def run_send(*argv: str) -> int:
    return await asyncio.to_thread(send.main, list(argv))


async def only_inbox_row(db: Database) -> WebhookInbox:
    async with db.session() as session:
        rows = list(await session.scalars(select(WebhookInbox)))
    assert len(rows) == 1
    return rows[0]


async def test_send_posts_a_signed_event_that_the_service_applies(
    service: Running,
    db: Database,
    stub: pb_grpc.EntitlementServiceAsyncStub,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DODO_PAYMENTS_WEBHOOK_KEY", WEBHOOK_SECRET)
    path = event_file(tmp_path, "subscription_on_hold")

    exit_code = await run_send(str(path), "--type", "subscription.updated", "--url", url(service))

    assert exit_code == 0
    assert capsys.readouterr().out.strip() == '200 {"status": "applied"}'
    row = await only_inbox_row(db)
    assert (row.event_type, row.status, row.subject_id) == ("subscription.updated", "applied", SUB_ID)
    sub = (await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=SUB_ID))).subscription
    assert sub.status == "on_hold"


async def test_send_stamps_the_envelope_with_now_unless_asked_to_keep_it(
    service: Running, db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DODO_PAYMENTS_WEBHOOK_KEY", WEBHOOK_SECRET)
    path = event_file(tmp_path, "subscription_active")
    before = datetime.now(UTC) - timedelta(seconds=1)

    assert await run_send(str(path), "--url", url(service), "--id", "msg_now") == 0
    assert await run_send(str(path), "--url", url(service), "--id", "msg_kept", "--keep-timestamp") == 0

    async with db.session() as session:
        stamps = dict((await session.execute(select(WebhookInbox.webhook_id, WebhookInbox.event_timestamp))).all())
    assert before <= stamps["msg_now"] <= datetime.now(UTC)
    assert stamps["msg_kept"] == utc(load_event("subscription_active")["timestamp"])
    # The file's own time is older than the one just sent, so it is kept but does not regress state.
    assert await inbox_statuses(db) == {"msg_now": "applied", "msg_kept": "stale"}


async def test_send_signs_with_the_first_key_when_several_are_configured(
    service: Running, db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DODO_PAYMENTS_WEBHOOK_KEY", f" {WEBHOOK_SECRET} ,{OTHER_SECRET}")

    exit_code = await run_send(str(event_file(tmp_path, "subscription_active")), "--url", url(service))

    assert exit_code == 0
    assert (await only_inbox_row(db)).status == "applied"


async def test_send_with_the_same_id_twice_is_answered_as_a_duplicate(
    service: Running,
    db: Database,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DODO_PAYMENTS_WEBHOOK_KEY", WEBHOOK_SECRET)
    argv = (str(event_file(tmp_path, "payment_succeeded")), "--url", url(service), "--id", "msg_twice")

    assert await run_send(*argv) == 0
    assert await run_send(*argv) == 0

    assert capsys.readouterr().out.splitlines() == ['200 {"status": "recorded"}', '200 {"status": "duplicate"}']
    assert await inbox_statuses(db) == {"msg_twice": "recorded"}


async def test_send_with_the_wrong_key_exits_non_zero_and_nothing_is_stored(
    service: Running,
    db: Database,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DODO_PAYMENTS_WEBHOOK_KEY", OTHER_SECRET)

    exit_code = await run_send(str(event_file(tmp_path, "subscription_active")), "--url", url(service))

    assert exit_code != 0
    assert capsys.readouterr().err.startswith("401 ")
    assert await stored_counts(db) == NOTHING_STORED


def test_a_fixtures_period_is_moved_to_have_begun_yesterday_and_keeps_its_shape() -> None:
    data = load_event("subscription_active")["data"]
    now = datetime(2030, 5, 5, 12, 0, tzinfo=UTC)
    moved = send.moved_to_now(data, now)

    def at(value: str) -> datetime:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))

    assert at(moved["previous_billing_date"]).date() == (now - timedelta(days=1)).date()
    later = send.moved_to_now(data, now + timedelta(hours=3))
    assert later["previous_billing_date"] == moved["previous_billing_date"], "one period for events of one day"
    length = at(data["next_billing_date"]) - at(data["previous_billing_date"])
    assert at(moved["next_billing_date"]) - at(moved["previous_billing_date"]) == length
    assert at(moved["created_at"]) - at(moved["previous_billing_date"]) == at(data["created_at"]) - at(
        data["previous_billing_date"]
    )
    dates = {"created_at", "previous_billing_date", "next_billing_date", "cancelled_at", "expires_at"}
    assert {k: v for k, v in moved.items() if k not in dates} == {k: v for k, v in data.items() if k not in dates}
