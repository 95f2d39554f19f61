"""Outbound calls to the Dodo Payments API, through the official SDK.

Everything the rest of the service needs to know about a failed call is one of four exceptions: Dodo refused
the request (`DodoRejected`), the object does not exist (`DodoNotFound`), our credentials are wrong
(`DodoAuthError`), or Dodo could not be reached or did not answer properly (`DodoUnavailable`, safe to retry).
The SDK's own exception classes never leave this module.

Subscriptions come back as the raw JSON dict Dodo sent, like a webhook's `data`, rather than the SDK's model:
fields newer than the pinned SDK survive, and the webhook path and this one share a single parser.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import dodopayments
import httpx
from dodopayments.types.attach_addon_param import AttachAddonParam

__all__ = [
    "DodoAuthError",
    "DodoError",
    "DodoGateway",
    "DodoNotFound",
    "DodoRejected",
    "DodoUnavailable",
    "EffectiveAt",
    "OnPaymentFailure",
    "PlanChangePreview",
    "ProrationBillingMode",
]

logger = logging.getLogger("entitlements.dodo")

ProrationBillingMode = Literal[
    "prorated_immediately",
    "full_immediately",
    "difference_immediately",
    "do_not_bill",
    "prorated_immediately_keep_cycle",
]
EffectiveAt = Literal["immediately", "next_billing_date"]
OnPaymentFailure = Literal["prevent_change", "apply_change"]

# Failures raised before any byte of the request left this process: the request certainly had no effect.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class DodoError(Exception):
    """Base of every error this module raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DodoRejected(DodoError):
    """Dodo understood the request and refused it (409, 422, other 4xx): sending it again won't help."""

    def __init__(self, message: str, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class DodoNotFound(DodoError):
    """Dodo has no such object (404)."""


class DodoAuthError(DodoError):
    """Dodo refused our credentials (401/403), or none are configured. An operator must act."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DodoUnavailable(DodoError):
    """No usable answer from Dodo (timeout, connection error, 429, 5xx): the call may be retried.

    `outcome_unknown` is True when the request may have reached Dodo and taken effect (a read timeout, a 5xx):
    after a change-plan, read the subscription back before deciding whether to send it again.
    """

    def __init__(self, message: str, *, status: int | None = None, outcome_unknown: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.outcome_unknown = outcome_unknown


@dataclass(frozen=True, slots=True)
class PlanChangePreview:
    immediate_charge: int
    """What Dodo would charge now, in minor units of `currency` (summary.total_amount)."""
    currency: str
    new_plan: dict[str, Any]
    """The subscription as it would be after the change, raw JSON like `get_subscription`'s."""


class DodoGateway:
    """Our only door to the Dodo API.

    `api_key=None` (or empty) builds a gateway whose every call raises `DodoAuthError`, so the service can
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

    async def get_subscription(self, subscription_id: str) -> dict[str, Any]:
        client = self._client(self._reader, "get_subscription")
        with self._translate("get_subscription", subscription_id):
            raw = await client.subscriptions.with_raw_response.retrieve(subscription_id)
            data = await raw.json()
        if not isinstance(data, dict) or not isinstance(data.get("subscription_id"), str):
            raise DodoUnavailable("Dodo returned an unreadable subscription", status=raw.status_code)
        return data

    async def change_plan(
        self,
        subscription_id: str,
        *,
        product_id: str,
        quantity: int,
        proration_billing_mode: ProrationBillingMode,
        effective_at: EffectiveAt,
        addons: Sequence[Mapping[str, Any]],
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
        addons: Sequence[Mapping[str, Any]],
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
            data = await raw.json()
        preview = _read_preview(data)
        if preview is None:
            raise DodoUnavailable("Dodo returned an unreadable plan-change preview", status=raw.status_code)
        return preview

    def _client(self, client: dodopayments.AsyncDodoPayments | None, operation: str) -> dodopayments.AsyncDodoPayments:
        if client is None:
            logger.error("Dodo %s impossible: no API key configured (set DODO_PAYMENTS_API_KEY)", operation)
            raise DodoAuthError("no Dodo API key is configured")
        return client

    @contextmanager
    def _translate(self, operation: str, subscription_id: str) -> Iterator[None]:
        """Turn the SDK's exceptions into ours, logging what an operator needs (never the API key)."""
        try:
            yield
        except dodopayments.APITimeoutError as exc:
            sent = not isinstance(exc.__cause__, _NOT_SENT)
            logger.warning("Dodo %s %s timed out after %ss", operation, subscription_id, self._timeout)
            raise DodoUnavailable(f"Dodo did not answer within {self._timeout}s", outcome_unknown=sent) from exc
        except dodopayments.APIConnectionError as exc:
            sent = not isinstance(exc.__cause__, _NOT_SENT)
            logger.warning("Dodo %s %s failed to connect: %r", operation, subscription_id, exc.__cause__)
            raise DodoUnavailable("Dodo could not be reached", outcome_unknown=sent) from exc
        except dodopayments.APIStatusError as exc:
            _raise_for_status(exc, operation, subscription_id)
        except json.JSONDecodeError as exc:
            # A 2xx whose body is not JSON comes from something in front of Dodo, not from Dodo itself.
            logger.warning("Dodo %s %s answered with a body that is not JSON", operation, subscription_id)
            raise DodoUnavailable("Dodo answered with a body that is not JSON") from exc


def _raise_for_status(exc: dodopayments.APIStatusError, operation: str, subscription_id: str) -> NoReturn:
    status = exc.status_code
    code, message = _error_details(exc)
    if status in (401, 403):
        # Loud on purpose: every call fails until someone fixes the key, and nothing else will tell them.
        logger.error(
            "Dodo refused our credentials (HTTP %s, %s) on %s %s: check DODO_PAYMENTS_API_KEY and its mode "
            "(test keys only work against test.dodopayments.com)",
            status,
            message,
            operation,
            subscription_id,
        )
        raise DodoAuthError(f"Dodo refused the API key (HTTP {status})", status) from exc
    if status == 404:
        raise DodoNotFound(message or f"Dodo has no subscription {subscription_id}") from exc
    if status in (408, 429) or status >= 500:
        # 429 was refused before any work, so it certainly did not apply.
        logger.warning("Dodo %s %s answered HTTP %s: %s", operation, subscription_id, status, message)
        raise DodoUnavailable(f"Dodo answered HTTP {status}", status=status, outcome_unknown=status != 429) from exc
    logger.info("Dodo refused %s %s: HTTP %s %s %s", operation, subscription_id, status, code, message)
    raise DodoRejected(message or f"Dodo refused the request (HTTP {status})", status, code) from exc


def _error_details(exc: dodopayments.APIStatusError) -> tuple[str | None, str]:
    """Dodo's `{"code", "message"}` error body, tolerating proxies that answer with HTML or nothing."""
    body = exc.body
    if isinstance(body, Mapping):
        code = body.get("code")
        message = body.get("message")
        return (
            code if isinstance(code, str) else None,
            message if isinstance(message, str) else "",
        )
    return None, ""


def _addon_params(addons: Sequence[Mapping[str, Any]]) -> list[AttachAddonParam]:
    # Always sent, even empty: omitting `addons` also removes them, and an explicit list makes the intent
    # visible in request logs.
    return [{"addon_id": str(a["addon_id"]), "quantity": int(a["quantity"])} for a in addons]


def _read_preview(data: object) -> PlanChangePreview | None:
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
    return PlanChangePreview(immediate_charge=total, currency=currency, new_plan=new_plan)
