"""The webhook receiver contract of DESIGN §7, one test per row, driven only from outside: signed HTTP deliveries to
the real port in, state read back through gRPC, and "nothing stored" read straight from the tables."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import io
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from sqlalchemy import select

from service.domain.catalog import Catalog
from service.domain.errors import ConfigurationError
from service.server import Running, start
from storage.engine import Database
from storage.models import Subscription, WebhookInbox
from tests.support import (
    CUSTOMER_ID,
    NOTHING_STORED,
    OTHER_SECRET,
    SUB_ID,
    WEBHOOK_SECRET,
    FakeClock,
    WebhookPoster,
    count_rows,
    inbox_statuses,
    load_event,
    make_settings,
    sign,
    stored_counts,
    subscription_event,
    utc,
)

MAX_BODY_BYTES = 1024 * 1024
ROTATING_KEYS = f"{WEBHOOK_SECRET},{OTHER_SECRET}"
THIRD_SECRET = "whsec_" + base64.b64encode(b"a key nobody configured here").decode()
UNREACHABLE_POSTGRES = "postgresql://postgres@127.0.0.1:1/unreachable"
EVENT_AT = utc("2026-09-05T12:00:00Z")


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def active_event() -> dict[str, Any]:
    return subscription_event("subscription.active", timestamp=EVENT_AT)


def hmac_headers(body: bytes, *, secret: str = WEBHOOK_SECRET, at: datetime | None = None) -> dict[str, str]:
    """Standard Webhooks headers computed over raw bytes, for bodies the library cannot sign (not UTF-8)."""
    webhook_id = f"msg_{uuid.uuid4().hex}"
    timestamp = str(int((at or datetime.now(UTC)).timestamp()))
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": f"v1,{base64.b64encode(digest).decode()}",
        "content-type": "application/json",
    }


@asynccontextmanager
async def another_service(
    database_url: str, catalog: Catalog, *, db: Database | None = None, **env: str
) -> AsyncIterator[tuple[Running, WebhookPoster]]:
    """A second service process on its own ports, for configurations the `service` fixture does not have."""
    running = await start(
        make_settings(database_url, **env), catalog=catalog, db=db or Database.from_url(database_url, pool_size=4)
    )
    try:
        async with aiohttp.ClientSession() as session:
            yield running, WebhookPoster(f"http://127.0.0.1:{running.http_port}/webhooks/dodo", session)
    finally:
        await running.stop(0)


async def assert_rejected(
    webhooks: WebhookPoster, db: Database, body: bytes, headers: dict[str, str], status: int
) -> None:
    answer, payload = await webhooks.post_raw(body, headers)
    assert answer == status, payload
    assert "error" in payload
    assert await stored_counts(db) == NOTHING_STORED


async def stored_subscription(db: Database) -> Subscription | None:
    async with db.session() as session:
        return await session.scalar(select(Subscription).where(Subscription.subscription_id == SUB_ID))


async def inbox_row(db: Database, webhook_id: str) -> WebhookInbox | None:
    async with db.session() as session:
        return await session.scalar(select(WebhookInbox).where(WebhookInbox.webhook_id == webhook_id))


# --- 401: bad or missing signature headers, wrong signature, timestamp outside ±5 min ---------------------------


@pytest.mark.parametrize("header", ["webhook-id", "webhook-timestamp", "webhook-signature"])
async def test_delivery_missing_a_signature_header_is_401_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, header: str
) -> None:
    body = encode(active_event())
    headers = sign(body)
    del headers[header]
    await assert_rejected(webhooks, db, body, headers, 401)


@pytest.mark.parametrize("header", ["webhook-id", "webhook-signature"])
async def test_delivery_with_an_empty_signature_header_is_401_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, header: str
) -> None:
    body = encode(active_event())
    await assert_rejected(webhooks, db, body, {**sign(body), header: ""}, 401)


async def test_wrong_signature_is_401_and_stores_nothing(webhooks: WebhookPoster, db: Database) -> None:
    body = encode(active_event())
    forged = "v1," + base64.b64encode(hashlib.sha256(b"not the hmac").digest()).decode()
    await assert_rejected(webhooks, db, body, {**sign(body), "webhook-signature": forged}, 401)


async def test_signature_made_with_another_secret_is_401_and_stores_nothing(
    webhooks: WebhookPoster, db: Database
) -> None:
    body = encode(active_event())
    await assert_rejected(webhooks, db, body, sign(body, secret=OTHER_SECRET), 401)


async def test_signature_without_v1_prefix_is_401_and_stores_nothing(webhooks: WebhookPoster, db: Database) -> None:
    body = encode(active_event())
    headers = sign(body)
    headers["webhook-signature"] = headers["webhook-signature"].removeprefix("v1,")
    await assert_rejected(webhooks, db, body, headers, 401)


async def test_signature_of_an_unknown_scheme_version_is_401_and_stores_nothing(
    webhooks: WebhookPoster, db: Database
) -> None:
    body = encode(active_event())
    headers = sign(body)
    headers["webhook-signature"] = "v2," + headers["webhook-signature"].removeprefix("v1,")
    await assert_rejected(webhooks, db, body, headers, 401)


@pytest.mark.parametrize("signature", ["v1,abcde", "v1,a,b"], ids=["bad_padding", "two_commas"])
async def test_signature_that_is_not_base64_is_401_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, signature: str
) -> None:
    body = encode(active_event())
    await assert_rejected(webhooks, db, body, {**sign(body), "webhook-signature": signature}, 401)


@pytest.mark.parametrize("offset", [timedelta(minutes=-6), timedelta(minutes=6)], ids=["6_min_old", "6_min_ahead"])
async def test_timestamp_outside_five_minutes_is_401_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, offset: timedelta
) -> None:
    body = encode(active_event())
    await assert_rejected(webhooks, db, body, sign(body, at=datetime.now(UTC) + offset), 401)


async def test_timestamp_header_that_is_not_a_number_is_401_and_stores_nothing(
    webhooks: WebhookPoster, db: Database
) -> None:
    body = encode(active_event())
    await assert_rejected(webhooks, db, body, {**sign(body), "webhook-timestamp": "yesterday"}, 401)


async def test_body_altered_after_signing_is_401_and_stores_nothing(webhooks: WebhookPoster, db: Database) -> None:
    body = encode(active_event())
    headers = sign(body)
    tampered = body.replace(b'"status": "active"', b'"status": "paused"')
    assert tampered != body
    await assert_rejected(webhooks, db, tampered, headers, 401)


async def test_webhook_id_changed_after_signing_is_401_and_stores_nothing(
    webhooks: WebhookPoster, db: Database
) -> None:
    body = encode(active_event())
    await assert_rejected(webhooks, db, body, {**sign(body), "webhook-id": "msg_replayed_under_new_id"}, 401)


async def test_body_that_is_not_utf8_is_401_even_with_a_valid_hmac(webhooks: WebhookPoster, db: Database) -> None:
    body = b'{"type": "subscription.active", "data": {"name": "\xff\xfe"}}'
    await assert_rejected(webhooks, db, body, hmac_headers(body), 401)


async def test_one_matching_signature_among_several_is_accepted(webhooks: WebhookPoster, db: Database) -> None:
    body = encode(active_event())
    headers = sign(body)
    at = datetime.fromtimestamp(int(headers["webhook-timestamp"]), tz=UTC)
    other = sign(body, secret=OTHER_SECRET, webhook_id=headers["webhook-id"], at=at)["webhook-signature"]
    unknown_version = "v1a," + base64.b64encode(b"x" * 64).decode()
    headers["webhook-signature"] = f"{other} {unknown_version} {headers['webhook-signature']}"
    assert await webhooks.post_raw(body, headers) == (200, {"status": "applied"})
    assert await count_rows(db, Subscription) == 1


async def test_during_key_rotation_events_signed_with_either_key_are_accepted(
    database_url: str, db: Database, catalog: Catalog
) -> None:
    async with another_service(database_url, catalog, DODO_PAYMENTS_WEBHOOK_KEY=ROTATING_KEYS) as (_, poster):
        first = subscription_event("subscription.active", timestamp=EVENT_AT)
        second = subscription_event("subscription.on_hold", timestamp=EVENT_AT + timedelta(hours=1), status="on_hold")
        assert await poster.send(first, secret=WEBHOOK_SECRET) == (200, {"status": "applied"})
        assert await poster.send(second, secret=OTHER_SECRET) == (200, {"status": "applied"})
    assert sorted((await inbox_statuses(db)).values()) == ["applied", "applied"]


async def test_during_key_rotation_a_key_not_configured_is_still_401(
    database_url: str, db: Database, catalog: Catalog
) -> None:
    async with another_service(database_url, catalog, DODO_PAYMENTS_WEBHOOK_KEY=ROTATING_KEYS) as (_, poster):
        body = encode(active_event())
        await assert_rejected(poster, db, body, sign(body, secret=THIRD_SECRET), 401)


# --- 400: signed but not JSON, or missing type/data, or an unreadable subscription snapshot ----------------------


@pytest.mark.parametrize(
    "body",
    [
        b"this is not json",
        b'{"type": "subscription.active", "data": {',
        b"",
        b"[]",
        b'"subscription.active"',
        b'{"type": "payment.succeeded", "timestamp": "2026-09-05T12:00:00Z", "data": {"total_amount": NaN}}',
    ],
    ids=["not_json", "truncated_json", "empty", "array", "string", "nan"],
)
async def test_signed_body_that_is_not_a_json_object_is_400_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, body: bytes
) -> None:
    await assert_rejected(webhooks, db, body, sign(body), 400)


def _without(key: str) -> dict[str, Any]:
    event = active_event()
    del event[key]
    return event


@pytest.mark.parametrize(
    "event",
    [
        _without("type"),
        {**active_event(), "type": ""},
        {**active_event(), "type": 7},
        _without("data"),
        {**active_event(), "data": None},
        {**active_event(), "data": [active_event()["data"]]},
        {**active_event(), "data": "subscription"},
        {**active_event(), "timestamp": "not a time"},
    ],
    ids=["no_type", "empty_type", "type_not_text", "no_data", "null_data", "data_list", "data_text", "bad_timestamp"],
)
async def test_envelope_without_type_or_data_object_is_400_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, event: dict[str, Any]
) -> None:
    body = encode(event)
    await assert_rejected(webhooks, db, body, sign(body), 400)


def _data_without(key: str) -> dict[str, Any]:
    event = active_event()
    del event["data"][key]
    return event


def _customer_without_id() -> dict[str, Any]:
    event = active_event()
    del event["data"]["customer"]["customer_id"]
    return event


@pytest.mark.parametrize(
    "event",
    [
        _data_without("subscription_id"),
        _data_without("customer"),
        _customer_without_id(),
        _data_without("status"),
        _data_without("product_id"),
        _data_without("created_at"),
        subscription_event("subscription.active", timestamp=EVENT_AT, customer="cus_only_an_id"),
        subscription_event("subscription.active", timestamp=EVENT_AT, next_billing_date="next tuesday"),
        subscription_event("subscription.active", timestamp=EVENT_AT, created_at="2026-13-45T99:00:00Z"),
        subscription_event("subscription.active", timestamp=EVENT_AT, cancelled_at=1_790_000_000),
    ],
    ids=[
        "no_subscription_id",
        "no_customer",
        "no_customer_id",
        "no_status",
        "no_product_id",
        "no_created_at",
        "customer_not_object",
        "unparseable_next_billing_date",
        "impossible_created_at",
        "numeric_cancelled_at",
    ],
)
async def test_subscription_event_with_unreadable_data_is_400_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, event: dict[str, Any]
) -> None:
    body = encode(event)
    await assert_rejected(webhooks, db, body, sign(body), 400)


# --- 413: body over the 1 MiB limit -------------------------------------------------------------------------------


def padded_event(size: int) -> bytes:
    """A valid subscription event padded with an unknown field to exactly `size` bytes."""
    event = active_event()
    event["padding"] = ""
    filler = size - len(encode(event))
    assert filler >= 0
    event["padding"] = "x" * filler
    body = encode(event)
    assert len(body) == size
    return body


async def test_body_over_one_mib_with_content_length_is_413_and_stores_nothing(
    webhooks: WebhookPoster, db: Database
) -> None:
    body = padded_event(MAX_BODY_BYTES + 1)
    # A file-like body keeps aiohttp from warning about large raw bytes; it still sends a Content-Length.
    async with webhooks.session.post(webhooks.url, data=io.BytesIO(body), headers=sign(body)) as response:
        assert response.status == 413
        assert response.request_info.headers.get("Content-Length") == str(len(body))
    assert await stored_counts(db) == NOTHING_STORED


async def test_chunked_body_over_one_mib_is_413_and_stores_nothing(webhooks: WebhookPoster, db: Database) -> None:
    body = padded_event(MAX_BODY_BYTES + 64 * 1024)
    headers = sign(body)

    async def chunks() -> AsyncIterator[bytes]:
        for start_at in range(0, len(body), 64 * 1024):
            yield body[start_at : start_at + 64 * 1024]

    async with webhooks.session.post(webhooks.url, data=chunks(), headers=headers) as response:
        assert response.status == 413
        assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
    assert await stored_counts(db) == NOTHING_STORED


async def test_body_of_exactly_one_mib_is_accepted(webhooks: WebhookPoster, db: Database) -> None:
    body = padded_event(MAX_BODY_BYTES)
    assert await webhooks.post_raw(body, sign(body)) == (200, {"status": "applied"})
    assert await count_rows(db, Subscription) == 1


# --- 200: duplicates, unknown and recorded-only events, valid events ---------------------------------------------


async def test_duplicate_webhook_id_is_200_and_changes_nothing_even_with_different_data(
    webhooks: WebhookPoster, db: Database, stub: pb_grpc.EntitlementServiceAsyncStub
) -> None:
    original = active_event()
    assert await webhooks.send(original, webhook_id="msg_once") == (200, {"status": "applied"})
    imposter = subscription_event(
        "subscription.cancelled", timestamp=EVENT_AT + timedelta(days=1), status="cancelled", quantity=9
    )

    assert await webhooks.send(imposter, webhook_id="msg_once") == (200, {"status": "duplicate"})

    assert await inbox_statuses(db) == {"msg_once": "applied"}
    row = await inbox_row(db, "msg_once")
    assert row is not None
    assert row.event_type == "subscription.active"
    assert row.payload == original
    sub = (await stub.GetSubscription(pb.GetSubscriptionRequest(subscription_id=SUB_ID))).subscription
    assert (sub.status, sub.quantity) == ("active", 1)


@pytest.mark.parametrize("event_type", ["customer.created", "subscription.something_new"])
async def test_unknown_event_type_is_200_and_stores_the_inbox_row_only(
    webhooks: WebhookPoster, db: Database, event_type: str
) -> None:
    event = subscription_event(event_type, timestamp=EVENT_AT)

    assert await webhooks.send(event, webhook_id="msg_unknown") == (200, {"status": "ignored"})

    assert await inbox_statuses(db) == {"msg_unknown": "ignored"}
    assert await stored_counts(db) == {**NOTHING_STORED, "webhook_inbox": 1}


@pytest.mark.parametrize("event_type", ["payment.succeeded", "payment.failed"])
async def test_payment_event_is_200_and_recorded_in_the_inbox(
    webhooks: WebhookPoster, db: Database, event_type: str
) -> None:
    event = {**load_event("payment_succeeded"), "type": event_type}

    assert await webhooks.send(event, webhook_id="msg_payment") == (200, {"status": "recorded"})

    assert await inbox_statuses(db) == {"msg_payment": "recorded"}
    assert await count_rows(db, Subscription) == 0


async def test_credit_ledger_event_is_200_and_kept_in_the_inbox(webhooks: WebhookPoster, db: Database) -> None:
    status, _ = await webhooks.send(load_event("credit_added"), webhook_id="msg_credit")

    assert status == 200
    row = await inbox_row(db, "msg_credit")
    assert row is not None
    assert row.event_type == "credit.added"


async def test_credit_balance_low_event_is_200_and_kept_in_the_inbox(webhooks: WebhookPoster, db: Database) -> None:
    event = {
        "business_id": "bus_0NmY7fQz4kR2sT8vW1xJa",
        "type": "credit.balance_low",
        "timestamp": "2026-10-02T09:00:00Z",
        "data": {
            "payload_type": "CreditBalanceLow",
            "customer_id": CUSTOMER_ID,
            "subscription_id": SUB_ID,
            "credit_entitlement_id": "cent_7Dk2Mq8Wx5Lp3Zr9Tv1Nb",
            "credit_entitlement_name": "API Calls",
            "available_balance": "150",
            "threshold_amount": "200",
            "threshold_percent": 20,
        },
    }

    status, _ = await webhooks.send(event, webhook_id="msg_low")

    assert status == 200
    assert "msg_low" in await inbox_statuses(db)


async def test_valid_subscription_event_commits_inbox_row_and_subscription_together(
    webhooks: WebhookPoster, db: Database, stub: pb_grpc.EntitlementServiceAsyncStub
) -> None:
    assert await webhooks.send(active_event(), webhook_id="msg_valid") == (200, {"status": "applied"})

    row = await inbox_row(db, "msg_valid")
    assert row is not None
    assert (row.status, row.subject_id, row.event_timestamp) == ("applied", SUB_ID, EVENT_AT)
    stored = await stored_subscription(db)
    assert stored is not None
    assert (stored.status, stored.customer_id, stored.last_event_at) == ("active", CUSTOMER_ID, EVENT_AT)
    response = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="dashboard"))
    assert (response.allowed, response.reason, response.subscription_id) == (True, pb.ACCESS_REASON_ACTIVE, SUB_ID)


# --- 503: Postgres unavailable; probes -----------------------------------------------------------------------------


async def test_postgres_unavailable_is_503_and_stores_nothing(
    database_url: str, db: Database, catalog: Catalog
) -> None:
    unreachable = Database.from_url(UNREACHABLE_POSTGRES, connect_timeout=1)
    async with another_service(database_url, catalog, db=unreachable) as (_, poster):
        status, payload = await poster.send(active_event())

    assert status == 503, payload
    assert await stored_counts(db) == NOTHING_STORED


async def test_readyz_is_503_when_postgres_is_unavailable(database_url: str, db: Database, catalog: Catalog) -> None:
    unreachable = Database.from_url(UNREACHABLE_POSTGRES, connect_timeout=1)
    async with (
        another_service(database_url, catalog, db=unreachable) as (running, _),
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{running.http_port}/readyz") as response,
    ):
        assert response.status == 503


async def test_healthz_and_readyz_are_200_on_a_healthy_service(service: Running) -> None:
    async with aiohttp.ClientSession() as session:
        for probe in ("healthz", "readyz"):
            async with session.get(f"http://127.0.0.1:{service.http_port}/{probe}") as response:
                assert response.status == 200, probe


# --- configuration -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", " ", ",", " , "])
async def test_service_refuses_to_start_with_an_empty_webhook_key(
    database_url: str, catalog: Catalog, key: str
) -> None:
    with pytest.raises(ConfigurationError, match="DODO_PAYMENTS_WEBHOOK_KEY"):
        await start(make_settings(database_url, DODO_PAYMENTS_WEBHOOK_KEY=key), catalog=catalog)


@pytest.mark.parametrize(
    "key",
    ["whsec_a", "whsec_!!!!", "whsec_", "not-a-key", "whsec_hello world!", f"{WEBHOOK_SECRET},whsec_%%%"],
    ids=["too_short", "no_base64_chars", "prefix_only", "dashes", "space_and_bang", "second_key_bad"],
)
async def test_service_refuses_to_start_with_a_webhook_key_that_is_not_base64(
    database_url: str, catalog: Catalog, key: str
) -> None:
    with pytest.raises(ConfigurationError, match="DODO_PAYMENTS_WEBHOOK_KEY"):
        await start(make_settings(database_url, DODO_PAYMENTS_WEBHOOK_KEY=key), catalog=catalog)


# --- tolerant reading: unknown statuses and fields, loosely typed numbers, state from data ------------------------


async def test_unknown_status_is_stored_as_text_and_denies_access(
    webhooks: WebhookPoster, db: Database, stub: pb_grpc.EntitlementServiceAsyncStub
) -> None:
    event = subscription_event("subscription.updated", timestamp=EVENT_AT, status="frozen_by_dodo_2027")

    assert await webhooks.send(event) == (200, {"status": "applied"})

    stored = await stored_subscription(db)
    assert stored is not None
    assert stored.status == "frozen_by_dodo_2027"
    response = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="dashboard"))
    assert not response.allowed
    assert response.reason == pb.ACCESS_REASON_SUBSCRIPTION_INACTIVE
    assert response.status == "frozen_by_dodo_2027"


async def test_unknown_fields_in_data_and_envelope_are_ignored(
    webhooks: WebhookPoster, stub: pb_grpc.EntitlementServiceAsyncStub
) -> None:
    event = active_event()
    event["api_version"] = "2027-01-01"
    event["delivery"] = {"attempt": 3, "nested": [1, {"x": None}]}
    event["data"]["loyalty_tier"] = "platinum"
    event["data"]["customer"]["favourite_colour"] = "teal"
    event["data"]["brand_new_object"] = {"deeply": {"nested": True}}

    assert await webhooks.send(event) == (200, {"status": "applied"})

    response = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="dashboard"))
    assert (response.allowed, response.reason) == (True, pb.ACCESS_REASON_ACTIVE)


async def test_credit_entitlement_cart_with_numbers_instead_of_strings_is_accepted(
    webhooks: WebhookPoster, stub: pb_grpc.EntitlementServiceAsyncStub
) -> None:
    event = active_event()
    cart = copy.deepcopy(event["data"]["credit_entitlement_cart"][0])
    cart.update(
        credits_amount=1000,
        overage_balance=0,
        remaining_balance=1000.5,
        overage_enabled=True,
        overage_limit=100,
        rollover_percentage=50,
    )
    event["data"]["credit_entitlement_cart"] = [cart]

    assert await webhooks.send(event) == (200, {"status": "applied"})

    # api_calls is not in the Pro plan: only the cart's (numeric) entry can link it to this subscription.
    response = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="api_calls"))
    assert response.subscription_id == SUB_ID
    assert response.reason != pb.ACCESS_REASON_FEATURE_NOT_IN_PLAN


@pytest.mark.parametrize(
    ("event_type", "status", "allowed", "reason"),
    [
        ("subscription.renewed", "on_hold", True, pb.ACCESS_REASON_GRACE_PERIOD),
        ("subscription.active", "paused", False, pb.ACCESS_REASON_SUBSCRIPTION_INACTIVE),
        ("subscription.cancelled", "active", True, pb.ACCESS_REASON_ACTIVE),
        ("subscription.update_payment_method", "expired", False, pb.ACCESS_REASON_SUBSCRIPTION_INACTIVE),
    ],
)
async def test_state_comes_from_data_not_from_the_event_type(
    webhooks: WebhookPoster,
    stub: pb_grpc.EntitlementServiceAsyncStub,
    clock: FakeClock,
    event_type: str,
    status: str,
    allowed: bool,
    reason: pb.AccessReason.ValueType,
) -> None:
    clock.set(EVENT_AT + timedelta(days=1))  # inside the Pro plan's 3-day grace for the on_hold case
    event = subscription_event(event_type, timestamp=EVENT_AT, status=status)

    assert await webhooks.send(event) == (200, {"status": "applied"})

    response = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="dashboard"))
    assert (response.allowed, response.reason, response.status) == (allowed, reason, status)
