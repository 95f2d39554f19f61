"""`python -m service.dev.send_webhook FILE.json [--type T] [--url U]`: sign a Dodo payload and post it, like Dodo's
dashboard "send test event", to drive a running service by hand.

The key is DODO_PAYMENTS_WEBHOOK_KEY (the first one when several are set), else the development key `make run`
created in .data/. The envelope timestamp is set to now unless --keep-timestamp is given, so a hand-driven sequence
of events applies in the order it is sent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

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
    args = parser.parse_args(argv)

    body = json.loads(args.file.read_text())
    if args.event_type:
        body["type"] = args.event_type
    now = datetime.now(UTC)
    if not args.keep_timestamp:
        body["timestamp"] = now.isoformat().replace("+00:00", "Z")
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


if __name__ == "__main__":
    sys.exit(main())
