"""A fake Dodo Payments HTTP API for tests, driven through the real `dodopayments` SDK.

It speaks the real paths, request bodies, response shapes and error bodies (`{"code", "message"}`) of the
endpoints the service uses (DESIGN §8): subscriptions (read, change-plan and its preview, PATCH), checkout
sessions, customer-portal sessions, the product list, on-demand charges and the payment list, usage events, and
credit ledgers (ledger-entries POST, ledger list, balance read). It keeps its state
in plain dicts that tests read and edit,
records every request it receives, and can be told to fail in the ways production will: error statuses, hangs
longer than the client's timeout, added latency, "applied the change, then lost the answer", and "applied the
change, then answered the read-back with garbage".

Usage::

    async with start_fake_dodo() as (fake, base_url):
        sub = fake.add_subscription()
        client = AsyncDodoPayments(bearer_token="test_key", base_url=base_url)
        await client.subscriptions.retrieve(sub["subscription_id"])

Prices are deterministic: `products` maps a product id to its price in minor units, `addon_prices` does the
same for add-ons, and proration counts whole days left in the current period (see `FakeDodo.preview`).
`GET /products` lists `products` as monthly USD recurring prices unless `product_overrides` says otherwise.
"""

from __future__ import annotations

import asyncio
import copy
import fnmatch
import json
import math
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = [
    "ADDON_EXTRA_PROJECTS",
    "ADDON_EXTRA_SEAT",
    "PRODUCT_PRO",
    "PRODUCT_STARTER",
    "PRODUCT_TEAM",
    "FakeDodo",
    "RecordedRequest",
    "start_fake_dodo",
]

# The products of the example catalog (service/catalog.example.toml) and the webhook fixtures, so tests that
# mix webhooks, the catalog and this fake agree on ids.
PRODUCT_STARTER = "pdt_1Bz4Ns8StarterMth2Xk"
PRODUCT_PRO = "pdt_6Gx2Kq9LwPro0Mth4Rt1"
PRODUCT_TEAM = "pdt_3Rt8Yu1PaTeam0Mth7Wq"
ADDON_EXTRA_SEAT = "adn_2Qw7Er4SeatAdd0nX9Lp"
ADDON_EXTRA_PROJECTS = "adn_8Mn3Bv6ProjAdd0nK2Jh"

DEFAULT_PRODUCTS: dict[str, int] = {PRODUCT_STARTER: 900, PRODUCT_PRO: 2900, PRODUCT_TEAM: 9900}
DEFAULT_PRODUCT_NAMES: dict[str, str] = {PRODUCT_STARTER: "Starter", PRODUCT_PRO: "Pro", PRODUCT_TEAM: "Team"}
DEFAULT_ADDON_PRICES: dict[str, int] = {ADDON_EXTRA_SEAT: 500, ADDON_EXTRA_PROJECTS: 1500}
DEFAULT_ADDON_NAMES: dict[str, str] = {ADDON_EXTRA_SEAT: "Extra seat", ADDON_EXTRA_PROJECTS: "Extra projects"}

PRORATION_MODES = frozenset(
    {
        "prorated_immediately",
        "full_immediately",
        "difference_immediately",
        "do_not_bill",
        "prorated_immediately_keep_cycle",
    }
)
EFFECTIVE_AT = frozenset({"immediately", "next_billing_date"})
ON_PAYMENT_FAILURE = frozenset({"prevent_change", "apply_change"})
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})

_DEFAULT_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    409: "CONFLICT",
    422: "UNPROCESSABLE_ENTITY",
    429: "TOO_MANY_REQUESTS",
    500: "INTERNAL_SERVER_ERROR",
    502: "BAD_GATEWAY",
    503: "SERVICE_UNAVAILABLE",
    504: "GATEWAY_TIMEOUT",
}

_INTERVAL_DAYS = {"Day": 1, "Week": 7, "Month": 30, "Year": 365}
CANCEL_REASONS = frozenset(
    {
        "cancelled_by_customer",
        "cancelled_by_merchant",
        "cancelled_by_merchant_send_dunning",
        "cancelled_by_merchant_grace_period_expired",
        "dodo_team",
    }
)
# The PATCH fields the fake models; any other is a 422 so a test never passes on a field the fake ignored.
PATCH_FIELDS = frozenset(
    {
        "status",
        "cancel_at_next_billing_date",
        "cancel_reason",
        "cancellation_comment",
        "cancellation_feedback",
        "metadata",
        "customer_name",
        "pause",
    }
)
CHECKOUT_HOST = "https://test.checkout.dodopayments.com"
PORTAL_HOST = "https://test.customer.dodopayments.com"
MAX_CART_ITEMS = 20
MAX_DISCOUNT_CODES = 20
MAX_METADATA_KEYS = 50
MAX_PAGE_SIZE = 100
MAX_INGEST_EVENTS = 1000
CHARGE_FIELDS = frozenset(
    {
        "product_price",
        "product_currency",
        "product_description",
        "metadata",
        "adaptive_currency_fees_inclusive",
        "customer_balance_config",
    }
)
_JSON_BODY = web.RequestKey("json_body", object)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the fake received it, before auth or injected failures were applied."""

    method: str
    path: str
    json: Any
    """The parsed JSON body; None when there was no body, the raw text when it was not JSON."""
    headers: dict[str, str]
    """Header names lower-cased."""
    query: dict[str, str] = field(default_factory=dict)

    @property
    def retry_count(self) -> int:
        """The SDK numbers its attempts in `x-stainless-retry-count` (0 = first try)."""
        return int(self.headers.get("x-stainless-retry-count", "0"))


@dataclass(slots=True)
class _Failure:
    method: str | None
    pattern: str
    times: int
    status: int = 500
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    hang: float | None = None
    apply_first: bool = False

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        if not self.pattern:
            return True
        if any(ch in self.pattern for ch in "*?["):
            return fnmatch.fnmatchcase(path, self.pattern)
        return path.endswith(self.pattern)


class FakeDodoError(Exception):
    """Raised inside handlers; becomes a Dodo-shaped error response."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_dt(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status, headers=headers)


class FakeDodo:
    """State and behaviour of the fake Dodo API. Tests read and edit the public attributes directly.

    - `products`: product id → price per unit in minor units; a change-plan to a product not listed is a 422.
    - `addon_prices`: add-on id → price per unit in minor units; unknown add-ons are a 422.
    - `subscriptions`: subscription id → the Subscription JSON, exactly as `GET /subscriptions/{id}` sends it.
    - `customers`: Dodo customer ids known besides those of `subscriptions` (`known_customers()` is both); the
      portal and checkout 404 on any other.
    - `checkout_sessions`: session id → `{"session_id", "checkout_url", "created_at", "request"}` (the body).
    - `portal_sessions`: every portal session created, `{"customer_id", "link", "return_url", "send_email"}`.
    - `product_overrides`: product id → fields merged over its generated `GET /products` item (e.g. a
      `price_detail` of another type, or a `name`); `product_names` names them.
    - `ingested`: usage events taken by `POST /events/ingest`, by `event_id` (the first write wins; an id seen
      before is ignored, as Dodo does). `customer_id` must be one of `known_customers()`.
    - `requests`: every request received, in order, including unauthenticated and failed ones.
    - `latency`: seconds every request waits before being handled.
    - `hang_seconds`: how long `timeout_next` rules sleep; keep it above the client timeout.
    - `frozen_now`: the fake's clock; None means real time.
    - `handler_errors`: exceptions raised by the fake's own code (bugs); `start_fake_dodo` fails on them at exit.
    """

    def __init__(
        self,
        api_key: str = "test_key",
        *,
        products: dict[str, int] | None = None,
        addon_prices: dict[str, int] | None = None,
    ) -> None:
        self.api_key = api_key
        self.products: dict[str, int] = dict(DEFAULT_PRODUCTS if products is None else products)
        self.product_names: dict[str, str] = dict(DEFAULT_PRODUCT_NAMES)
        self.addon_prices: dict[str, int] = dict(DEFAULT_ADDON_PRICES if addon_prices is None else addon_prices)
        self.addon_names: dict[str, str] = dict(DEFAULT_ADDON_NAMES)
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.customers: set[str] = set()
        self.checkout_sessions: dict[str, dict[str, Any]] = {}
        self.portal_sessions: list[dict[str, Any]] = []
        self.ingested: dict[str, dict[str, Any]] = {}
        # On-demand charges: payment id -> the Payment JSON (GET /payments items and payment.* webhook data).
        self.payments: dict[str, dict[str, Any]] = {}
        self.product_overrides: dict[str, dict[str, Any]] = {}
        # Credit ledgers: (credit_entitlement_id, customer_id) -> the entries, oldest first (CreditLedgerEntry JSON),
        # the running balance and overage, and the idempotency keys of ledger-entries POSTs (key -> entry id).
        self.credit_ledgers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.credit_balances: dict[tuple[str, str], Decimal] = {}
        self.credit_overage: dict[tuple[str, str], Decimal] = {}
        self.overage_limits: dict[str, Decimal] = {}
        self.ledger_keys: dict[tuple[str, str, str], str] = {}
        # When set, a ledger-entries POST is applied at once but answered only once the event is set: the window in
        # which Dodo's webhook for the entry can reach the service before the POST's own answer does.
        self.ledger_answer_gate: asyncio.Event | None = None
        self.ledger_answer_held = asyncio.Event()
        """Set once a POST has been applied and is being held at `ledger_answer_gate`."""
        self.requests: list[RecordedRequest] = []
        self.latency: float = 0.0
        self.hang_seconds: float = 5.0
        self.frozen_now: datetime | None = None
        self.base_url: str = ""
        self.handler_errors: list[Exception] = []
        self._failures: list[_Failure] = []
        self._after_change: list[_Failure] = []

    # ------------------------------------------------------------------ clock and state helpers

    def now(self) -> datetime:
        return self.frozen_now if self.frozen_now is not None else datetime.now(UTC)

    def add_subscription(self, **overrides: Any) -> dict[str, Any]:
        """Store and return a realistic active subscription: a 30-day period with 20 whole days left.

        Any top-level field can be overridden. `recurring_pre_tax_amount` follows product, quantity and
        add-ons unless given. The product (and add-ons) must be priced in `products` / `addon_prices`.
        """
        now = self.now()
        product_id: str = overrides.get("product_id", PRODUCT_PRO)
        quantity: int = overrides.get("quantity", 1)
        addons: list[dict[str, Any]] = copy.deepcopy(overrides.get("addons", []))
        if product_id not in self.products:
            raise KeyError(f"product {product_id!r} has no price: add it to fake.products first")
        for addon in addons:
            if addon["addon_id"] not in self.addon_prices:
                raise KeyError(f"add-on {addon['addon_id']!r} has no price: add it to fake.addon_prices first")
        # Whole days plus a margin, so day-counted proration stays stable however long the test runs.
        period_start = now - timedelta(days=10, minutes=1)
        period_end = now + timedelta(days=20, minutes=1)
        sub: dict[str, Any] = {
            "subscription_id": _new_id("sub"),
            "status": "active",
            "product_id": product_id,
            "quantity": quantity,
            "customer": {
                "customer_id": _new_id("cus"),
                "email": "ada@example.com",
                "name": "Ada Lovelace",
                "phone_number": None,
                "metadata": {},
            },
            "billing": {
                "country": "US",
                "city": "Austin",
                "state": "TX",
                "street": "500 Congress Ave",
                "zipcode": "78701",
            },
            "brand_id": "brd_3Kp9Lw2Qx7Rt5Vb1Nm8Zc",
            "metadata": {},
            "currency": "USD",
            "recurring_pre_tax_amount": self._recurring_amount(product_id, quantity, addons),
            "tax_inclusive": False,
            "payment_frequency_count": 1,
            "payment_frequency_interval": "Month",
            "subscription_period_count": 10,
            "subscription_period_interval": "Year",
            "trial_period_days": 0,
            "trial_amount": None,
            "on_demand": False,
            "has_payment_method": True,
            "created_at": _iso(period_start),
            "previous_billing_date": _iso(period_start),
            "next_billing_date": _iso(period_end),
            "expires_at": _iso(period_start + timedelta(days=3650)),
            "cancel_at_next_billing_date": False,
            "cancelled_at": None,
            "cancelled_by": None,
            "cancellation_comment": None,
            "cancellation_feedback": None,
            "paused_at": None,
            "addons": addons,
            "meters": [],
            "credit_entitlement_cart": [],
            "meter_credit_entitlement_cart": [],
            "scheduled_change": None,
            "discounts": None,
            "discount_id": None,
            "discount_cycles_remaining": None,
            "custom_field_responses": None,
            "customer_business_name": None,
            "tax_id": None,
            "payment_method_id": _new_id("pm"),
            "past_due_ends_at": None,
            "payment_id": None,
        }
        sub.update(copy.deepcopy(overrides))
        sub["addons"] = addons
        self.subscriptions[sub["subscription_id"]] = sub
        return sub

    def set_subscription(self, subscription_id: str, **changes: Any) -> dict[str, Any]:
        """Edit a stored subscription in place (e.g. `status="on_hold"`) and return it."""
        sub = self.subscriptions[subscription_id]
        sub.update(copy.deepcopy(changes))
        return sub

    def apply_scheduled_change(self, subscription_id: str) -> dict[str, Any]:
        """Play the renewal that applies a `next_billing_date` change: new plan, next period, no schedule."""
        sub = self.subscriptions[subscription_id]
        scheduled = sub.get("scheduled_change")
        if scheduled is None:
            raise ValueError(f"{subscription_id} has no scheduled change")
        addons = [{"addon_id": a["addon_id"], "quantity": a["quantity"]} for a in scheduled["addons"]]
        start = _parse_dt(sub["next_billing_date"])
        days = _INTERVAL_DAYS.get(sub["payment_frequency_interval"], 30) * sub["payment_frequency_count"]
        sub.update(
            product_id=scheduled["product_id"],
            quantity=scheduled["quantity"],
            addons=addons,
            recurring_pre_tax_amount=self._recurring_amount(scheduled["product_id"], scheduled["quantity"], addons),
            previous_billing_date=_iso(start),
            next_billing_date=_iso(start + timedelta(days=days)),
            scheduled_change=None,
        )
        return sub

    def known_customers(self) -> set[str]:
        """`customers` and every subscription's customer."""
        return self.customers | {s["customer"]["customer_id"] for s in self.subscriptions.values()}

    def product_item(self, product_id: str) -> dict[str, Any]:
        """The `GET /products` list item for a product: a monthly recurring USD price unless overridden."""
        price = self.products[product_id]
        item: dict[str, Any] = {
            "business_id": "bus_7Hc2Jk9Lm4Np1Qr6St",
            "created_at": "2026-01-05T09:30:00Z",
            "entitlements": [],
            "is_recurring": True,
            "metadata": {},
            "product_id": product_id,
            "tax_category": "saas",
            "updated_at": "2026-01-05T09:30:00Z",
            "currency": "USD",
            "description": None,
            "image": None,
            "name": self.product_names.get(product_id),
            "price": price,
            "price_detail": {
                "type": "recurring_price",
                "currency": "USD",
                "price": price,
                "discount": 0,
                "payment_frequency_count": 1,
                "payment_frequency_interval": "Month",
                "subscription_period_count": 20,
                "subscription_period_interval": "Year",
                "purchasing_power_parity": False,
                "tax_inclusive": False,
                "trial_period_days": 0,
            },
            "pricing_mode": None,
            "tax_inclusive": False,
        }
        item.update(copy.deepcopy(self.product_overrides.get(product_id, {})))
        return item

    def complete_checkout(self, session_id: str, **overrides: Any) -> dict[str, Any]:
        """Play the buyer paying a checkout session: a subscription for its first product (quantity, add-ons,
        trial, metadata and customer from the session) is stored and returned. `overrides` as for
        `add_subscription`."""
        body = self.checkout_sessions[session_id]["request"]
        line = body["product_cart"][0]
        customer = body.get("customer") or {"email": "buyer@example.com"}
        customer_id = customer.get("customer_id") or _new_id("cus")
        self.customers.add(customer_id)
        fields: dict[str, Any] = {
            "product_id": line["product_id"],
            "quantity": line["quantity"],
            "addons": [{"addon_id": a["addon_id"], "quantity": a["quantity"]} for a in line.get("addons") or []],
            "metadata": dict(body.get("metadata") or {}),
            "customer": {
                "customer_id": customer_id,
                "email": customer.get("email", "ada@example.com"),
                "name": customer.get("name", "Ada Lovelace"),
                "phone_number": None,
                "metadata": {},
            },
            "trial_period_days": (body.get("subscription_data") or {}).get("trial_period_days") or 0,
        }
        fields.update(overrides)
        return self.add_subscription(**fields)

    def requests_matching(self, spec: str) -> list[RecordedRequest]:
        """Recorded requests matching a spec in the same syntax as `fail_next`."""
        probe = _parse_spec(spec, times=1)
        return [r for r in self.requests if probe.matches(r.method, r.path)]

    # ------------------------------------------------------------------ failure injection

    def fail_next(
        self,
        spec: str,
        status: int = 500,
        *,
        times: int = 1,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next `times` matching requests with `status` instead of handling them.

        `spec` is a path suffix (`"/change-plan"`), a glob over the whole path (`"/subscriptions/*"`), a
        method (`"GET"`), or a method and either of those (`"POST /change-plan/preview"`).

        `body` is a dict (sent as JSON), a str (sent as text, like a proxy's HTML page) or None (a Dodo-shaped
        body for the status). `headers` are added to the response (e.g. `{"retry-after-ms": "10"}`).
        """
        rule = _parse_spec(spec, times=times)
        rule.status, rule.body, rule.headers = status, body, dict(headers or {})
        self._failures.append(rule)

    def timeout_next(self, spec: str, *, times: int = 1, seconds: float | None = None) -> None:
        """Hang the next `times` matching requests for `seconds` (default `hang_seconds`), then answer 504."""
        rule = _parse_spec(spec, times=times)
        rule.status, rule.hang = 504, self.hang_seconds if seconds is None else seconds
        self._failures.append(rule)

    def apply_then_fail(
        self,
        spec: str = "POST /subscriptions/*/change-plan",
        status: int = 502,
        *,
        times: int = 1,
        timeout: bool = False,
        body: Any = None,
    ) -> None:
        """Handle the next matching requests for real (state changes stick), then lose the answer.

        The client sees `status` (or, with `timeout=True`, a hang longer than its timeout): the case where
        Dodo applied a plan change but we never heard back.
        """
        rule = _parse_spec(spec, times=times)
        rule.status, rule.body, rule.apply_first = status, body, True
        if timeout:
            rule.status, rule.hang = 504, self.hang_seconds
        self._failures.append(rule)

    def fail_after_change(
        self, spec: str = "GET /subscriptions/*", status: int = 200, *, times: int = 1, body: Any = None
    ) -> None:
        """Like `fail_next`, armed only once a change-plan or a PATCH has been applied: the read-back right after
        a change (by default, a 200 whose `body` is not a subscription) goes wrong, the reads before it do not."""
        rule = _parse_spec(spec, times=times)
        rule.status, rule.body = status, body
        self._after_change.append(rule)

    def clear_failures(self) -> None:
        self._failures.clear()
        self._after_change.clear()

    def _take_failure(self, method: str, path: str) -> _Failure | None:
        for rule in self._failures:
            if rule.matches(method, path):
                rule.times -= 1
                if rule.times <= 0:
                    self._failures.remove(rule)
                return rule
        return None

    async def _failure_response(self, rule: _Failure) -> web.StreamResponse:
        if rule.hang is not None:
            # The client is expected to give up first; if it does not, it gets what a gateway would send.
            await asyncio.sleep(rule.hang)
        if isinstance(rule.body, str):
            return web.Response(status=rule.status, text=rule.body, headers=rule.headers, content_type="text/html")
        if rule.body is not None:
            return web.json_response(rule.body, status=rule.status, headers=rule.headers)
        code = _DEFAULT_CODES.get(rule.status, "ERROR")
        return _error_response(rule.status, code, f"Injected failure: {code}", rule.headers)

    # ------------------------------------------------------------------ the aiohttp app

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/subscriptions/{subscription_id}", self._get_subscription)
        app.router.add_patch("/subscriptions/{subscription_id}", self._update_subscription)
        app.router.add_post("/subscriptions/{subscription_id}/change-plan", self._change_plan)
        app.router.add_post("/subscriptions/{subscription_id}/change-plan/preview", self._preview_change_plan)
        app.router.add_post("/checkouts", self._create_checkout)
        app.router.add_post("/customers/{customer_id}/customer-portal/session", self._create_portal_session)
        app.router.add_get("/products", self._list_products)
        app.router.add_post("/events/ingest", self._ingest_events)
        app.router.add_post("/subscriptions/{subscription_id}/charge", self._charge_subscription)
        app.router.add_get("/payments", self._list_payments)
        ledger = "/credit-entitlements/{credit_entitlement_id}/balances/{customer_id}"
        app.router.add_post(ledger + "/ledger-entries", self._create_ledger_entry)
        app.router.add_get(ledger + "/ledger", self._list_ledger)
        app.router.add_get(ledger, self._get_credit_balance)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await self._handle(request, handler)
        except Exception as exc:
            # A bug in the fake must fail the test, not pass as a Dodo 500 that the SDK quietly retries.
            self.handler_errors.append(exc)
            raise

    async def _handle(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = await request.read()
        body: Any = None
        body_ok = True
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body, body_ok = raw.decode("utf-8", "replace"), False
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                json=body,
                headers={k.lower(): v for k, v in request.headers.items()},
                query=dict(request.query),
            )
        )
        request[_JSON_BODY] = body
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        rule = self._take_failure(request.method, request.path)
        if rule is not None and not rule.apply_first:
            return await self._failure_response(rule)
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            response: web.StreamResponse = _error_response(
                401, "UNAUTHORIZED", "Authentication failed: the API key is missing or invalid"
            )
        elif not body_ok:
            response = _error_response(400, "INVALID_REQUEST_BODY", "The request body is not valid JSON")
        else:
            try:
                response = await handler(request)
            except FakeDodoError as exc:
                response = _error_response(exc.status, exc.code, exc.message)
            except web.HTTPException as exc:
                # Unknown routes and methods answer in Dodo's shape too, so the SDK maps them the same way.
                response = _error_response(exc.status, _DEFAULT_CODES.get(exc.status, "ERROR"), exc.reason)
        if rule is not None:
            return await self._failure_response(rule)
        return response

    def _subscription_or_404(self, request: web.Request) -> dict[str, Any]:
        subscription_id = request.match_info["subscription_id"]
        sub = self.subscriptions.get(subscription_id)
        if sub is None:
            raise FakeDodoError(404, "NOT_FOUND", f"Subscription {subscription_id} not found")
        return sub

    async def _get_subscription(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._subscription_or_404(request))

    async def _change_plan(self, request: web.Request) -> web.StreamResponse:
        sub = self._subscription_or_404(request)
        body = self._validate_change(sub, request[_JSON_BODY])
        # In place, so dicts a test got from add_subscription stay live views of the fake's state.
        changed = self._changed(sub, body)
        sub.clear()
        sub.update(changed)
        self._failures.extend(self._after_change)
        self._after_change.clear()
        return web.json_response({"client_secret": None, "expires_on": None, "payment_id": None, "payment_link": None})

    async def _preview_change_plan(self, request: web.Request) -> web.StreamResponse:
        sub = self._subscription_or_404(request)
        body = self._validate_change(sub, request[_JSON_BODY])
        return web.json_response(self.preview(sub, body))

    async def _update_subscription(self, request: web.Request) -> web.StreamResponse:
        sub = self._subscription_or_404(request)
        body = request[_JSON_BODY]
        if not isinstance(body, dict):
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "Expected a JSON object body")
        changed = self._patched(sub, body)
        sub.clear()
        sub.update(changed)
        self._failures.extend(self._after_change)
        self._after_change.clear()
        return web.json_response(sub)

    async def _create_checkout(self, request: web.Request) -> web.StreamResponse:
        body = self._validate_checkout(request[_JSON_BODY])
        session_id = _new_id("cks")
        checkout_url = f"{CHECKOUT_HOST}/session/{session_id}"
        self.checkout_sessions[session_id] = {
            "session_id": session_id,
            "checkout_url": checkout_url,
            "created_at": _iso(self.now()),
            "request": copy.deepcopy(body),
        }
        return web.json_response(
            {
                "session_id": session_id,
                "checkout_url": checkout_url,
                "client_secret": None,
                "payment_id": None,
                "publishable_key": None,
            }
        )

    async def _create_portal_session(self, request: web.Request) -> web.StreamResponse:
        customer_id = request.match_info["customer_id"]
        if request[_JSON_BODY] is not None:
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "This endpoint takes no body, only query parameters")
        send_email = request.query.get("send_email")
        if send_email not in (None, "true", "false"):
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "send_email must be true or false")
        if customer_id not in self.known_customers():
            raise FakeDodoError(404, "NOT_FOUND", f"Customer {customer_id} not found")
        link = f"{PORTAL_HOST}/session/{secrets.token_urlsafe(16)}"
        self.portal_sessions.append(
            {
                "customer_id": customer_id,
                "link": link,
                "return_url": request.query.get("return_url"),
                "send_email": send_email == "true",
            }
        )
        return web.json_response({"link": link})

    async def _list_products(self, request: web.Request) -> web.StreamResponse:
        try:
            page_number = int(request.query.get("page_number", "0"))
            page_size = int(request.query.get("page_size", "10"))
        except ValueError:
            raise FakeDodoError(422, "INVALID_QUERY", "page_number and page_size must be integers") from None
        if page_number < 0 or not 1 <= page_size <= MAX_PAGE_SIZE:
            raise FakeDodoError(422, "INVALID_QUERY", f"page_size must be 1 to {MAX_PAGE_SIZE}, page_number >= 0")
        ids = list(self.products)
        start = page_number * page_size
        return web.json_response({"items": [self.product_item(pid) for pid in ids[start : start + page_size]]})

    # ------------------------------------------------------------------ on-demand charges and payments

    async def _charge_subscription(self, request: web.Request) -> web.StreamResponse:
        """POST /subscriptions/{id}/charge: a payment in `processing`, its outcome later (`settle_payment`)."""
        sub = self._subscription_or_404(request)
        body = request[_JSON_BODY]
        if not isinstance(body, dict):
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "Expected a JSON object body")
        unknown = sorted(body.keys() - CHARGE_FIELDS)
        if unknown:
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", f"unknown charge fields {unknown}")
        price = body.get("product_price")
        if not isinstance(price, int) or isinstance(price, bool) or price <= 0:
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "product_price must be a positive integer")
        currency = body.get("product_currency")
        if currency is not None and not (isinstance(currency, str) and len(currency) == 3 and currency.isupper()):
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "product_currency must be an ISO 4217 code")
        description = body.get("product_description")
        if description is not None and not isinstance(description, str):
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "product_description must be a string")
        metadata = body.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
        ):
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "metadata must map strings to strings")
        if metadata is not None and len(metadata) > MAX_METADATA_KEYS:
            raise FakeDodoError(422, "MAXIMUM_KEYS_REACHED", f"metadata holds more than {MAX_METADATA_KEYS} keys")
        if sub["status"] != "active":
            raise FakeDodoError(422, "SUBSCRIPTION_INACTIVE", f"Subscription {sub['subscription_id']} is not active")
        payment_id = _new_id("pay")
        self.payments[payment_id] = {
            "payload_type": "Payment",
            "payment_id": payment_id,
            "business_id": "bus_0NmY7fQz4kR2sT8vW1xJa",
            "brand_id": sub.get("brand_id", ""),
            "status": "processing",
            "charge_type": "on_demand",
            "subscription_id": sub["subscription_id"],
            "subscription_ids": [sub["subscription_id"]],
            "customer": {
                key: sub["customer"].get(key) for key in ("customer_id", "email", "name", "phone_number", "metadata")
            },
            "metadata": copy.deepcopy(metadata if metadata is not None else sub.get("metadata") or {}),
            "total_amount": price,
            "currency": currency or sub.get("currency", "USD"),
            "product_description": description,
            "error_code": None,
            "error_message": None,
            "created_at": _iso(self.now()),
            "digital_products_delivered": False,
            "has_license_key": False,
            "includes_usage": False,
            "is_multi_subscription": False,
            "payment_provider": "stripe",
            "retry_attempt": 0,
            "service_periods": [],
        }
        return web.json_response({"payment_id": payment_id})

    async def _list_payments(self, request: web.Request) -> web.StreamResponse:
        try:
            page_number = int(request.query.get("page_number", "0"))
            page_size = int(request.query.get("page_size", "10"))
        except ValueError:
            raise FakeDodoError(422, "INVALID_QUERY", "page_number and page_size must be integers") from None
        if page_number < 0 or not 1 <= page_size <= MAX_PAGE_SIZE:
            raise FakeDodoError(422, "INVALID_QUERY", f"page_size must be 1 to {MAX_PAGE_SIZE}, page_number >= 0")
        gte = request.query.get("created_at_gte")
        since = _parse_dt(gte.replace("Z", "+00:00")) if gte else None
        subscription_id = request.query.get("subscription_id")
        matching = [
            payment
            for payment in self.payments.values()
            if (subscription_id is None or payment["subscription_id"] == subscription_id)
            and (since is None or _parse_dt(payment["created_at"].replace("Z", "+00:00")) >= since)
        ]
        # Newest first, as Dodo lists them.
        matching.sort(key=lambda payment: payment["created_at"], reverse=True)
        start = page_number * page_size
        return web.json_response({"items": [copy.deepcopy(p) for p in matching[start : start + page_size]]})

    def charges_of(self, subscription_id: str) -> list[dict[str, Any]]:
        """The payments the charge endpoint created for a subscription."""
        return [p for p in self.payments.values() if p["subscription_id"] == subscription_id]

    def settle_payment(
        self,
        payment_id: str,
        status: str = "succeeded",
        *,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> dict[str, Any]:
        """Give a payment its outcome (`succeeded`, `failed`, `cancelled`, `processing`) and return the webhook
        body Dodo would send for it (`payment.<status>`), for the test to sign and post."""
        payment = self.payments[payment_id]
        payment["status"] = status
        if status == "failed":
            payment["error_code"] = error_code or "CARD_DECLINED"
            payment["error_message"] = error_message or "Your card was declined."
        return {
            "business_id": payment["business_id"],
            "type": f"payment.{status}",
            "timestamp": _iso(self.now()),
            "data": copy.deepcopy(payment),
        }

    # ------------------------------------------------------------------ credit ledgers

    def credit_balance(self, credit_entitlement_id: str, customer_id: str) -> Decimal:
        return self.credit_balances.get((credit_entitlement_id, customer_id), Decimal(0))

    def ledger_of(self, credit_entitlement_id: str, customer_id: str) -> list[dict[str, Any]]:
        return self.credit_ledgers.get((credit_entitlement_id, customer_id), [])

    def add_ledger_entry(
        self,
        credit_entitlement_id: str,
        customer_id: str,
        amount: Decimal | str | int,
        *,
        is_credit: bool,
        transaction_type: str | None = None,
        description: str | None = None,
        reference_type: str | None = None,
    ) -> dict[str, Any]:
        """Record an entry as Dodo would (a grant, a dashboard adjustment, an API entry) and return it. Debits take
        the balance down (below zero into overage); the caller decides whether that was allowed."""
        key = (credit_entitlement_id, customer_id)
        value = Decimal(str(amount))
        before = self.credit_balance(*key)
        overage_before = self.credit_overage.get(key, Decimal(0))
        after = before + value if is_credit else before - value
        overage_after = max(-after, Decimal(0))
        self.credit_balances[key] = after
        self.credit_overage[key] = overage_after
        self.customers.add(customer_id)
        entry: dict[str, Any] = {
            "payload_type": "CreditLedgerEntry",
            "id": _new_id("cle"),
            "business_id": "bus_0NmY7fQz4kR2sT8vW1xJa",
            "brand_id": "brd_3Kp9Lw2Qx7Rt5Vb1Nm8Zc",
            "customer_id": customer_id,
            "credit_entitlement_id": credit_entitlement_id,
            "grant_id": _new_id("cgr") if is_credit else None,
            "transaction_type": transaction_type or ("credit_added" if is_credit else "credit_deducted"),
            "is_credit": is_credit,
            "amount": format(value, "f"),
            "balance_before": format(before, "f"),
            "balance_after": format(after, "f"),
            "overage_before": format(overage_before, "f"),
            "overage_after": format(overage_after, "f"),
            "description": description,
            "reference_type": reference_type,
            "reference_id": None,
            "metadata": {},
            "created_at": _iso(self.now()),
        }
        self.credit_ledgers.setdefault(key, []).append(entry)
        return entry

    def ledger_webhook(self, entry: dict[str, Any], event_type: str | None = None) -> dict[str, Any]:
        """The `credit.*` webhook body Dodo sends for a ledger entry (for an API debit, `credit.deducted`)."""
        return {
            "business_id": entry["business_id"],
            "type": event_type or f"credit.{entry['transaction_type'].removeprefix('credit_')}",
            "timestamp": entry["created_at"],
            "data": copy.deepcopy(entry),
        }

    def _ledger_key(self, request: web.Request) -> tuple[str, str]:
        return (request.match_info["credit_entitlement_id"], request.match_info["customer_id"])

    async def _create_ledger_entry(self, request: web.Request) -> web.StreamResponse:
        """POST .../ledger-entries: 409 on a repeated idempotency key (of the same balance), 400 on a debit beyond
        the balance plus `overage_limits[cent]`; 201 with the entry (BalanceCreateLedgerEntryResponse's shape)."""
        cent, customer_id = key = self._ledger_key(request)
        body = request[_JSON_BODY]
        if not isinstance(body, dict):
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "Expected a JSON object body")
        entry_type = body.get("entry_type")
        if entry_type not in ("credit", "debit"):
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "entry_type must be credit or debit")
        raw_amount = body.get("amount")
        try:
            amount = Decimal(raw_amount) if isinstance(raw_amount, str) else Decimal("nan")
        except ArithmeticError:
            amount = Decimal("nan")
        if not amount.is_finite() or amount <= 0:
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "amount must be a positive decimal string")
        idempotency_key = body.get("idempotency_key")
        if idempotency_key is not None and (cent, customer_id, idempotency_key) in self.ledger_keys:
            raise FakeDodoError(409, "CONFLICT", "Idempotency key already exists")
        if entry_type == "debit":
            headroom = self.credit_balance(*key) + self.overage_limits.get(cent, Decimal(0))
            if amount > headroom:
                raise FakeDodoError(400, "INSUFFICIENT_BALANCE", "Insufficient credit balance for debit")
        reason = body.get("reason")
        entry = self.add_ledger_entry(
            cent,
            customer_id,
            amount,
            is_credit=entry_type == "credit",
            transaction_type="credit_added" if entry_type == "credit" else "credit_deducted",
            description=reason if isinstance(reason, str) else None,
            reference_type="api",
        )
        if idempotency_key is not None:
            self.ledger_keys[(cent, customer_id, idempotency_key)] = entry["id"]
        answer = {
            name: entry[name]
            for name in (
                "id",
                "amount",
                "balance_before",
                "balance_after",
                "overage_before",
                "overage_after",
                "created_at",
                "credit_entitlement_id",
                "customer_id",
                "is_credit",
                "grant_id",
            )
        }
        answer.update(entry_type=entry_type, reason=reason, metadata=body.get("metadata") or {})
        if self.ledger_answer_gate is not None:
            self.ledger_answer_held.set()
            await self.ledger_answer_gate.wait()
        return web.json_response(answer, status=201)

    async def _list_ledger(self, request: web.Request) -> web.StreamResponse:
        try:
            page_number = int(request.query.get("page_number", "0"))
            page_size = int(request.query.get("page_size", "10"))
        except ValueError:
            raise FakeDodoError(422, "INVALID_QUERY", "page_number and page_size must be integers") from None
        if page_number < 0 or not 1 <= page_size <= MAX_PAGE_SIZE:
            raise FakeDodoError(422, "INVALID_QUERY", f"page_size must be 1 to {MAX_PAGE_SIZE}, page_number >= 0")
        start = request.query.get("start_date")
        since = _parse_dt(start.replace("Z", "+00:00")) if start else None
        wanted = request.query.get("transaction_type")
        matching = [
            entry
            for entry in self.ledger_of(*self._ledger_key(request))
            if (since is None or _parse_dt(entry["created_at"].replace("Z", "+00:00")) >= since)
            and (wanted is None or entry["transaction_type"] == wanted)
        ]
        matching.reverse()  # newest first
        first = page_number * page_size
        return web.json_response({"items": [copy.deepcopy(e) for e in matching[first : first + page_size]]})

    async def _get_credit_balance(self, request: web.Request) -> web.StreamResponse:
        key = self._ledger_key(request)
        entries = self.ledger_of(*key)
        if key not in self.credit_balances:
            raise FakeDodoError(404, "NOT_FOUND", f"No balance for customer {key[1]}")
        return web.json_response(
            {
                "id": f"ceb_{key[0]}_{key[1]}",
                "credit_entitlement_id": key[0],
                "customer_id": key[1],
                "balance": format(self.credit_balances[key], "f"),
                "overage": format(self.credit_overage.get(key, Decimal(0)), "f"),
                "created_at": entries[0]["created_at"] if entries else _iso(self.now()),
                "updated_at": entries[-1]["created_at"] if entries else _iso(self.now()),
                "last_transaction_at": entries[-1]["created_at"] if entries else None,
            }
        )

    async def _ingest_events(self, request: web.Request) -> web.StreamResponse:
        """Dodo's rules: 1–1000 events; one bad event (a duplicate id inside the request, a timestamp older than
        1 h or more than 5 min ahead, an unknown customer, a non-flat metadata) fails the whole request with 400;
        ids already ingested are ignored; `ingested_count` counts the new ones."""
        body = request[_JSON_BODY]
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not 1 <= len(events) <= MAX_INGEST_EVENTS:
            raise FakeDodoError(400, "INVALID_REQUEST_BODY", f"events must be a list of 1 to {MAX_INGEST_EVENTS}")
        now = self.now()
        seen: set[str] = set()
        known = self.known_customers()
        for index, event in enumerate(events):
            where = f"events[{index}]"
            if not isinstance(event, dict):
                raise FakeDodoError(400, "INVALID_REQUEST_BODY", f"{where} must be an object")
            for key in ("event_id", "customer_id", "event_name"):
                if not isinstance(event.get(key), str) or not event[key]:
                    raise FakeDodoError(400, "INVALID_REQUEST_BODY", f"{where}.{key} is required")
            if event["event_id"] in seen:
                raise FakeDodoError(400, "DUPLICATE_EVENT_ID", f"Duplicate event_id {event['event_id']} in request")
            seen.add(event["event_id"])
            if event["customer_id"] not in known:
                raise FakeDodoError(400, "CUSTOMER_NOT_FOUND", f"Customer {event['customer_id']} not found")
            stamp = event.get("timestamp")
            if stamp is not None:
                try:
                    at = _parse_dt(str(stamp).replace("Z", "+00:00"))
                except ValueError:
                    raise FakeDodoError(400, "INVALID_REQUEST_BODY", f"{where}.timestamp is not ISO 8601") from None
                if at.tzinfo is None or at < now - timedelta(hours=1) or at > now + timedelta(minutes=5):
                    raise FakeDodoError(
                        400, "INVALID_TIMESTAMP", f"{where}.timestamp is older than 1 hour or more than 5 minutes ahead"
                    )
            metadata = event.get("metadata") or {}
            if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_KEYS:
                raise FakeDodoError(400, "MAXIMUM_KEYS_REACHED", f"{where}.metadata: at most {MAX_METADATA_KEYS} keys")
            for key, value in metadata.items():
                if len(key) > 100 or not isinstance(value, str | int | float | bool) or len(str(value)) > 500:
                    raise FakeDodoError(400, "INVALID_REQUEST_BODY", f"{where}.metadata[{key!r}] is not allowed")
        count = 0
        for event in events:
            if event["event_id"] not in self.ingested:
                self.ingested[event["event_id"]] = copy.deepcopy(event)
                count += 1
        return web.json_response({"ingested_count": count})

    # ------------------------------------------------------------------ PATCH and checkout semantics

    def _patched(self, sub: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        """The subscription as it stands after this PATCH (a new dict), or a FakeDodoError as Dodo would answer."""
        unknown = sorted(body.keys() - PATCH_FIELDS)
        if unknown:
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", f"the fake does not model PATCH fields {unknown}")
        if "pause" in body:
            raise FakeDodoError(
                422, "INVALID_REQUEST_BODY", "`pause` is removed: send status paused to pause, active to resume"
            )
        status = body.get("status")
        if status in ("paused", "active") and len(body) > 1:
            raise FakeDodoError(
                422, "INVALID_REQUEST_BODY", f"status {status} must be sent alone, without other fields"
            )
        reason = body.get("cancel_reason")
        if reason is not None and reason not in CANCEL_REASONS:
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", f"unknown cancel_reason {reason!r}")
        new = copy.deepcopy(sub)
        now = _iso(self.now())
        api_key_actor = {"actor_type": "api_key", "email": None, "name": None}
        for name in ("cancellation_comment", "cancellation_feedback", "metadata"):
            if name in body:
                new[name] = copy.deepcopy(body[name])
        if "customer_name" in body:
            new["customer"]["name"] = body["customer_name"]
        if status == "cancelled":
            if sub["status"] in ("cancelled", "expired", "failed"):
                raise FakeDodoError(422, "INVALID_STATUS_TRANSITION", f"Subscription is already {sub['status']}")
            new.update(status="cancelled", cancelled_at=now, cancelled_by=api_key_actor, paused_at=None)
        elif status == "paused":
            if sub["status"] != "active":
                raise FakeDodoError(
                    422, "INVALID_STATUS_TRANSITION", f"Subscription is {sub['status']}: only active ones pause"
                )
            new.update(status="paused", paused_at=now)
        elif status == "active":
            unpaid_pause = sub["status"] == "on_hold" and sub.get("paused_at") is not None
            if sub["status"] != "paused" and not unpaid_pause:
                raise FakeDodoError(
                    422, "INVALID_STATUS_TRANSITION", f"Subscription is {sub['status']}: only paused ones resume"
                )
            new.update(status="active", paused_at=None)
        elif status is not None:
            raise FakeDodoError(422, "INVALID_STATUS_TRANSITION", f"status cannot be set to {status!r}")
        flag = body.get("cancel_at_next_billing_date")
        if flag is not None:
            if not isinstance(flag, bool):
                raise FakeDodoError(422, "INVALID_REQUEST_BODY", "cancel_at_next_billing_date must be a boolean")
            if status is None and sub["status"] not in ("active", "past_due", "on_hold"):
                raise FakeDodoError(
                    422, "INVALID_STATUS_TRANSITION", f"Subscription is {sub['status']}: nothing to cancel"
                )
            new["cancel_at_next_billing_date"] = flag
            if status is None:
                new["cancelled_by"] = api_key_actor if flag else None
        return new

    def _validate_checkout(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "Expected a JSON object body")
        cart = body.get("product_cart")
        if not isinstance(cart, list):
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "missing field `product_cart`")
        if not cart and not body.get("product_collection_id"):
            raise FakeDodoError(422, "PRODUCT_CART_EMTPY", "The product cart is empty")
        if len(cart) > MAX_CART_ITEMS:
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", f"product_cart holds at most {MAX_CART_ITEMS} items")
        for line in cart:
            if not isinstance(line, dict) or not {"product_id", "quantity"} <= line.keys():
                raise FakeDodoError(422, "INVALID_REQUEST_BODY", "product_cart[] needs product_id and quantity")
            quantity = line["quantity"]
            if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
                raise FakeDodoError(422, "INVALID_REQUEST_BODY", "quantity must be at least 1")
            if line["product_id"] not in self.products:
                raise FakeDodoError(422, "PRODUCT_NOT_FOUND", f"Product {line['product_id']} does not exist")
            addons = line.get("addons")
            if addons is not None:
                if not isinstance(addons, list):
                    raise FakeDodoError(422, "INVALID_REQUEST_BODY", "addons must be a list")
                for addon in addons:
                    if not isinstance(addon, dict) or not {"addon_id", "quantity"} <= addon.keys():
                        raise FakeDodoError(422, "INVALID_REQUEST_BODY", "addons[] needs addon_id and quantity")
                    if addon["addon_id"] not in self.addon_prices:
                        raise FakeDodoError(422, "ADDON_NOT_FOUND", f"Addon {addon['addon_id']} does not exist")
        customer = body.get("customer")
        if customer is not None:
            if not isinstance(customer, dict):
                raise FakeDodoError(422, "INVALID_REQUEST_BODY", "customer must be an object")
            if "customer_id" in customer:
                if customer["customer_id"] not in self.known_customers():
                    raise FakeDodoError(404, "NOT_FOUND", f"Customer {customer['customer_id']} not found")
            elif not isinstance(customer.get("email"), str) or not customer["email"]:
                raise FakeDodoError(422, "INVALID_REQUEST_BODY", "customer needs customer_id or email")
        if "discount_code" in body and "discount_codes" in body:
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "discount_code and discount_codes cannot be combined")
        codes = body.get("discount_codes")
        if codes is not None and (not isinstance(codes, list) or len(codes) > MAX_DISCOUNT_CODES):
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", f"discount_codes holds at most {MAX_DISCOUNT_CODES}")
        trial = (body.get("subscription_data") or {}).get("trial_period_days")
        if trial is not None and (not isinstance(trial, int) or isinstance(trial, bool) or not 0 <= trial <= 10000):
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "trial_period_days must be 0 to 10000")
        metadata = body.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise FakeDodoError(422, "INVALID_REQUEST_BODY", "metadata must be an object")
            if len(metadata) > MAX_METADATA_KEYS:
                raise FakeDodoError(422, "MAXIMUM_KEYS_REACHED", f"metadata holds at most {MAX_METADATA_KEYS} keys")
        return body

    # ------------------------------------------------------------------ change-plan semantics

    def _validate_change(self, sub: dict[str, Any], body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "Expected a JSON object body")
        for name in ("product_id", "quantity", "proration_billing_mode"):
            if name not in body:
                raise FakeDodoError(422, "INVALID_REQUEST_BODY", f"missing field `{name}`")
        quantity = body["quantity"]
        if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "quantity must be at least 1")
        if body["proration_billing_mode"] not in PRORATION_MODES:
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "unknown proration_billing_mode")
        if body.get("effective_at", "immediately") not in EFFECTIVE_AT:
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "unknown effective_at")
        if body.get("on_payment_failure") not in (None, *ON_PAYMENT_FAILURE):
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "unknown on_payment_failure")
        addons = body.get("addons") or []
        if not isinstance(addons, list):
            raise FakeDodoError(422, "INVALID_REQUEST_BODY", "addons must be a list")
        for addon in addons:
            if not isinstance(addon, dict) or not {"addon_id", "quantity"} <= addon.keys():
                raise FakeDodoError(422, "INVALID_REQUEST_BODY", "addons[] needs addon_id and quantity")
            if addon["addon_id"] not in self.addon_prices:
                raise FakeDodoError(422, "ADDON_NOT_FOUND", f"Addon {addon['addon_id']} does not exist")
        if body["product_id"] not in self.products:
            raise FakeDodoError(422, "PRODUCT_NOT_FOUND", f"Product {body['product_id']} does not exist")
        if sub["status"] != "active":
            raise FakeDodoError(
                422,
                "SUBSCRIPTION_NOT_ACTIVE",
                f"Subscription is {sub['status']}: only active subscriptions change",
            )
        if sub.get("scheduled_change") is not None and not body.get("cancel_scheduled_change_plan"):
            raise FakeDodoError(
                409,
                "PLAN_CHANGE_ALREADY_SCHEDULED",
                "A plan change is already scheduled for this subscription",
            )
        return body

    def _recurring_amount(self, product_id: str, quantity: int, addons: list[dict[str, Any]]) -> int:
        addon_total = sum(self.addon_prices[a["addon_id"]] * int(a["quantity"]) for a in addons)
        return self.products[product_id] * quantity + addon_total

    def _changed(self, sub: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        """The subscription as it stands right after this change-plan request (a new dict)."""
        new = copy.deepcopy(sub)
        # Dodo replaces the add-ons with the request's: an omitted or null `addons` removes them all.
        addons = [{"addon_id": a["addon_id"], "quantity": a["quantity"]} for a in body.get("addons") or []]
        if body.get("effective_at", "immediately") == "next_billing_date":
            new["scheduled_change"] = {
                "id": _new_id("spc"),
                "addons": [
                    {
                        "addon_id": a["addon_id"],
                        "name": self.addon_names.get(a["addon_id"], a["addon_id"]),
                        "quantity": a["quantity"],
                    }
                    for a in addons
                ],
                "created_at": _iso(self.now()),
                "effective_at": sub["next_billing_date"],
                "product_id": body["product_id"],
                "quantity": body["quantity"],
                "product_name": self.product_names.get(body["product_id"]),
                "product_description": None,
            }
            return new
        new.update(
            product_id=body["product_id"],
            quantity=body["quantity"],
            addons=addons,
            recurring_pre_tax_amount=self._recurring_amount(body["product_id"], body["quantity"], addons),
            scheduled_change=None,
        )
        return new

    def proration_factor(self, sub: dict[str, Any]) -> float:
        """Whole days left in the period over the period's length in days, clamped to [0, 1]."""
        start = _parse_dt(sub["previous_billing_date"])
        end = _parse_dt(sub["next_billing_date"])
        period_days = max(1, round((end - start) / timedelta(days=1)))
        left_days = max(0, math.floor((end - self.now()) / timedelta(days=1)))
        return min(1.0, left_days / period_days)

    def preview(self, sub: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        """Price a change without making it.

        next_billing_date and do_not_bill charge nothing now. full_immediately charges the new plan in full.
        difference_immediately charges new minus old. The prorated modes charge (new - old) x factor. A
        negative amount is charged as 0 and shows as credits added to the customer's balance (positive
        customer_credits).
        """
        new_plan = self._changed(sub, body)
        currency = sub["currency"]
        mode = body["proration_billing_mode"]
        addons = [{"addon_id": a["addon_id"], "quantity": a["quantity"]} for a in body.get("addons") or []]
        new_total = self._recurring_amount(body["product_id"], body["quantity"], addons)
        old_total = sub["recurring_pre_tax_amount"]
        immediately = body.get("effective_at", "immediately") == "immediately"
        if not immediately or mode == "do_not_bill":
            factor, net = 0.0, 0
        elif mode == "full_immediately":
            factor, net = 1.0, new_total
        elif mode == "difference_immediately":
            factor, net = 1.0, new_total - old_total
        else:
            factor = self.proration_factor(sub)
            net = round((new_total - old_total) * factor)
        total = max(0, net)
        line_items: list[dict[str, Any]] = [
            {
                "type": "subscription",
                "id": body["product_id"],
                "product_id": body["product_id"],
                "name": self.product_names.get(body["product_id"]),
                "description": None,
                "currency": currency,
                "proration_factor": factor,
                "quantity": body["quantity"],
                "unit_price": self.products[body["product_id"]],
                "tax_inclusive": False,
                "tax": 0,
                "tax_rate": 0.0,
            }
        ]
        line_items.extend(
            {
                "type": "addon",
                "id": a["addon_id"],
                "name": self.addon_names.get(a["addon_id"], a["addon_id"]),
                "description": None,
                "currency": currency,
                "proration_factor": factor,
                "quantity": a["quantity"],
                "unit_price": self.addon_prices[a["addon_id"]],
                "tax_category": "saas",
                "tax_inclusive": False,
                "tax": 0,
                "tax_rate": 0.0,
            }
            for a in addons
        )
        effective_at = self.now() if immediately else _parse_dt(sub["next_billing_date"])
        return {
            "immediate_charge": {
                "effective_at": _iso(effective_at),
                "line_items": line_items,
                "summary": {
                    "currency": currency,
                    "total_amount": total,
                    "tax": 0,
                    "customer_credits": max(0, -net),
                    "customer_credits_currency": currency,
                    "settlement_amount": total,
                    "settlement_currency": currency,
                    "settlement_tax": 0,
                },
            },
            "new_plan": new_plan,
        }


def _parse_spec(spec: str, *, times: int) -> _Failure:
    method: str | None = None
    pattern = spec.strip()
    head, _, rest = pattern.partition(" ")
    if head.upper() in HTTP_METHODS:
        method, pattern = head.upper(), rest.strip()
    if times < 1:
        raise ValueError("times must be at least 1")
    return _Failure(method=method, pattern=pattern, times=times)


@asynccontextmanager
async def start_fake_dodo(
    api_key: str = "test_key",
    *,
    products: dict[str, int] | None = None,
    addon_prices: dict[str, int] | None = None,
) -> AsyncIterator[tuple[FakeDodo, str]]:
    """Serve a FakeDodo on 127.0.0.1 (a free port) and yield it with its base URL."""
    fake = FakeDodo(api_key, products=products, addon_prices=addon_prices)
    # handler_cancellation: a hung handler stops when the client gives up, so shutdown never waits on it.
    runner = web.AppRunner(fake.app(), handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        fake.base_url = f"http://{host}:{port}"
        yield fake, fake.base_url
    finally:
        await runner.cleanup()
    if fake.handler_errors:
        raise AssertionError(f"the fake Dodo API itself failed: {fake.handler_errors!r}")
