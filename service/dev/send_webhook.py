"""`python -m service.dev.send_webhook FILE.json [--type T] [--url U]`: sign a Dodo payload and post it, like Dodo's
dashboard "send test event", to drive a running service by hand.

The key is DODO_PAYMENTS_WEBHOOK_KEY (the first one when several are set), else the development key `make run`
created in .data/. The envelope timestamp is set to now unless --keep-timestamp is given, so a hand-driven sequence
of events applies in the order it is sent; and a subscription's dates are moved so that its period began yesterday
(--keep-dates keeps the file's), so the sample fixtures behave as if just sent by Dodo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from standardwebhooks.webhooks import Webhook

from service.dev.devkey import KEY_FILE
from service.settings import comma_list


def _key() -> str:
    configured = comma_list(os.environ.get("DODO_PAYMENTS_WEBHOOK_KEY"))
    if configured:
        return configured[0]
    if KEY_FILE.exists():
        return KEY_FILE.read_text().strip()
    raise SystemExit("no key: set DODO_PAYMENTS_WEBHOOK_KEY (or run `make run` once to create the dev key)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.dev.send_webhook", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="a JSON webhook body (envelope with type and data)")
    parser.add_argument("--type", dest="event_type", help="override the event type, e.g. subscription.on_hold")
    parser.add_argument(
        "--url", default=f"http://{os.environ.get('ENTITLEMENTS_HTTP_ADDR', '127.0.0.1:8080')}/webhooks/dodo"
    )
    parser.add_argument("--id", dest="webhook_id", help="webhook-id header (default: a new one)")
    parser.add_argument("--keep-timestamp", action="store_true", help="keep the file's envelope timestamp")
    parser.add_argument(
        "--keep-dates",
        action="store_true",
        help="keep the file's own dates (by default a subscription's period is moved to have begun yesterday)",
    )
    args = parser.parse_args(argv)

    body = json.loads(args.file.read_text())
    if args.event_type:
        body["type"] = args.event_type
    now = datetime.now(UTC)
    if not args.keep_timestamp:
        body["timestamp"] = _iso(now)
    if not args.keep_dates and isinstance(body.get("data"), dict):
        body["data"] = moved_to_now(body["data"], now)
    raw = json.dumps(body).encode()
    webhook_id = args.webhook_id or f"msg_{uuid.uuid4().hex}"
    headers = {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(_key()).sign(webhook_id, now, raw.decode()),
    }
    request = urllib.request.Request(args.url, data=raw, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            print(response.status, response.read().decode())
            return 0
    except urllib.error.HTTPError as error:
        print(error.code, error.read().decode(), file=sys.stderr)
        return 1


_SUBSCRIPTION_DATES = (
    "created_at",
    "previous_billing_date",
    "next_billing_date",
    "cancelled_at",
    "expires_at",
    "past_due_ends_at",
)


def moved_to_now(data: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The fixtures' dates are fixed, so on today's clock their periods are long over (credits expired, trials
    ended). Move a subscription's dates together, by whole days, so its period began yesterday (at its own time
    of day); a credit ledger entry is made `now`. Everything keeps its place relative to the rest, and two events
    of one subscription sent the same day still share one billing period (one credit grant)."""
    moved = dict(data)
    start = _parse(moved.get("previous_billing_date"))
    if start is not None:
        delta = timedelta(days=(now.date() - start.date()).days - 1)
        for name in _SUBSCRIPTION_DATES:
            when = _parse(moved.get(name))
            if when is not None:
                moved[name] = _iso(when + delta)
        scheduled = moved.get("scheduled_change")
        if isinstance(scheduled, dict) and _parse(scheduled.get("effective_at")) is not None:
            effective = _parse(scheduled["effective_at"])
            assert effective is not None
            moved["scheduled_change"] = {**scheduled, "effective_at": _iso(effective + delta)}
    elif "credit_entitlement_id" in moved and _parse(moved.get("created_at")) is not None:
        moved["created_at"] = _iso(now)
    return moved


def _parse(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


if __name__ == "__main__":
    sys.exit(main())
