"""The Dodo webhook envelope `{business_id, type, timestamp, data}`, read after the signature is verified."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.domain.dodo_payloads import parse_time
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


@dataclass(frozen=True, slots=True)
class Event:
    webhook_id: str
    type: str
    timestamp: datetime
    business_id: str
    data: dict[str, Any]
    body: dict[str, Any]


def parse_event(body: bytes, webhook_id: str, header_timestamp: str) -> Event:
    try:
        # NaN and Infinity are not JSON (RFC 8259) and Postgres cannot store them: a 400, not a failed insert.
        envelope = json.loads(body, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError):
        raise MalformedPayload("body is not JSON") from None
    if not isinstance(envelope, dict):
        raise MalformedPayload("body must be a JSON object")
    event_type = envelope.get("type")
    data = envelope.get("data")
    if not isinstance(event_type, str) or not event_type:
        raise MalformedPayload("type is required")
    if not isinstance(data, dict):
        raise MalformedPayload("data must be an object")
    raw_time = envelope.get("timestamp")
    if raw_time is None:
        # The envelope time orders events; the signed header time is the closest stand-in when it is absent.
        # Parsed as the verifier parsed it: the header may carry a fraction ("1790000000.0") and still verify.
        timestamp = datetime.fromtimestamp(float(header_timestamp), tz=UTC)
    else:
        timestamp = parse_time(raw_time, "timestamp")
    business_id = envelope.get("business_id")
    return Event(
        webhook_id=webhook_id,
        type=event_type,
        timestamp=timestamp,
        business_id=business_id if isinstance(business_id, str) else "",
        data=data,
        body=envelope,
    )


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")
