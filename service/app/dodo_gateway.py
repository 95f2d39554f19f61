"""Outbound calls to the Dodo Payments API, through the official SDK.

Every failure leaves this module as a domain error that says what the caller can do: `DodoRefused` (Dodo
understood and said no: FAILED_PRECONDITION with Dodo's message), `SubscriptionNotFound` / `CustomerNotFound`
(a 404 for the id the call names), `DodoMisconfigured` (Dodo refused our key: INTERNAL, loud in the log),
`DodoNotConfigured` (no key is set; Dodo is not called) or `DodoUnavailable` (safe to retry; `outcome_unknown`
when the request may have taken effect). The SDK's own exception classes never leave this module, so ChangePlan,
reconciliation and every later Dodo call share one translation.

Answers are read from the raw JSON Dodo sent rather than the SDK's models, through the same exact reader as
webhooks (`loads`): fields newer than the pinned SDK survive in the stored payload, and a field we do not use
cannot fail a call. An answer that cannot be read is `DodoUnavailable`, never the caller's INVALID_ARGUMENT.

Mutations (change-plan, PATCH, checkout sessions, portal sessions) go through a client with the SDK's retries off:
none of these endpoints takes an idempotency key, so a resent POST makes a second session, sends a second e-mail
or applies a change twice. Reads go through the retrying client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, NoReturn, TypeVar, cast

import dodopayments
import httpx
from dodopayments.types.attach_addon_param import AttachAddonParam
from dodopayments.types.customer_request_param import CustomerRequestParam
from dodopayments.types.event_input_param import EventInputParam
from dodopayments.types.metadata_param import MetadataParam
from dodopayments.types.product_item_req_param import ProductItemReqParam

from service.app.metrics import Metrics
from service.domain import decimals
from service.domain.clock import Clock, utc_now
from service.domain.dodo_payloads import (
    DodoLedgerEntry,
    DodoSubscription,
    loads,
    parse_decimal,
    read_ledger_entry,
    read_subscription,
)
from service.domain.errors import (
    CustomerNotFound,
    DodoMisconfigured,
    DodoNotConfigured,
    DodoRefused,
    DodoUnavailable,
    MalformedPayload,
    NotFound,
    SubscriptionNotFound,
)
from service.domain.plan_change_rules import EffectiveAt, ProrationBillingMode
from service.domain.values import Addon, CheckoutCustomer, CheckoutItem, CheckoutSession, DodoProduct

log = logging.getLogger("entitlements.dodo")

_T = TypeVar("_T")

OnPaymentFailure = Literal["prevent_change", "apply_change"]
SubscriptionStatusChange = Literal["cancelled", "active", "paused"]
"""What PATCH /subscriptions/{id} may set `status` to: cancel now, resume (paused, or on_hold by an unpaid pause
invoice), pause. Dodo refuses `active` and `paused` combined with any other field (422)."""
CancelReason = Literal[
    "cancelled_by_customer",
    "cancelled_by_merchant",
    "cancelled_by_merchant_send_dunning",
    "cancelled_by_merchant_grace_period_expired",
    "dodo_team",
]
"""The `cancel_reason` values SDK 1.123 accepts on PATCH /subscriptions/{id}."""

CHECKOUT_SESSION_LIFETIME = timedelta(hours=24)
"""A checkout session (without `confirm`) lives 24 h at Dodo; we report the expiry from just before we asked, so
ours is never later than Dodo's."""
PORTAL_LINK_LIFETIME = timedelta(hours=24)
PRODUCTS_PAGE_SIZE = 100
"""Dodo's documented maximum page size for GET /products."""
PRODUCTS_MAX_PAGES = 50

# Failures raised before any byte of the request left this process: the request certainly had no effect.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True, slots=True)
class PlanChangePreview:
    immediate_charge: int
    """What Dodo would charge now, in minor units of `currency` (summary.total_amount)."""
    currency: str
    new_plan: DodoSubscription
    """The subscription as it would be after the change."""


PAYMENTS_PAGE_SIZE = 100
"""Dodo's documented maximum page size for GET /payments."""
PAYMENTS_MAX_PAGES = 20


LEDGER_PAGE_SIZE = 100
"""The SDK's documented maximum page size for the credit ledger list."""
LEDGER_MAX_PAGES = 20


@dataclass(frozen=True, slots=True)
class DodoCreditBalance:
    """GET /credit-entitlements/{cent}/balances/{customer_id}: the balance and the overage used."""

    balance: Decimal
    overage: Decimal


@dataclass(frozen=True, slots=True)
class DodoPayment:
    """The fields of one GET /payments item (the SDK's PaymentListResponse) that resolve a charge."""

    payment_id: str
    status: str
    """Dodo's IntentStatus (succeeded, failed, cancelled, processing, requires_*, ...); "" when absent."""
    metadata: dict[str, str]
    subscription_id: str
    total_amount: int | None
    currency: str
    error_code: str | None
    error_message: str | None


class DodoGateway:
    """Our only door to the Dodo API.

    `api_key=None` (or empty) builds a gateway whose every call raises `DodoNotConfigured`, so the service can
    start and serve access checks from stored state while plan changes report a clear configuration error.
    `base_url=None` uses the SDK's default (live mode). `timeout` bounds each HTTP attempt, in seconds.
    """

    def __init__(
        self,
        api_key: str | None,
        base_url: str | None = None,
        timeout: float = 10.0,
        *,
        read_max_retries: int = 2,
        metrics: Metrics | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self._timeout = timeout
        self.metrics = metrics
        self._clock = clock
        self._reader: dodopayments.AsyncDodoPayments | None = None
        self._writer: dodopayments.AsyncDodoPayments | None = None
        if not api_key:
            return
        # Everything is passed explicitly so the SDK never reads the process environment itself: settings are
        # the one source of configuration. An explicit environment with base_url=None makes the SDK use the
        # live URL without consulting DODO_PAYMENTS_BASE_URL (and without its "ambiguous URL" error when that
        # is set).
        client = dodopayments.AsyncDodoPayments(
            bearer_token=api_key,
            base_url=base_url or None,
            environment="live_mode",
            timeout=timeout,
            max_retries=read_max_retries,
        )
        self._reader = client
        # The SDK retries POSTs on timeouts, 409, 429 and 5xx without an idempotency key, so a retried
        # change-plan could apply twice. Writes go through a copy with retries off that shares the same
        # connection pool; the caller decides what to do about an unknown outcome.
        self._writer = client.with_options(max_retries=0)

    @property
    def configured(self) -> bool:
        """Whether an API key is set (without one every call raises DodoNotConfigured)."""
        return self._reader is not None

    async def close(self) -> None:
        # The writer shares the reader's HTTP client, so closing the reader closes both.
        if self._reader is not None:
            await self._reader.close()

    async def get_subscription(self, subscription_id: str) -> DodoSubscription:
        client = self._client(self._reader, "get_subscription")
        with self._translate("get_subscription", not_found=_no_subscription(subscription_id), **_sub(subscription_id)):
            raw = await client.subscriptions.with_raw_response.retrieve(subscription_id)
            data = await self._json(raw, "get_subscription", _sub(subscription_id))
        return _readable(data, "get_subscription", subscription_id, raw.status_code)

    async def change_plan(
        self,
        subscription_id: str,
        *,
        product_id: str,
        quantity: int,
        proration_billing_mode: ProrationBillingMode,
        effective_at: EffectiveAt,
        addons: Sequence[Addon],
        on_payment_failure: OnPaymentFailure | None = None,
    ) -> None:
        """Ask Dodo to change the plan, sent exactly once: after `DodoUnavailable` the outcome may be unknown.

        `addons` is the complete add-on list for the new plan: Dodo removes any add-on not listed.
        """
        client = self._client(self._writer, "change_plan")
        with self._translate("change_plan", not_found=_no_subscription(subscription_id), **_sub(subscription_id)):
            await client.subscriptions.change_plan(
                subscription_id,
                product_id=product_id,
                quantity=quantity,
                proration_billing_mode=proration_billing_mode,
                effective_at=effective_at,
                addons=_addon_params(addons),
                on_payment_failure=on_payment_failure if on_payment_failure is not None else dodopayments.omit,
            )

    async def preview_change_plan(
        self,
        subscription_id: str,
        *,
        product_id: str,
        quantity: int,
        proration_billing_mode: ProrationBillingMode,
        effective_at: EffectiveAt,
        addons: Sequence[Addon],
        on_payment_failure: OnPaymentFailure | None = None,
    ) -> PlanChangePreview:
        # A preview changes nothing, so the SDK's retries are harmless here: it uses the retrying client.
        client = self._client(self._reader, "preview_change_plan")
        with self._translate(
            "preview_change_plan", not_found=_no_subscription(subscription_id), **_sub(subscription_id)
        ):
            raw = await client.subscriptions.with_raw_response.preview_change_plan(
                subscription_id,
                product_id=product_id,
                quantity=quantity,
                proration_billing_mode=proration_billing_mode,
                effective_at=effective_at,
                addons=_addon_params(addons),
                on_payment_failure=on_payment_failure if on_payment_failure is not None else dodopayments.omit,
            )
            data = await self._json(raw, "preview_change_plan", _sub(subscription_id))
        preview = _read_preview(data, subscription_id, raw.status_code)
        if preview is None:
            log.warning(
                "dodo.unreadable", extra={"operation": "preview_change_plan", "subscription_id": subscription_id}
            )
            raise DodoUnavailable("Dodo returned an unreadable plan-change preview", status=raw.status_code)
        return preview

    async def update_subscription(
        self,
        subscription_id: str,
        *,
        cancel_at_next_billing_date: bool | None = None,
        status: SubscriptionStatusChange | None = None,
        cancel_reason: CancelReason | None = None,
        cancellation_comment: str | None = None,
    ) -> None:
        """PATCH the subscription, sending only the fields given, exactly once: after `DodoUnavailable` the
        outcome may be unknown, so read the subscription back before deciding anything.

        `cancel_at_next_billing_date=True` schedules the cancellation at period end (the subscription stays
        `active` until then), False withdraws it; `status="cancelled"` cancels now, `"paused"` pauses, `"active"`
        resumes. Dodo answers 422 (`DodoRefused`) to `paused`/`active` combined with any other field.
        """
        changes = (cancel_at_next_billing_date, status, cancel_reason, cancellation_comment)
        if all(change is None for change in changes):
            raise ValueError("update_subscription needs at least one field to change")
        client = self._client(self._writer, "update_subscription")
        facts = _sub(subscription_id)
        with self._translate("update_subscription", not_found=_no_subscription(subscription_id), **facts):
            # The raw response, never parsed: the 2xx status is the answer, and the caller reads the subscription
            # back through get_subscription, so a Subscription shape newer than the SDK cannot fail a change
            # that Dodo has already applied.
            await client.subscriptions.with_raw_response.update(
                subscription_id,
                cancel_at_next_billing_date=_given(cancel_at_next_billing_date),
                status=_given(status),
                cancel_reason=_given(cancel_reason),
                cancellation_comment=_given(cancellation_comment),
            )
        log.info(
            "dodo.subscription_updated",
            extra={
                "operation": "update_subscription",
                **facts,
                "new_status": status,
                "cancel_at_next_billing_date": cancel_at_next_billing_date,
            },
        )

    async def create_checkout(
        self,
        *,
        items: Sequence[CheckoutItem],
        customer: CheckoutCustomer,
        trial_period_days: int | None,
        return_url: str | None,
        cancel_url: str | None,
        discount_code: str | None,
        metadata: Mapping[str, str],
    ) -> CheckoutSession:
        """Create a Dodo checkout session (POST /checkouts), sent exactly once: a resent POST makes a second
        session, so after `DodoUnavailable` (outcome unknown) a session may exist that nobody will use.

        `customer` names an existing Dodo customer (`customer_id`) or a new one by `email` (and `name`); with
        neither, Dodo's checkout asks for them. `trial_period_days` overrides the product's trial only when
        given; `discount_code` is sent as Dodo's `discount_codes=[code]` (the singular field is deprecated).
        Empty URLs and codes count as not given.
        """
        client = self._client(self._writer, "create_checkout")
        facts = {"customer_id": customer.customer_id} if customer.customer_id else {}
        # A 404 names the only id in the request that Dodo looks up and we do not validate: the customer.
        not_found = _no_customer(customer.customer_id) if customer.customer_id else None
        requested_at = self._clock()
        dodo_metadata: MetadataParam = dict(metadata.items())
        with self._translate("create_checkout", not_found=not_found, **facts):
            raw = await client.checkout_sessions.with_raw_response.create(
                product_cart=[_cart_item(item) for item in items],
                customer=_customer_param(customer),
                subscription_data=(
                    {"trial_period_days": trial_period_days} if trial_period_days is not None else dodopayments.omit
                ),
                discount_codes=[discount_code] if discount_code else dodopayments.omit,
                return_url=return_url or dodopayments.omit,
                cancel_url=cancel_url or dodopayments.omit,
                metadata=dodo_metadata,
            )
            data = await self._json(raw, "create_checkout", facts)
        session_id = _text(data, "session_id")
        checkout_url = _text(data, "checkout_url")
        if session_id is None or checkout_url is None:
            log.warning("dodo.unreadable", extra={"operation": "create_checkout", **facts, "why": "no session"})
            # The session may well exist at Dodo: the outcome is unknown, as after a timeout.
            raise DodoUnavailable("Dodo returned an unreadable checkout session", status=raw.status_code)
        log.info("dodo.checkout_created", extra={"operation": "create_checkout", **facts, "session_id": session_id})
        return CheckoutSession(
            session_id=session_id,
            checkout_url=checkout_url,
            expires_at=requested_at + CHECKOUT_SESSION_LIFETIME,
        )

    async def create_portal_session(
        self, customer_id: str, *, return_url: str | None, send_email: bool
    ) -> tuple[str, datetime]:
        """A customer-portal link for a Dodo customer and when it expires (24 h after we asked).

        POST /customers/{id}/customer-portal/session with no body, `return_url` (when given) and `send_email` as
        query parameters; sent once, since `send_email=True` mails the customer each time. An unknown customer
        is `CustomerNotFound`.
        """
        client = self._client(self._writer, "create_portal_session")
        facts = {"customer_id": customer_id}
        requested_at = self._clock()
        with self._translate("create_portal_session", not_found=_no_customer(customer_id), **facts):
            raw = await client.customers.customer_portal.with_raw_response.create(
                customer_id, return_url=return_url or dodopayments.omit, send_email=send_email
            )
            data = await self._json(raw, "create_portal_session", facts)
        link = _text(data, "link")
        if link is None:
            log.warning("dodo.unreadable", extra={"operation": "create_portal_session", **facts, "why": "no link"})
            raise DodoUnavailable("Dodo returned an unreadable customer-portal session", status=raw.status_code)
        return link, requested_at + PORTAL_LINK_LIFETIME

    async def list_products(
        self, *, page_size: int = PRODUCTS_PAGE_SIZE, max_pages: int = PRODUCTS_MAX_PAGES
    ) -> list[DodoProduct]:
        """Every (unarchived) product's name and price, in Dodo's order, reading at most `max_pages` pages.

        Pages are numbered from 0 (Dodo's default) and asked for explicitly: the SDK's own paginator continues
        from page 2 after the first page, skipping page 1. A page shorter than `page_size` is the last. A
        product listed twice (a page that repeats) is kept once. A product whose price cannot be read (an
        unknown price type, a missing amount) is skipped with a warning; a page that cannot be read fails the
        whole list as `DodoUnavailable`, since what it held is unknown.
        """
        client = self._client(self._reader, "list_products")
        facts: dict[str, str] = {}
        products: dict[str, DodoProduct] = {}
        seen: set[str] = set()
        with self._translate("list_products"):
            for page_number in range(max_pages):
                raw = await client.products.with_raw_response.list(page_number=page_number, page_size=page_size)
                data = await self._json(raw, "list_products", facts, outcome_unknown=False)
                items = data.get("items") if isinstance(data, dict) else None
                if not isinstance(items, list):
                    log.warning(
                        "dodo.unreadable",
                        extra={"operation": "list_products", "page_number": page_number, "why": "no items list"},
                    )
                    raise DodoUnavailable(
                        "Dodo returned an unreadable product list", status=raw.status_code, outcome_unknown=False
                    )
                for item in items:
                    product, why = _read_product(item)
                    product_id = item.get("product_id") if isinstance(item, dict) else None
                    if isinstance(product_id, str):
                        if product_id in seen:
                            continue
                        seen.add(product_id)
                    if product is None:
                        log.warning(
                            "dodo.product_skipped",
                            extra={"operation": "list_products", "product_id": product_id, "why": why},
                        )
                        continue
                    products[product.product_id] = product
                if len(items) < page_size:
                    break
            else:
                log.warning(
                    "dodo.products_truncated",
                    extra={"operation": "list_products", "max_pages": max_pages, "page_size": page_size},
                )
        return list(products.values())

    async def charge_subscription(
        self, subscription_id: str, *, amount: int, currency: str, description: str, metadata: Mapping[str, str]
    ) -> str:
        """POST /subscriptions/{id}/charge, sent exactly once (the endpoint has no idempotency at all): after
        `DodoUnavailable` with `outcome_unknown` a payment may exist, found by our id in `metadata`. Dodo's
        payment_id. An unknown subscription is `SubscriptionNotFound`; any other refusal `DodoRefused` (code)."""
        client = self._client(self._writer, "charge_subscription")
        facts = _sub(subscription_id)
        dodo_metadata: MetadataParam = dict(metadata.items())
        with self._translate("charge_subscription", not_found=_no_subscription(subscription_id), **facts):
            raw = await client.subscriptions.with_raw_response.charge(
                subscription_id,
                product_price=amount,
                product_currency=cast(Any, currency) if currency else dodopayments.omit,
                product_description=description or dodopayments.omit,
                metadata=dodo_metadata,
            )
            data = await self._json(raw, "charge_subscription", facts)
        payment_id = _text(data, "payment_id")
        if payment_id is None:
            log.warning("dodo.unreadable", extra={"operation": "charge_subscription", **facts, "why": "no payment"})
            raise DodoUnavailable("Dodo returned an unreadable charge answer", status=raw.status_code)
        log.info("dodo.charge_created", extra={"operation": "charge_subscription", **facts, "payment_id": payment_id})
        return payment_id

    async def list_payments(
        self, subscription_id: str, created_after: datetime | None = None, *, max_pages: int = PAYMENTS_MAX_PAGES
    ) -> list[DodoPayment]:
        """The subscription's payments (GET /payments?subscription_id=&created_at_gte=), every page up to
        `max_pages`, through the retrying reader. An unreadable page fails the whole list (`DodoUnavailable`):
        what it held is unknown, and a charge must never be resent on a partial list."""
        client = self._client(self._reader, "list_payments")
        facts = _sub(subscription_id)
        payments: dict[str, DodoPayment] = {}
        with self._translate("list_payments", not_found=None, **facts):
            for page_number in range(max_pages):
                raw = await client.payments.with_raw_response.list(
                    subscription_id=subscription_id,
                    created_at_gte=created_after if created_after is not None else dodopayments.omit,
                    page_number=page_number,
                    page_size=PAYMENTS_PAGE_SIZE,
                )
                data = await self._json(raw, "list_payments", facts, outcome_unknown=False)
                items = data.get("items") if isinstance(data, dict) else None
                if not isinstance(items, list):
                    log.warning("dodo.unreadable", extra={"operation": "list_payments", **facts, "why": "no items"})
                    raise DodoUnavailable(
                        "Dodo returned an unreadable payment list", status=raw.status_code, outcome_unknown=False
                    )
                for item in items:
                    payment = _read_payment(item)
                    if payment is None:
                        raise DodoUnavailable(
                            "Dodo returned an unreadable payment", status=raw.status_code, outcome_unknown=False
                        )
                    payments.setdefault(payment.payment_id, payment)
                if len(items) < PAYMENTS_PAGE_SIZE:
                    return list(payments.values())
        raise DodoUnavailable("too many payments to search", outcome_unknown=False)

    async def ingest_events(self, events: Sequence[EventInputParam]) -> int:
        """POST /events/ingest (1–1000 events, ids distinct), sent once: the usage sender retries by itself, and
        Dodo ignores an `event_id` it has already ingested, so a resend after a lost answer changes nothing.
        Dodo's `ingested_count` (how many it took; whether ids it ignored count is unverified)."""
        client = self._client(self._writer, "ingest_events")
        facts = {"events": str(len(events))}
        with self._translate("ingest_events", events=facts["events"]):
            raw = await client.usage_events.with_raw_response.ingest(events=events)
            data = await self._json(raw, "ingest_events", facts)
        count = _whole(data.get("ingested_count") if isinstance(data, dict) else None)
        if count is None:
            log.warning("dodo.unreadable", extra={"operation": "ingest_events", **facts, "why": "no ingested_count"})
            raise DodoUnavailable("Dodo returned an unreadable ingest answer", status=raw.status_code)
        return count

    async def create_ledger_debit(
        self, credit_entitlement_id: str, customer_id: str, *, amount: Decimal, idempotency_key: str, reason: str
    ) -> DodoLedgerEntry:
        """POST /credit-entitlements/{cent}/balances/{customer_id}/ledger-entries with `entry_type: debit`, sent
        once (retries off: the caller resends with the same `idempotency_key`). The created entry, read like a
        webhook's `data` (its `entry_id` is what the `credit.*` echo carries). A repeated key is `DodoRefused`
        409, insufficient balance `DodoRefused` 400; 5xx and timeouts `DodoUnavailable`."""
        client = self._client(self._writer, "create_ledger_debit")
        facts = {"customer_id": customer_id, "credit_entitlement_id": credit_entitlement_id}
        with self._translate("create_ledger_debit", not_found=None, **facts, idempotency_key=idempotency_key):
            raw = await client.credit_entitlements.balances.with_raw_response.create_ledger_entry(
                customer_id,
                credit_entitlement_id=credit_entitlement_id,
                amount=decimals.decimal_text(amount),
                entry_type="debit",
                idempotency_key=idempotency_key,
                reason=reason,
            )
            data = await self._json(raw, "create_ledger_debit", facts)
        try:
            if not isinstance(data, dict):
                raise MalformedPayload("not a JSON object")
            return read_ledger_entry(data)
        except MalformedPayload as error:
            log.warning("dodo.unreadable", extra={"operation": "create_ledger_debit", **facts, "why": error.message})
            raise DodoUnavailable("Dodo returned an unreadable ledger entry", status=raw.status_code) from None

    async def list_ledger(
        self,
        credit_entitlement_id: str,
        customer_id: str,
        *,
        start: datetime | None = None,
        max_pages: int = LEDGER_MAX_PAGES,
    ) -> list[DodoLedgerEntry]:
        """GET /credit-entitlements/{cent}/balances/{customer_id}/ledger (every page from `start` on, up to
        `max_pages`), through the retrying reader. An unreadable page fails the whole list."""
        client = self._client(self._reader, "list_ledger")
        facts = {"customer_id": customer_id, "credit_entitlement_id": credit_entitlement_id}
        entries: dict[str, DodoLedgerEntry] = {}
        with self._translate("list_ledger", not_found=None, **facts):
            for page_number in range(max_pages):
                raw = await client.credit_entitlements.balances.with_raw_response.list_ledger(
                    customer_id,
                    credit_entitlement_id=credit_entitlement_id,
                    start_date=start if start is not None else dodopayments.omit,
                    page_number=page_number,
                    page_size=LEDGER_PAGE_SIZE,
                )
                data = await self._json(raw, "list_ledger", facts, outcome_unknown=False)
                items = data.get("items") if isinstance(data, dict) else None
                try:
                    if not isinstance(items, list):
                        raise MalformedPayload("no items")
                    for item in items:
                        if not isinstance(item, dict):
                            raise MalformedPayload("an item is not an object")
                        entry = read_ledger_entry(item)
                        entries.setdefault(entry.entry_id, entry)
                except MalformedPayload as error:
                    log.warning("dodo.unreadable", extra={"operation": "list_ledger", **facts, "why": error.message})
                    raise DodoUnavailable(
                        "Dodo returned an unreadable ledger", status=raw.status_code, outcome_unknown=False
                    ) from None
                if len(items) < LEDGER_PAGE_SIZE:
                    return list(entries.values())
        raise DodoUnavailable("too many ledger entries to search", outcome_unknown=False)

    async def get_credit_balance(self, credit_entitlement_id: str, customer_id: str) -> DodoCreditBalance:
        """GET /credit-entitlements/{cent}/balances/{customer_id}, through the retrying reader."""
        client = self._client(self._reader, "get_credit_balance")
        facts = {"customer_id": customer_id, "credit_entitlement_id": credit_entitlement_id}
        with self._translate("get_credit_balance", not_found=_no_customer(customer_id), **facts):
            raw = await client.credit_entitlements.balances.with_raw_response.retrieve(
                customer_id, credit_entitlement_id=credit_entitlement_id
            )
            data = await self._json(raw, "get_credit_balance", facts, outcome_unknown=False)
        try:
            if not isinstance(data, dict):
                raise MalformedPayload("not a JSON object")
            balance = parse_decimal(data.get("balance"), "balance", signed=True)
            overage = data.get("overage")
            return DodoCreditBalance(
                balance=balance,
                overage=decimals.ZERO if overage is None else parse_decimal(overage, "overage", signed=True),
            )
        except MalformedPayload as error:
            log.warning("dodo.unreadable", extra={"operation": "get_credit_balance", **facts, "why": error.message})
            raise DodoUnavailable(
                "Dodo returned an unreadable balance", status=raw.status_code, outcome_unknown=False
            ) from None

    async def _json(
        self, raw: Any, operation: str, facts: Mapping[str, str], *, outcome_unknown: bool = True
    ) -> object:
        """Dodo's answer read like a webhook body: exact decimals, bounded nesting, nothing Postgres refuses.

        `outcome_unknown=False` for reads: an unreadable answer to a read changed nothing."""
        try:
            return loads(await raw.text())
        except MalformedPayload as error:
            log.warning("dodo.unreadable", extra={"operation": operation, **facts, "why": error.message})
            raise DodoUnavailable(
                "Dodo answered with a body that is not readable JSON", outcome_unknown=outcome_unknown
            ) from None

    def _client(self, client: dodopayments.AsyncDodoPayments | None, operation: str) -> dodopayments.AsyncDodoPayments:
        if client is None:
            log.error("dodo.not_configured", extra={"operation": operation, "fix": "set DODO_PAYMENTS_API_KEY"})
            raise DodoNotConfigured()
        return client

    @contextmanager
    def _translate(
        self, operation: str, *, not_found: Callable[[], NotFound] | None = None, **subject: str
    ) -> Iterator[None]:
        """Turn the SDK's exceptions into domain errors, logging what an operator needs (never the API key), and
        count the call under `operation` in the metrics.

        `subject` names what the call is about (`subscription_id=...`, `customer_id=...`) in every log line;
        `not_found` builds the error for a 404 (without one, a 404 is Dodo refusing the request).
        """
        facts = {"operation": operation, **subject}
        started = time.perf_counter()
        status = "ok"
        try:
            yield
        except dodopayments.APITimeoutError as exc:
            status = "timeout"
            sent = not isinstance(exc.__cause__, _NOT_SENT)
            log.warning("dodo.timeout", extra={**facts, "timeout_s": self._timeout, "maybe_applied": sent})
            raise DodoUnavailable(f"Dodo did not answer within {self._timeout}s", outcome_unknown=sent) from exc
        except dodopayments.APIConnectionError as exc:
            status = "unreachable"
            sent = not isinstance(exc.__cause__, _NOT_SENT)
            log.warning("dodo.unreachable", extra={**facts, "why": type(exc.__cause__).__name__, "maybe_applied": sent})
            raise DodoUnavailable("Dodo could not be reached", outcome_unknown=sent) from exc
        except dodopayments.APIStatusError as exc:
            status = str(exc.status_code)
            _raise_for_status(exc, facts, not_found)
        finally:
            if self.metrics is not None:
                self.metrics.dodo_requests.labels(operation, status).inc()
                self.metrics.dodo_duration.labels(operation).observe(time.perf_counter() - started)


def _sub(subscription_id: str) -> dict[str, str]:
    return {"subscription_id": subscription_id}


def _no_subscription(subscription_id: str) -> Callable[[], NotFound]:
    return lambda: SubscriptionNotFound(subscription_id, at_dodo=True)


def _no_customer(customer_id: str) -> Callable[[], NotFound]:
    return lambda: CustomerNotFound(customer_id, at_dodo=True)


def _given(value: _T | None) -> _T | dodopayments.Omit:
    """None as "not sent": the SDK leaves an omitted field out of the body, while None would send null."""
    return dodopayments.omit if value is None else value


def _readable(data: object, operation: str, subscription_id: str, status: int) -> DodoSubscription:
    """Dodo's subscription JSON through the webhook reader; unreadable means Dodo (or a proxy) misbehaved."""
    try:
        if not isinstance(data, dict):
            raise MalformedPayload("not a JSON object")
        return read_subscription(data)
    except MalformedPayload as error:
        log.warning(
            "dodo.unreadable", extra={"operation": operation, "subscription_id": subscription_id, "why": error.message}
        )
        raise DodoUnavailable("Dodo returned an unreadable subscription", status=status) from None


def _raise_for_status(
    exc: dodopayments.APIStatusError, facts: dict[str, str], not_found: Callable[[], NotFound] | None
) -> NoReturn:
    status = exc.status_code
    code, message = _error_details(exc)
    if status in (401, 403):
        # Loud on purpose: every call fails until someone fixes the key, and nothing else will tell them.
        log.error(
            "dodo.credentials_refused",
            extra={
                **facts,
                "status": status,
                "dodo_message": message,
                "fix": "check DODO_PAYMENTS_API_KEY and its mode (test keys only work against test.dodopayments.com)",
            },
        )
        raise DodoMisconfigured(f"Dodo refused the API key (HTTP {status})", status=status) from exc
    if status == 404 and not_found is not None:
        log.info("dodo.not_found", extra={**facts, "status": status, "dodo_message": message})
        raise not_found() from exc
    if status in (408, 429) or status >= 500:
        # 429 was refused before any work, so it certainly did not apply.
        log.warning("dodo.failed", extra={**facts, "status": status, "dodo_message": message})
        raise DodoUnavailable(f"Dodo answered HTTP {status}", status=status, outcome_unknown=status != 429) from exc
    log.info("dodo.refused", extra={**facts, "status": status, "code": code, "dodo_message": message})
    raise DodoRefused(message, status=status, code=code) from exc


def _error_details(exc: dodopayments.APIStatusError) -> tuple[str | None, str]:
    """Dodo's `{"code", "message"}` error body, tolerating proxies that answer with HTML or nothing."""
    body = exc.body
    if isinstance(body, dict):
        code = body.get("code")
        message = body.get("message")
        return (
            code if isinstance(code, str) else None,
            message if isinstance(message, str) else "",
        )
    return None, ""


def _addon_params(addons: Sequence[Addon]) -> list[AttachAddonParam]:
    # Always sent, even empty: omitting `addons` also removes them, and an explicit list makes the intent
    # visible in request logs.
    return [{"addon_id": a.addon_id, "quantity": a.quantity} for a in addons]


def _read_preview(data: object, subscription_id: str, status: int) -> PlanChangePreview | None:
    # Read only the fields we use instead of validating the whole SDK model, so a new line-item type or enum
    # value on Dodo's side does not break previews.
    if not isinstance(data, dict):
        return None
    charge = data.get("immediate_charge")
    new_plan = data.get("new_plan")
    summary = charge.get("summary") if isinstance(charge, dict) else None
    if not isinstance(summary, dict) or not isinstance(new_plan, dict):
        return None
    total = summary.get("total_amount")
    currency = summary.get("currency")
    if not isinstance(total, int) or isinstance(total, bool) or not isinstance(currency, str):
        return None
    return PlanChangePreview(
        immediate_charge=total,
        currency=currency,
        new_plan=_readable(new_plan, "preview_change_plan", subscription_id, status),
    )


def _cart_item(item: CheckoutItem) -> ProductItemReqParam:
    line: ProductItemReqParam = {"product_id": item.product_id, "quantity": item.quantity}
    # Only when there are some: Dodo accepts add-ons on subscription products only, and a one-time product in
    # the cart must not carry even an empty list.
    if item.addons:
        line["addons"] = _addon_params(item.addons)
    return line


def _customer_param(customer: CheckoutCustomer) -> CustomerRequestParam | dodopayments.Omit:
    if customer.customer_id:
        return {"customer_id": customer.customer_id}
    if customer.email:
        if customer.name:
            return {"email": customer.email, "name": customer.name}
        return {"email": customer.email}
    # Nobody named: Dodo's checkout page asks the buyer.
    return dodopayments.omit


def _text(data: object, key: str) -> str | None:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


def _whole(value: object) -> int | None:
    """A JSON integer (never a bool, and never a decimal such as 29.0: amounts are minor units)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# Where each price type keeps its amount; any other type is skipped, so a new one on Dodo's side only hides that
# product's price.
_PRICE_AMOUNT = {"recurring_price": "price", "usage_based_price": "fixed_price", "one_time_price": "price"}


def _read_product(item: object) -> tuple[DodoProduct | None, str]:
    """A product list item's id, name and price (its `price_detail`), or None and why it cannot be read."""
    if not isinstance(item, dict):
        return None, "not a JSON object"
    product_id = item.get("product_id")
    if not isinstance(product_id, str) or not product_id:
        return None, "no product_id"
    detail = item.get("price_detail")
    if not isinstance(detail, dict):
        return None, "no price_detail"
    kind = detail.get("type")
    amount_key = _PRICE_AMOUNT.get(kind) if isinstance(kind, str) else None
    if amount_key is None:
        return None, f"price type {kind!r} unknown"
    amount = _whole(detail.get(amount_key))
    currency = detail.get("currency")
    if amount is None or amount < 0 or not isinstance(currency, str) or not currency:
        return None, f"{kind} without a readable {amount_key} and currency"
    count, interval = 0, ""
    if kind != "one_time_price":
        raw_count = _whole(detail.get("payment_frequency_count"))
        raw_interval = detail.get("payment_frequency_interval")
        if raw_count is None or raw_count < 1 or not isinstance(raw_interval, str) or not raw_interval:
            return None, f"{kind} without a readable payment frequency"
        count, interval = raw_count, raw_interval
    name = item.get("name")
    return (
        DodoProduct(
            product_id=product_id,
            name=name if isinstance(name, str) else "",
            price=amount,
            currency=currency,
            payment_frequency_count=count,
            payment_frequency_interval=interval,
        ),
        "",
    )


def _read_payment(item: object) -> DodoPayment | None:
    if not isinstance(item, dict):
        return None
    payment_id = _text(item, "payment_id")
    if payment_id is None:
        return None
    raw_metadata = item.get("metadata")
    metadata = (
        {str(k): v for k, v in raw_metadata.items() if isinstance(v, str)} if isinstance(raw_metadata, dict) else {}
    )
    return DodoPayment(
        payment_id=payment_id,
        status=_text(item, "status") or "",
        metadata=metadata,
        subscription_id=_text(item, "subscription_id") or "",
        total_amount=_whole(item.get("total_amount")),
        currency=_text(item, "currency") or "",
        error_code=_text(item, "error_code"),
        error_message=_text(item, "error_message"),
    )
