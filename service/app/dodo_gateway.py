"""Outbound calls to the Dodo Payments API, through the official SDK.

Every failure leaves this module as a domain error that says what the caller can do: `DodoRefused` (Dodo
understood and said no: FAILED_PRECONDITION with Dodo's message), `SubscriptionNotFound`, `DodoMisconfigured`
(our key is wrong or missing: INTERNAL, loud in the log) or `DodoUnavailable` (safe to retry; `outcome_unknown`
when the request may have taken effect). The SDK's own exception classes never leave this module, so ChangePlan,
reconciliation and every later Dodo call share one translation.

Subscriptions are read from the raw JSON Dodo sent rather than the SDK's model, through the same reader as
webhooks: fields newer than the pinned SDK survive in the stored payload. An answer that cannot be read is
`DodoUnavailable`, never the caller's INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import dodopayments
import httpx
from dodopayments.types.attach_addon_param import AttachAddonParam

from service.domain.dodo_payloads import DodoSubscription, loads, read_subscription
from service.domain.errors import (
    DodoMisconfigured,
    DodoRefused,
    DodoUnavailable,
    MalformedPayload,
    SubscriptionNotFound,
)
from service.domain.plan_change_rules import EffectiveAt, ProrationBillingMode
from service.domain.values import Addon

log = logging.getLogger("entitlements.dodo")

OnPaymentFailure = Literal["prevent_change", "apply_change"]

# Failures raised before any byte of the request left this process: the request certainly had no effect.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True, slots=True)
class PlanChangePreview:
    immediate_charge: int
    """What Dodo would charge now, in minor units of `currency` (summary.total_amount)."""
    currency: str
    new_plan: DodoSubscription
    """The subscription as it would be after the change."""


class DodoGateway:
    """Our only door to the Dodo API.

    `api_key=None` (or empty) builds a gateway whose every call raises `DodoMisconfigured`, so the service can
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
    ) -> None:
        self._timeout = timeout
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

    async def close(self) -> None:
        # The writer shares the reader's HTTP client, so closing the reader closes both.
        if self._reader is not None:
            await self._reader.close()

    async def get_subscription(self, subscription_id: str) -> DodoSubscription:
        client = self._client(self._reader, "get_subscription")
        with self._translate("get_subscription", subscription_id):
            raw = await client.subscriptions.with_raw_response.retrieve(subscription_id)
            data = await self._json(raw, operation="get_subscription", subscription_id=subscription_id)
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
        with self._translate("change_plan", subscription_id):
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
        with self._translate("preview_change_plan", subscription_id):
            raw = await client.subscriptions.with_raw_response.preview_change_plan(
                subscription_id,
                product_id=product_id,
                quantity=quantity,
                proration_billing_mode=proration_billing_mode,
                effective_at=effective_at,
                addons=_addon_params(addons),
                on_payment_failure=on_payment_failure if on_payment_failure is not None else dodopayments.omit,
            )
            data = await self._json(raw, operation="preview_change_plan", subscription_id=subscription_id)
        preview = _read_preview(data, subscription_id, raw.status_code)
        if preview is None:
            log.warning(
                "dodo.unreadable", extra={"operation": "preview_change_plan", "subscription_id": subscription_id}
            )
            raise DodoUnavailable("Dodo returned an unreadable plan-change preview", status=raw.status_code)
        return preview

    async def _json(self, raw: Any, *, operation: str, subscription_id: str) -> object:
        """Dodo's answer read like a webhook body: exact decimals, bounded nesting, nothing Postgres refuses."""
        try:
            return loads(await raw.text())
        except MalformedPayload as error:
            log.warning(
                "dodo.unreadable",
                extra={"operation": operation, "subscription_id": subscription_id, "why": error.message},
            )
            raise DodoUnavailable("Dodo answered with a body that is not readable JSON") from None

    def _client(self, client: dodopayments.AsyncDodoPayments | None, operation: str) -> dodopayments.AsyncDodoPayments:
        if client is None:
            log.error("dodo.not_configured", extra={"operation": operation, "fix": "set DODO_PAYMENTS_API_KEY"})
            raise DodoMisconfigured("no Dodo API key is configured")
        return client

    @contextmanager
    def _translate(self, operation: str, subscription_id: str) -> Iterator[None]:
        """Turn the SDK's exceptions into domain errors, logging what an operator needs (never the API key)."""
        facts = {"operation": operation, "subscription_id": subscription_id}
        try:
            yield
        except dodopayments.APITimeoutError as exc:
            sent = not isinstance(exc.__cause__, _NOT_SENT)
            log.warning("dodo.timeout", extra={**facts, "timeout_s": self._timeout, "maybe_applied": sent})
            raise DodoUnavailable(f"Dodo did not answer within {self._timeout}s", outcome_unknown=sent) from exc
        except dodopayments.APIConnectionError as exc:
            sent = not isinstance(exc.__cause__, _NOT_SENT)
            log.warning("dodo.unreachable", extra={**facts, "why": type(exc.__cause__).__name__, "maybe_applied": sent})
            raise DodoUnavailable("Dodo could not be reached", outcome_unknown=sent) from exc
        except dodopayments.APIStatusError as exc:
            _raise_for_status(exc, facts)


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


def _raise_for_status(exc: dodopayments.APIStatusError, facts: dict[str, str]) -> NoReturn:
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
    if status == 404:
        raise SubscriptionNotFound(facts["subscription_id"], at_dodo=True) from exc
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
