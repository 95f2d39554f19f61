"""The Dodo webhook envelope `{business_id, type, timestamp, data}`, read after the signature is verified."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from service.domain.dodo_payloads import (
    DodoLedgerEntry,
    DodoSubscription,
    loads,
    parse_time,
    read_credit_notice,
    read_id,
    read_ledger_entry,
    read_payment,
    read_subscription,
)
from service.domain.errors import MalformedPayload

SUBSCRIPTION_EVENTS = frozenset(
    f"subscription.{name}"
    for name in (
        "active",
        "renewed",
        "on_hold",
        "past_due",
        "paused",
        "unpaused",
        "cancelled",
        "failed",
        "expired",
        "plan_changed",
        "updated",
        "update_payment_method",
    )
)


CREDIT_LEDGER_EVENTS = frozenset(
    f"credit.{name}"
    for name in (
        "added",
        "deducted",
        "expired",
        "rolled_over",
        "rollover_forfeited",
        "overage_charged",
        "overage_reset",
        "manual_adjustment",
    )
)


class Outcome(enum.StrEnum):
    """What became of one delivery: the webhook's answer body and the inbox row's status."""

    APPLIED = "applied"
    STALE = "stale"
    RECORDED = "recorded"
    IGNORED = "ignored"
    DUPLICATE = "duplicate"
    # A Dodo credit ledger entry already applied under another webhook-id.
    DUPLICATE_ENTRY = "duplicate_entry"
    # The echo of our own mirrored debit (service/app/credit_mirror.py): acknowledged, no balance change.
    MIRROR_ECHO = "mirror_echo"


# DESIGN §12: an envelope time later than this past the signed time is not trusted to order anything.
TIMESTAMP_TRUST = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Event:
    webhook_id: str
    type: str
    # The time that orders this event against others of its subscription (see `parse_event`).
    timestamp: datetime
    business_id: str
    data: dict[str, Any]
    # The body as received: stored as it is, so numbers keep their digits (see `InboxRepository.record`).
    text: str
    # The envelope's own time when it was later than the signed time allows, and so was not used.
    untrusted_timestamp: datetime | None = None


def parse_event(body: bytes, webhook_id: str, signed_at: datetime) -> Event:
    """The envelope of a delivery whose signature (made at `signed_at`) has been verified.

    Only the signature vouches for time: an envelope `timestamp` more than `TIMESTAMP_TRUST` after `signed_at`
    (a clock gone wrong, a replayed template stamped 2099) would otherwise outrank every real event of its
    subscription for years, so the signed time orders the event instead."""
    webhook_id = read_id(webhook_id, "webhook-id")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPayload("body is not UTF-8") from None
    envelope = loads(text)
    if not isinstance(envelope, dict):
        raise MalformedPayload("body must be a JSON object")
    event_type = read_id(envelope.get("type"), "type")
    data = envelope.get("data")
    if not isinstance(data, dict):
        raise MalformedPayload("data must be an object")
    timestamp, untrusted = signed_at, None
    if envelope.get("timestamp") is not None:
        claimed = parse_time(envelope["timestamp"], "timestamp")
        if claimed > signed_at + TIMESTAMP_TRUST:
            untrusted = claimed
        else:
            timestamp = claimed
    return Event(
        webhook_id=webhook_id,
        type=event_type,
        timestamp=timestamp,
        business_id=read_id(envelope.get("business_id"), "business_id", required=False),
        data=data,
        text=text,
        untrusted_timestamp=untrusted,
    )


@dataclass(frozen=True, slots=True)
class Kept:
    """An event stored in the inbox but not applied (payments, credit notices, types we do not handle)."""

    outcome: Outcome
    subject_id: str


EventData = DodoSubscription | DodoLedgerEntry | Kept


def read_data(event: Event) -> EventData:
    """The event's `data`, read and checked for its family before any connection is taken: a subscription snapshot,
    a credit ledger entry, or what the inbox row of a kept-only event is filed under."""
    if event.type in SUBSCRIPTION_EVENTS:
        return read_subscription(event.data)
    if event.type in CREDIT_LEDGER_EVENTS:
        return read_ledger_entry(event.data)
    family = event.type.split(".", 1)[0]
    if family == "payment":
        return Kept(Outcome.RECORDED, read_payment(event.data))
    if family == "credit":
        return Kept(Outcome.RECORDED, read_credit_notice(event.data))
    return Kept(Outcome.IGNORED, "")
