"""Hostile input to the webhook receiver (issue 9 item 6; DESIGN §7, §12), driven from outside: signed HTTP
deliveries to the real port, results read straight from the tables.

Every signed body that Python or Postgres cannot take is a 400 with nothing stored, never a 500 (Dodo would retry a
500 for a day and a half to the same end); decimals are read exactly, with the strict grammar of RPC amounts; an
envelope time later than the signed time orders nothing; a retried delivery of a stored webhook-id stays a
duplicate however its body reads now."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select, text

from service.app.webhook_ingest import _storable
from service.domain.errors import MalformedPayload
from storage.engine import Database
from storage.models import CreditBalance, CreditLedgerEntry, Subscription, WebhookInbox
from tests.support import (
    API_CALLS_ENTITLEMENT,
    CUSTOMER_ID,
    NOTHING_STORED,
    SUB_ID,
    WebhookPoster,
    count_rows,
    credit_ledger_event,
    inbox_statuses,
    load_event,
    sign,
    stored_account,
    stored_counts,
    subscription_event,
    utc,
)

EVENT_AT = utc("2026-09-05T12:00:00Z")
# Incompressible, as in the probes: Postgres compresses index entries, so "x" * 10_000 would fit in a btree.
LONG_ID = "".join(hashlib.sha256(str(n).encode()).hexdigest() for n in range(157))[:10_000]
NOTHING = {**NOTHING_STORED, "credit_ledger": 0, "credit_balances": 0}
Event = dict[str, Any]


def encode(event: Event) -> bytes:
    return json.dumps(event).encode()


def active_event() -> Event:
    return subscription_event("subscription.active", timestamp=EVENT_AT)


def payment_event() -> Event:
    return load_event("payment_succeeded")


def ledger_event(amount: Any = "5") -> Event:
    return credit_ledger_event(entry_id="cle_hostile", amount=amount, at=EVENT_AT)


def balance_low_event() -> Event:
    return {
        "business_id": "bus_0NmY7fQz4kR2sT8vW1xJa",
        "type": "credit.balance_low",
        "timestamp": "2026-10-02T09:00:00Z",
        "data": {
            "payload_type": "CreditBalanceLow",
            "customer_id": CUSTOMER_ID,
            "subscription_id": SUB_ID,
            "credit_entitlement_id": API_CALLS_ENTITLEMENT,
            "credit_entitlement_name": "API Calls",
            "available_balance": "150",
            "threshold_amount": "200",
            "threshold_percent": 20,
        },
    }


BASES: dict[str, Callable[[], Event]] = {
    "subscription": active_event,
    "payment": payment_event,
    "ledger": ledger_event,
    "balance_low": balance_low_event,
}


def set_field(event: Event, path: str, value: Any) -> Event:
    """A copy of `event` with the field at dotted `path` (list items by index) set to `value`."""
    event = copy.deepcopy(event)
    *parents, last = path.split(".")
    target: Any = event
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    target[int(last) if isinstance(target, list) else last] = value
    return event


def changed(base: str, path: str, value: Any) -> Event:
    return set_field(BASES[base](), path, value)


def with_raw(event: Event, raw: bytes, *, at: str = "data.amount") -> bytes:
    """The event's JSON with the field at `at` written as `raw` JSON text (numbers json.dumps cannot write)."""
    body = encode(set_field(event, at, "@@raw@@"))
    assert body.count(b'"@@raw@@"') == 1
    return body.replace(b'"@@raw@@"', raw)


async def post(
    webhooks: WebhookPoster, body: bytes, *, webhook_id: str | None = None, at: datetime | None = None
) -> tuple[int, dict[str, Any]]:
    return await webhooks.post_raw(body, sign(body, webhook_id=webhook_id, at=at))


async def everything_stored(db: Database) -> dict[str, int]:
    return {
        **await stored_counts(db),
        "credit_ledger": await count_rows(db, CreditLedgerEntry),
        "credit_balances": await count_rows(db, CreditBalance),
    }


async def assert_refused(webhooks: WebhookPoster, db: Database, body: bytes, *, field: str) -> str:
    """400 naming `field`, at most 64 characters of the input quoted, and not one row written anywhere."""
    status, payload = await post(webhooks, body)
    assert status == 400, payload
    message = str(payload["error"])
    assert field in message, message
    assert len(message) < 300, message
    assert await everything_stored(db) == NOTHING
    return message


async def stored_text(db: Database, sql: str, **params: Any) -> Any:
    async with db.session() as session:
        return (await session.execute(text(sql), params)).scalar_one()


def nested_body(levels: int) -> bytes:
    """A valid subscription event with an unknown field of `levels` nested lists: the body is 1 + `levels` deep.
    Written as text: json.dumps itself recurses and cannot write the deepest ones."""
    return with_raw(active_event(), b"[" * levels + b"]" * levels, at="padding")


# --- nesting -------------------------------------------------------------------------------------------------------


async def test_json_nested_64_levels_deep_is_accepted(webhooks: WebhookPoster, db: Database) -> None:
    assert await post(webhooks, nested_body(63)) == (200, {"status": "applied"})
    assert await count_rows(db, Subscription) == 1


@pytest.mark.parametrize("levels", [64, 300, 1_100], ids=["65_deep", "301_deep", "1101_deep"])
async def test_json_nested_deeper_than_64_levels_is_400_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, levels: int
) -> None:
    await assert_refused(webhooks, db, nested_body(levels), field="64 levels")


# --- ids: 1–255 printable characters (§12) --------------------------------------------------------------------------

ID_FIELDS = [
    ("subscription", "data.subscription_id", "data.subscription_id"),
    ("subscription", "data.customer.customer_id", "data.customer.customer_id"),
    ("subscription", "data.product_id", "data.product_id"),
    ("subscription", "data.status", "data.status"),
    (
        "subscription",
        "data.credit_entitlement_cart.0.credit_entitlement_id",
        "data.credit_entitlement_cart[0].credit_entitlement_id",
    ),
    ("subscription", "type", "type"),
    ("subscription", "business_id", "business_id"),
    ("payment", "data.payment_id", "data.payment_id"),
    ("payment", "data.subscription_id", "data.subscription_id"),
    ("payment", "data.customer.customer_id", "data.customer.customer_id"),
    ("ledger", "data.id", "data.id"),
    ("ledger", "data.customer_id", "data.customer_id"),
    ("ledger", "data.credit_entitlement_id", "data.credit_entitlement_id"),
    ("ledger", "data.transaction_type", "data.transaction_type"),
    ("balance_low", "data.customer_id", "data.customer_id"),
    ("balance_low", "data.subscription_id", "data.subscription_id"),
    ("balance_low", "data.credit_entitlement_id", "data.credit_entitlement_id"),
]


@pytest.mark.parametrize(("base", "path", "field"), ID_FIELDS, ids=[f"{b}-{p}" for b, p, _ in ID_FIELDS])
async def test_ten_kilobyte_id_is_400_naming_the_field_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, base: str, path: str, field: str
) -> None:
    message = await assert_refused(webhooks, db, encode(changed(base, path, LONG_ID)), field=field)
    assert LONG_ID[:65] not in message


@pytest.mark.parametrize(
    ("base", "path", "value"),
    [
        ("subscription", "data.customer.customer_id", "cus_\x07bell"),
        ("subscription", "data.subscription_id", "sub_line\u2028separator"),
        ("ledger", "data.id", "cle_\x1bescape"),
        ("payment", "data.payment_id", "pay_\x9fc1_control"),
    ],
    ids=["bell_in_customer_id", "line_separator_in_subscription_id", "escape_in_entry_id", "c1_in_payment_id"],
)
async def test_id_with_a_control_character_is_400_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, base: str, path: str, value: str
) -> None:
    await assert_refused(webhooks, db, encode(changed(base, path, value)), field=path)


async def test_ids_of_255_characters_are_accepted(webhooks: WebhookPoster, db: Database) -> None:
    event = active_event()
    event["data"]["subscription_id"] = "s" * 255
    event["data"]["customer"]["customer_id"] = "c" * 255

    assert await post(webhooks, encode(event)) == (200, {"status": "applied"})

    async with db.session() as session:
        stored = await session.scalar(select(Subscription))
    assert stored is not None
    assert (stored.subscription_id, stored.customer_id) == ("s" * 255, "c" * 255)


async def test_webhook_id_of_five_kilobytes_is_400_and_stores_nothing(webhooks: WebhookPoster, db: Database) -> None:
    body = encode(active_event())
    status, payload = await webhooks.post_raw(body, sign(body, webhook_id="msg_" + "x" * 5_000))
    assert status == 400, payload
    assert "webhook-id" in payload["error"]
    assert await everything_stored(db) == NOTHING


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: changed("ledger", "data.description", "d" * 1_001), "data.description"),
        (lambda: changed("ledger", "data.description", "tab\tok, bell\x07 not"), "data.description"),
        (lambda: changed("subscription", "data.metadata", {f"k{n}": "v" for n in range(51)}), "data.metadata"),
        (lambda: changed("subscription", "data.metadata", {"k" * 41: "v"}), "data.metadata"),
        (lambda: changed("subscription", "data.metadata", {"k": "v" * 501}), "data.metadata"),
        (lambda: changed("subscription", "data.metadata", {"k": 5}), "data.metadata"),
    ],
    ids=[
        "description_1001",
        "description_bell",
        "metadata_51_pairs",
        "metadata_key_41",
        "metadata_value_501",
        "not_text",
    ],
)
async def test_stored_text_beyond_its_limits_is_400_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, make: Callable[[], Event], field: str
) -> None:
    await assert_refused(webhooks, db, encode(make()), field=field)


# --- dates: years 1970–2200, or Python and Postgres fail on them ----------------------------------------------------


def _trial_9999() -> Event:
    event = changed("subscription", "data.created_at", "9999-12-31T23:59:59Z")
    event["data"]["trial_period_days"] = 30
    return event


DATE_CASES: list[tuple[str, Callable[[], Event], str]] = [
    ("created_at_9999_with_trial", _trial_9999, "data.created_at"),
    (
        "next_billing_9999",
        lambda: changed("subscription", "data.next_billing_date", "9999-12-31T23:59:59Z"),
        "data.next_billing_date",
    ),
    (
        "expires_at_year_1",
        lambda: changed("subscription", "data.expires_at", "0001-01-01T00:00:00+01:00"),
        "data.expires_at",
    ),
    (
        "cancelled_at_2201",
        lambda: changed("subscription", "data.cancelled_at", "2201-01-01T00:00:00Z"),
        "data.cancelled_at",
    ),
    (
        "previous_billing_1969",
        lambda: changed("subscription", "data.previous_billing_date", "1969-12-31T23:59:59Z"),
        "data.previous_billing_date",
    ),
    (
        "ledger_created_at_9999",
        lambda: changed("ledger", "data.created_at", "9999-12-31T23:59:59-05:00"),
        "data.created_at",
    ),
    ("envelope_9999", lambda: changed("subscription", "timestamp", "9999-12-31T23:59:59Z"), "timestamp"),
    ("payment_envelope_9999", lambda: changed("payment", "timestamp", "9999-12-31T23:59:59Z"), "timestamp"),
]


@pytest.mark.parametrize(("make", "field"), [(m, f) for _, m, f in DATE_CASES], ids=[n for n, _, _ in DATE_CASES])
async def test_date_outside_the_years_1970_to_2200_is_400_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, make: Callable[[], Event], field: str
) -> None:
    message = await assert_refused(webhooks, db, encode(make()), field=field)
    assert "1970" in message, message
    assert "2200" in message, message


async def test_dates_at_the_ends_of_the_range_are_accepted(webhooks: WebhookPoster, db: Database) -> None:
    event = active_event()
    event["data"]["expires_at"] = "2200-12-31T23:59:59Z"
    event["data"]["created_at"] = "1970-01-01T00:00:00Z"

    assert await post(webhooks, encode(event)) == (200, {"status": "applied"})
    assert await count_rows(db, Subscription) == 1


# --- text Postgres cannot store: NUL, unpaired surrogates -----------------------------------------------------------

TEXT_CASES = [
    ("nul_in_unknown_envelope_field", lambda: changed("subscription", "note", "a\x00b"), "note"),
    ("nul_in_customer_name", lambda: changed("subscription", "data.customer.name", "Ada\x00"), "data.customer.name"),
    ("nul_in_a_key", lambda: changed("subscription", "data.metadata", {"k\x00": "v"}), "data.metadata"),
    ("nul_in_ledger_description", lambda: changed("ledger", "data.description", "\x00"), "data.description"),
    (
        "nul_in_payment_field",
        lambda: changed("payment", "data.error_message", "card\x00declined"),
        "data.error_message",
    ),
    ("nul_in_unknown_event", lambda: {**changed("payment", "data.x", "\x00"), "type": "dispute.opened"}, "data.x"),
    ("lone_surrogate", lambda: changed("subscription", "data.customer.email", "\ud800@x"), "data.customer.email"),
]


@pytest.mark.parametrize(("make", "field"), [(m, f) for _, m, f in TEXT_CASES], ids=[n for n, _, _ in TEXT_CASES])
async def test_string_postgres_cannot_store_anywhere_in_the_body_is_400_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, make: Callable[[], Event], field: str
) -> None:
    body = encode(make())
    assert b"\\u0000" in body or b"\\ud800" in body
    await assert_refused(webhooks, db, body, field=field)


@pytest.mark.parametrize(
    ("raw", "name"),
    [(b'"Ada \\ud83d\\ude00"', "Ada \U0001f600"), (b'"Ada \\\\u0000"', "Ada \\u0000")],
    ids=["escaped_surrogate_pair", "escaped_backslash_before_u0000"],
)
async def test_escapes_that_spell_storable_text_are_accepted(
    webhooks: WebhookPoster, db: Database, raw: bytes, name: str
) -> None:
    body = with_raw(active_event(), raw, at="data.customer.name")

    assert await post(webhooks, body) == (200, {"status": "applied"})

    stored = await stored_text(db, "SELECT name FROM customers WHERE customer_id = :id", id=CUSTOMER_ID)
    assert stored == name


async def test_number_postgres_cannot_hold_is_400_and_stores_nothing(webhooks: WebhookPoster, db: Database) -> None:
    # Postgres numeric has at most 131072 digits before the point: the insert fails with a DataError.
    await assert_refused(webhooks, db, with_raw(payment_event(), b"1e200000", at="data.fee"), field="stored")


async def test_value_postgres_refuses_for_its_size_is_malformed_not_an_internal_error(db: Database) -> None:
    """Ids are bounded before they reach an index; should any other value still pass a limit of Postgres (sqlstate
    class 54, e.g. an index row over 2704 bytes), the delivery is malformed, not a 500."""
    async with db.tx() as connection:
        await connection.execute("CREATE TEMPORARY TABLE wide (value text) ON COMMIT DROP")
        await connection.execute("CREATE INDEX ON wide (value)")
        with pytest.raises(MalformedPayload, match="54000"), _storable():
            async with connection.transaction():
                await connection.execute("INSERT INTO wide VALUES ($1)", LONG_ID)
        with pytest.raises(MalformedPayload, match="22021"), _storable():
            async with connection.transaction():
                await connection.execute("INSERT INTO wide VALUES ($1)", "a\x00b")


# --- decimals: exact, never through float; the strict grammar of RPC amounts -----------------------------------------

REFUSED_AMOUNTS: list[tuple[str, Any]] = [
    ("exponent_string", "1e400"),
    ("small_exponent_string", "1E3"),
    ("leading_space", " 5"),
    ("trailing_space", "5 "),
    ("plus_sign", "+5"),
    ("negative", "-5"),
    ("arabic_indic_digits", "\u0665"),
    ("fullwidth_digit", "\uff15"),
    ("nan_string", "NaN"),
    ("infinity_string", "Infinity"),
    ("empty", ""),
    ("underscore", "1_000"),
    ("twenty_one_integer_digits", "123456789012345678901"),
    ("nineteen_fraction_digits", "0.1234567890123456789"),
    ("trailing_point", "5."),
    ("leading_point", ".5"),
    ("boolean", True),
    ("null", None),
    ("list", ["5"]),
]


@pytest.mark.parametrize("amount", [a for _, a in REFUSED_AMOUNTS], ids=[n for n, _ in REFUSED_AMOUNTS])
async def test_ledger_amount_outside_the_strict_decimal_grammar_is_400_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, amount: Any
) -> None:
    await assert_refused(webhooks, db, encode(ledger_event(amount)), field="data.amount")


@pytest.mark.parametrize(
    "raw",
    [b"1e400", b"1E-19", b"123456789012345678901", b"0.1234567890123456789", b"-5", b"NaN", b"Infinity", b"-Infinity"],
    ids=["huge_exponent", "tiny_exponent", "21_digit_integer", "19_fraction_digits", "negative", "nan", "inf", "-inf"],
)
async def test_ledger_amount_json_number_beyond_the_digit_bounds_is_400_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, raw: bytes
) -> None:
    status, payload = await post(webhooks, with_raw(ledger_event(), raw))
    assert status == 400, payload
    assert await everything_stored(db) == NOTHING


@pytest.mark.parametrize(
    ("amount", "raw"),
    [
        ("0.123456789012345678", None),
        ("99999999999999999999.999999999999999999", None),
        ("0", None),
        (None, b"12345678901234567890.5"),
        (None, b"0.123456789012345678"),
        (None, b"18446744073709551616"),
    ],
    ids=["18_fraction_digits", "largest", "zero", "number_20_integer_digits", "number_18_fraction_digits", "2**64"],
)
async def test_ledger_amount_is_credited_and_stored_exactly(
    webhooks: WebhookPoster, db: Database, amount: str | None, raw: bytes | None
) -> None:
    body = encode(ledger_event(amount)) if raw is None else with_raw(ledger_event(), raw)
    written = amount if raw is None else raw.decode()
    assert written is not None
    exact = Decimal(written)

    status, payload = await post(webhooks, body, webhook_id="msg_exact")

    assert (status, payload) == (200, {"status": "applied"})
    account = await stored_account(db, CUSTOMER_ID, "api_calls")
    assert (account.balance, account.ledger_sum, account.ledger_rows) == (exact, exact, 1)
    stored = await stored_text(
        db, "SELECT payload->'data'->>'amount' FROM webhook_inbox WHERE webhook_id = :id", id="msg_exact"
    )
    assert stored == written


async def test_numbers_in_a_subscription_payload_are_stored_with_their_digits(
    webhooks: WebhookPoster, db: Database
) -> None:
    """The stored snapshot keeps Dodo's digits: a float would round the first, a 64-bit integer cannot hold the
    second (and JSONB has no limit on either)."""
    body = with_raw(active_event(), b"0.1000000000000000055511151231257827", at="data.precise")
    body = body.replace(b'"data": {', b'"data": {"huge": 123456789012345678901234567890, ', 1)

    assert await post(webhooks, body, webhook_id="msg_numbers") == (200, {"status": "applied"})

    snapshot = "SELECT payload->>'precise', payload->>'huge' FROM subscriptions WHERE subscription_id = :id"
    async with db.session() as session:
        row = (await session.execute(text(snapshot), {"id": SUB_ID})).one()
        inbox = (
            await session.execute(
                text(
                    "SELECT payload->'data'->>'precise', payload->'data'->>'huge' FROM webhook_inbox"
                    " WHERE webhook_id = 'msg_numbers'"
                )
            )
        ).one()
    assert tuple(row) == tuple(inbox) == ("0.1000000000000000055511151231257827", "123456789012345678901234567890")


@pytest.mark.parametrize(
    "limit", [b"100.123456789012345678", b'"100.123456789012345678"'], ids=["number", "decimal_string"]
)
async def test_cart_overage_limit_is_read_exactly(webhooks: WebhookPoster, db: Database, limit: bytes) -> None:
    event = active_event()
    event["data"]["credit_entitlement_cart"][0]["overage_enabled"] = True
    event["data"]["credit_entitlement_cart"][0]["overage_limit"] = "@@raw@@"
    body = encode(event).replace(b'"@@raw@@"', limit)

    assert await post(webhooks, body) == (200, {"status": "applied"})

    stored = await stored_text(
        db,
        "SELECT credit_entitlement_cart->0->>'overage_limit' FROM subscriptions WHERE subscription_id = :id",
        id=SUB_ID,
    )
    assert stored == "100.123456789012345678"


@pytest.mark.parametrize("limit", ["1e400", " 100", "\u0661\u0660\u0660"], ids=["exponent", "space", "arabic_indic"])
async def test_cart_overage_limit_outside_the_grammar_is_400_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, limit: str
) -> None:
    event = active_event()
    event["data"]["credit_entitlement_cart"][0]["overage_limit"] = limit
    await assert_refused(webhooks, db, encode(event), field="overage_limit")


# --- envelope time bounded by the signed time (§12) ------------------------------------------------------------------


async def subscription_times(db: Database) -> tuple[datetime | None, list[datetime]]:
    async with db.session() as session:
        last = await session.scalar(select(Subscription.last_event_at).where(Subscription.subscription_id == SUB_ID))
        inbox = list(await session.scalars(select(WebhookInbox.event_timestamp).order_by(WebhookInbox.id)))
    return last, inbox


async def test_envelope_stamped_2099_does_not_freeze_the_subscription(
    webhooks: WebhookPoster, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="entitlements.webhooks")
    signed_at = datetime.now(UTC).replace(microsecond=0)
    future = subscription_event("subscription.active", timestamp=utc("2099-01-01T00:00:00Z"))
    assert await post(webhooks, encode(future), webhook_id="msg_2099", at=signed_at) == (200, {"status": "applied"})
    assert await subscription_times(db) == (signed_at, [signed_at])
    untrusted = [r for r in caplog.records if r.getMessage() == "webhook.timestamp_untrusted"]
    assert len(untrusted) == 1
    assert untrusted[0].__dict__["webhook_id"] == "msg_2099"

    later = subscription_event(
        "subscription.on_hold", timestamp=signed_at + timedelta(seconds=1), status="on_hold", quantity=3
    )
    assert await post(webhooks, encode(later), webhook_id="msg_real", at=signed_at) == (200, {"status": "applied"})

    async with db.session() as session:
        stored = await session.scalar(select(Subscription))
    assert stored is not None
    assert (stored.status, stored.quantity, stored.last_event_at) == ("on_hold", 3, signed_at + timedelta(seconds=1))
    assert await inbox_statuses(db) == {"msg_2099": "applied", "msg_real": "applied"}


async def test_envelope_time_within_five_minutes_after_the_signed_time_orders_the_event(
    webhooks: WebhookPoster, db: Database
) -> None:
    signed_at = datetime.now(UTC).replace(microsecond=0)
    envelope_at = signed_at + timedelta(minutes=4, seconds=59)
    event = subscription_event("subscription.active", timestamp=envelope_at)

    assert await post(webhooks, encode(event), at=signed_at) == (200, {"status": "applied"})

    assert await subscription_times(db) == (envelope_at, [envelope_at])


@pytest.mark.parametrize(
    "stamp", ["not a time", "2026-13-01T00:00:00Z", "", 1_790_000_000, True, ["2026-09-05T12:00:00Z"]]
)
async def test_envelope_timestamp_that_is_not_a_valid_time_is_400_and_stores_nothing(
    webhooks: WebhookPoster, db: Database, stamp: Any
) -> None:
    await assert_refused(webhooks, db, encode({**active_event(), "timestamp": stamp}), field="timestamp")


# --- a stored webhook-id stays a duplicate, whatever its body reads like now -----------------------------------------


REDELIVERIES: list[tuple[str, Callable[[], bytes]]] = [
    ("not_json", lambda: b'{"type": "subscription.active", "data": {'),
    ("ten_kilobyte_customer_id", lambda: encode(changed("subscription", "data.customer.customer_id", LONG_ID))),
    ("nested_1101_deep", lambda: nested_body(1_100)),
    ("nul", lambda: encode(changed("subscription", "data.customer.name", "\x00"))),
    ("year_9999", lambda: encode(_trial_9999())),
    ("amount_1e400", lambda: encode(ledger_event("1e400"))),
    ("postgres_refuses_the_number", lambda: with_raw(payment_event(), b"1e200000", at="data.fee")),
]


@pytest.mark.parametrize("redelivery", [r for _, r in REDELIVERIES], ids=[n for n, _ in REDELIVERIES])
async def test_stored_webhook_id_redelivered_with_a_body_that_no_longer_parses_is_a_duplicate(
    webhooks: WebhookPoster, db: Database, redelivery: Callable[[], bytes]
) -> None:
    original = active_event()
    assert await post(webhooks, encode(original), webhook_id="msg_once") == (200, {"status": "applied"})
    before = await everything_stored(db)

    assert await post(webhooks, redelivery(), webhook_id="msg_once") == (200, {"status": "duplicate"})

    assert await everything_stored(db) == before
    assert await inbox_statuses(db) == {"msg_once": "applied"}
    async with db.session() as session:
        row = await session.scalar(select(WebhookInbox))
        stored = await session.scalar(select(Subscription))
    assert row is not None
    assert row.payload == original
    assert stored is not None
    assert stored.customer_id == CUSTOMER_ID


async def test_an_unstored_webhook_id_with_a_body_that_does_not_parse_is_still_400(
    webhooks: WebhookPoster, db: Database
) -> None:
    assert await post(webhooks, encode(active_event()), webhook_id="msg_once") == (200, {"status": "applied"})
    before = await everything_stored(db)

    status, payload = await post(webhooks, encode(ledger_event("1e400")), webhook_id="msg_other")

    assert status == 400, payload
    assert await everything_stored(db) == before
