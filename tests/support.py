"""Small helpers the tests share: fixture payloads, a settable clock, webhook signing and posting."""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from standardwebhooks.webhooks import Webhook

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "dodo"
LOCAL_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "dodo"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24="
API_TOKEN = "test-token-1"

SUB_ID = "sub_8YtR3nQw2LpX6vK1mZ4cB"
CUSTOMER_ID = "cus_5Hq2LrT9vXcW3mK8pZ1dE"
PRO = "pdt_6Gx2Kq9LwPro0Mth4Rt1"
TEAM = "pdt_3Rt8Yu1PaTeam0Mth7Wq"
STARTER = "pdt_1Bz4Ns8StarterMth2Xk"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def load_event(name: str) -> dict[str, Any]:
    """A sample webhook body; the shared fixtures are preferred, a vendored copy keeps tests hermetic."""
    for folder in (FIXTURES, LOCAL_FIXTURES):
        path = folder / f"{name}.json"
        if path.exists():
            loaded: dict[str, Any] = json.loads(path.read_text())
            return loaded
    raise FileNotFoundError(name)


def subscription_event(
    event_type: str, *, timestamp: datetime, base: str = "subscription_active", **changes: Any
) -> dict[str, Any]:
    """A subscription webhook built from a real-shaped fixture with the given `data` fields changed."""
    body = copy.deepcopy(load_event(base))
    body["type"] = event_type
    body["timestamp"] = iso(timestamp)
    for key, value in changes.items():
        body["data"][key] = iso(value) if isinstance(value, datetime) else value
    return body


@dataclass
class FakeClock:
    now: datetime = field(default_factory=lambda: utc("2026-09-10T00:00:00Z"))

    def __call__(self) -> datetime:
        return self.now

    def set(self, value: datetime | str) -> None:
        self.now = utc(value) if isinstance(value, str) else value

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def sign(
    body: bytes,
    *,
    secret: str = WEBHOOK_SECRET,
    webhook_id: str | None = None,
    at: datetime | None = None,
) -> dict[str, str]:
    webhook_id = webhook_id or f"msg_{uuid.uuid4().hex}"
    at = at or datetime.now(UTC)
    signature = Webhook(secret).sign(webhook_id, at, body.decode())
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


@dataclass
class WebhookPoster:
    url: str
    session: aiohttp.ClientSession

    async def post_raw(self, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        async with self.session.post(self.url, data=body, headers=headers) as response:
            try:
                payload = await response.json(content_type=None)
            except ValueError:
                payload = {}
            return response.status, payload if isinstance(payload, dict) else {}

    async def send(
        self, event: dict[str, Any], *, webhook_id: str | None = None, secret: str = WEBHOOK_SECRET
    ) -> tuple[int, dict[str, Any]]:
        body = json.dumps(event).encode()
        return await self.post_raw(body, sign(body, secret=secret, webhook_id=webhook_id))
