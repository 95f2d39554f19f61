"""Small helpers the tests share: fixture payloads, a settable clock, webhook signing and posting."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from google.rpc import error_details_pb2, status_pb2
from sqlalchemy import func, select, text
from standardwebhooks.webhooks import Webhook

from service.settings import Settings
from storage.engine import Database
from storage.models import Base, Customer, Subscription, WebhookInbox

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


REPO_ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = REPO_ROOT / "clients" / "node"


def ensure_node_modules() -> Path:
    """clients/node/node_modules as `make test` leaves it: installed from the lockfile with `npm ci` when missing."""
    import shutil
    import subprocess

    installed = NODE_DIR / "node_modules"
    wanted = (installed / "@entitlements" / "client", installed / ".bin" / "buf")
    if not all(path.exists() for path in wanted):
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is not installed: run `make install` (it installs Node.js and npm)")
        subprocess.run([npm, "ci", "--silent", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300)
    return installed


async def deliver(webhooks: WebhookPoster, *events: dict[str, Any]) -> None:
    """Post signed events in order; each must be applied (not stale, not a duplicate) before the next is sent."""
    for event in events:
        status, body = await webhooks.send(event)
        assert (status, body) == (200, {"status": "applied"}), (event["type"], event["timestamp"], status, body)


async def count_rows(db: Database, model: type[Base]) -> int:
    """How many rows a table holds, read straight from Postgres (for "nothing stored" assertions)."""
    async with db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


NOTHING_STORED = {"webhook_inbox": 0, "subscriptions": 0, "customers": 0}


async def stored_counts(db: Database) -> dict[str, int]:
    """Rows in the tables a delivery writes; a rejected delivery must leave `NOTHING_STORED`."""
    return {model.__tablename__: await count_rows(db, model) for model in (WebhookInbox, Subscription, Customer)}


async def inbox_statuses(db: Database) -> dict[str, str]:
    """webhook-id → inbox status for every stored delivery."""
    async with db.session() as session:
        rows = await session.execute(select(WebhookInbox.webhook_id, WebhookInbox.status))
        return dict(rows.all())


API_CALLS_ENTITLEMENT = "cent_7Dk2Mq8Wx5Lp3Zr9Tv1Nb"
STATUS_DETAILS_TRAILER = "grpc-status-details-bin"


def error_info(error: grpc.aio.AioRpcError) -> Any:
    """The google.rpc.ErrorInfo a failed call carries, decoded from its `grpc-status-details-bin` trailer."""
    for key, value in error.trailing_metadata() or ():
        if key != STATUS_DETAILS_TRAILER or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        assert status.code == error.code().value[0], (status.code, error.code())
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info
    raise AssertionError(f"{error.code().name} carries no ErrorInfo: {error.details()!r}")


def credit_ledger_event(
    event_type: str = "credit.added",
    *,
    entry_id: str,
    amount: str | int | float,
    is_credit: bool = True,
    customer_id: str = CUSTOMER_ID,
    entitlement: str = API_CALLS_ENTITLEMENT,
    at: datetime | None = None,
) -> dict[str, Any]:
    """A Dodo credit ledger webhook shaped like the `credit_added` fixture: one signed delta under its own entry id."""
    body = copy.deepcopy(load_event("credit_added"))
    body["type"] = event_type
    body["data"].update(
        id=entry_id,
        customer_id=customer_id,
        credit_entitlement_id=entitlement,
        transaction_type=event_type.replace(".", "_"),
        is_credit=is_credit,
        amount=amount,
    )
    if at is not None:
        body["timestamp"] = body["data"]["created_at"] = iso(at)
    return body


@dataclass(frozen=True)
class StoredAccount:
    """One credit account as Postgres holds it: the balance row, its grants and its ledger."""

    balance: Decimal
    grants_remaining: Decimal
    ledger_sum: Decimal
    ledger_rows: int


async def stored_account(db: Database, customer_id: str, credit: str) -> StoredAccount:
    async with db.session() as session:
        row = (
            await session.execute(
                text("SELECT balance, grants FROM credit_balances WHERE customer_id = :c AND credit = :k"),
                {"c": customer_id, "k": credit},
            )
        ).first()
        total, rows = (
            await session.execute(
                text(
                    "SELECT coalesce(sum(amount), 0), count(*) FROM credit_ledger"
                    " WHERE customer_id = :c AND credit = :k"
                ),
                {"c": customer_id, "k": credit},
            )
        ).one()
    balance, grants = (Decimal(0), []) if row is None else (row.balance, row.grants)
    exact = Context(prec=100)  # amounts reach 38 digits: the default 28-digit context would round the sum
    remaining = Decimal(0)
    for grant in grants:
        remaining = exact.add(remaining, Decimal(grant["remaining"]))
    return StoredAccount(balance, remaining, Decimal(total), int(rows))


LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
# Every table but the watch log's one-row head, which is reset instead (RESET_WATCH_HEAD).
TABLES = ", ".join(table.name for table in Base.metadata.sorted_tables if table.name != "watch_head")
# Time-driven events are emitted from clock_through on: far back, so a test's clock (any date) is after it.
RESET_WATCH_HEAD = "UPDATE watch_head SET position = 0, pruned_through = 0, clock_through = '2000-01-01T00:00:00Z'"


def make_settings(database_url: str, **overrides: str) -> Settings:
    env = {
        "DATABASE_URL": database_url,
        "DODO_PAYMENTS_WEBHOOK_KEY": WEBHOOK_SECRET,
        "ENTITLEMENTS_GRPC_ADDR": "127.0.0.1:0",
        "ENTITLEMENTS_HTTP_ADDR": "127.0.0.1:0",
        "ENTITLEMENTS_API_TOKENS": API_TOKEN,
        # The credit mirror's sender would POST consumptions of `api_calls` to the fake Dodo behind any test's back;
        # tests/app/test_credit_mirror.py drives it (and turns the process's own sender on where it means to).
        "ENTITLEMENTS_CREDIT_MIRROR_POLL_SECONDS": "0",
        **overrides,
    }
    return Settings.model_validate(env)


DODO_API_KEY = "test_dodo_key"


def _with_token(
    metadata: tuple[tuple[str, str], ...], details: grpc.aio.ClientCallDetails
) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*(tuple(details.metadata or ()) + metadata)),
        details.credentials,
        details.wait_for_ready,
    )


class BearerToken(grpc.aio.UnaryUnaryClientInterceptor):
    """Attach the test API token to every unary call, as a calling service would."""

    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(_with_token(self.metadata, client_call_details), request)


class BearerTokenStreams(grpc.aio.UnaryStreamClientInterceptor):
    """The same for server streams (grpc.aio takes one interceptor object per kind of call)."""

    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(_with_token(self.metadata, client_call_details), request)


def bearer(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that present `token` on unary calls and server streams alike."""
    return [BearerToken(token), BearerTokenStreams(token)]


_DATE_FIELDS = ("created_at", "previous_billing_date", "next_billing_date", "cancelled_at", "expires_at")


def in_current_period(event: dict[str, Any], *, now: datetime | None = None) -> dict[str, Any]:
    """A copy of a subscription fixture moved in time so that its period started a day ago: for processes that run
    on the wall clock (the fixtures' own dates are fixed and fall into the past)."""
    moved = copy.deepcopy(event)
    data = moved["data"]
    now = now or datetime.now(UTC)
    delta = now - timedelta(days=1) - utc(data["previous_billing_date"])
    for name in _DATE_FIELDS:
        if data.get(name):
            data[name] = iso(utc(data[name]) + delta)
    moved["timestamp"] = iso(now)
    return moved
