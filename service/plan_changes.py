"""ChangePlan through the Dodo API: never sent twice for one request, honest about failures, and entitlements
move the moment Dodo accepts (the snapshot is applied through the same path as webhooks).

An idempotency key is made durable ('sending') before Dodo is called. If Dodo's answer is lost (timeout, 5xx),
the key stays unresolved; the next attempt with it first reads the subscription back from Dodo and, when the
change is already there, answers success without calling change-plan again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from service.catalog import Catalog
from service.change_feed import ChangeFeed
from service.clock import Clock
from service.dodo import (
    DodoAuthError,
    DodoGateway,
    DodoNotFound,
    DodoRejected,
    DodoUnavailable,
    EffectiveAt,
    ProrationBillingMode,
)
from service.domain import SubscriptionView
from service.entitlements import EntitlementReader
from service.errors import (
    DomainError,
    FailedPrecondition,
    IdempotencyKeyReused,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from service.payloads import parse_subscription
from service.snapshots import apply_snapshot
from storage.engine import Database
from storage.repositories.plan_changes import PlanChangeRecord, PlanChangeRepository

log = logging.getLogger("entitlements.plan_changes")


@dataclass(frozen=True, slots=True)
class PlanChange:
    subscription_id: str
    product_id: str
    quantity: int  # 0 keeps the current quantity
    proration: ProrationBillingMode
    effective_at: EffectiveAt
    idempotency_key: str
    preview: bool = False


@dataclass(frozen=True, slots=True)
class PlanChangeResult:
    subscription: SubscriptionView
    immediate_charge: int = 0
    currency: str = ""
    replayed: bool = False


def fingerprint(change: PlanChange) -> str:
    canonical = json.dumps(
        [change.subscription_id, change.product_id, change.quantity, change.proration, change.effective_at]
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def took_effect(data: dict[str, Any], change: PlanChange, quantity: int) -> bool:
    """Whether Dodo's current state already shows this change (applied now, or scheduled for the next period)."""
    if change.effective_at == "next_billing_date":
        scheduled = data.get("scheduled_change")
        return (
            isinstance(scheduled, dict)
            and scheduled.get("product_id") == change.product_id
            and scheduled.get("quantity", quantity) == quantity
        )
    return data.get("product_id") == change.product_id and data.get("quantity") == quantity


class PlanChanger:
    def __init__(
        self,
        db: Database,
        catalog: Catalog,
        clock: Clock,
        dodo: DodoGateway,
        reader: EntitlementReader,
        changes: ChangeFeed,
        *,
        lease: timedelta = timedelta(seconds=60),
    ) -> None:
        self.db = db
        self.catalog = catalog
        self.clock = clock
        self.dodo = dodo
        self.reader = reader
        self.changes = changes
        self.lease = lease

    def _validate(self, change: PlanChange) -> None:
        if not change.subscription_id:
            raise InvalidArgument("subscription_id is required")
        if not change.product_id:
            raise InvalidArgument("product_id is required")
        if self.catalog.plan(change.product_id) is None:
            raise InvalidArgument(f"product {change.product_id!r} is not in the plan catalog")
        if change.quantity < 0:
            raise InvalidArgument("quantity must not be negative (0 keeps the current quantity)")
        if not change.preview and not change.idempotency_key:
            raise InvalidArgument("idempotency_key is required")

    async def change(self, change: PlanChange) -> PlanChangeResult:
        self._validate(change)
        if change.preview:
            return await self._preview(change)
        key = change.idempotency_key
        async with self.db.tx() as connection:
            before, record = await PlanChangeRepository(connection).claim(
                key=key, subscription_id=change.subscription_id, fingerprint=fingerprint(change), lease=self.lease
            )
        if record.fingerprint != fingerprint(change):
            raise IdempotencyKeyReused("idempotency_key was already used for a different plan change")
        if before is None:
            if record.status == "completed":
                return PlanChangeResult(await self._local_view(change.subscription_id), replayed=True)
            raise Unavailable("a plan change with this idempotency key is in progress; retry shortly")
        attempt = _Attempt()
        try:
            return await self._attempt(change, attempt, retrying=_unresolved(before))
        except BaseException as error:
            await self._release(key, error, attempt)
            raise

    async def _read(self, subscription_id: str) -> tuple[dict[str, Any], datetime]:
        """Dodo's current state and the time just before it was asked: the snapshot is at least that new."""
        asked_at = self.clock()
        with dodo_errors():
            return await self.dodo.get_subscription(subscription_id), asked_at

    async def _attempt(self, change: PlanChange, attempt: _Attempt, *, retrying: bool) -> PlanChangeResult:
        current, asked_at = await self._read(change.subscription_id)
        quantity = change.quantity or int(current.get("quantity") or 1)
        if retrying and took_effect(current, change, quantity):
            log.info("plan_change.already_applied", extra={"subscription_id": change.subscription_id})
            return await self._complete(change, current, asked_at)
        _check_changeable(current, change, quantity)
        attempt.dispatched = True
        with dodo_errors():
            await self.dodo.change_plan(
                change.subscription_id,
                product_id=change.product_id,
                quantity=quantity,
                proration_billing_mode=change.proration,
                effective_at=change.effective_at,
                # Omitting add-ons would remove them: pass the current ones through.
                addons=_addons(current),
            )
        attempt.accepted = True
        log.info("plan_change.accepted", extra={"subscription_id": change.subscription_id})
        try:
            after, asked_at = await self._read(change.subscription_id)
        except (Unavailable, NotFound):
            # Accepted, but entitlements cannot move before the new state is read: say so. The key stays
            # unresolved, so the retry reads Dodo, sees the change and completes without sending it again.
            raise Unavailable(
                "Dodo accepted the plan change but its new state could not be read yet; "
                "retry with the same idempotency key"
            ) from None
        return await self._complete(change, after, asked_at)

    async def _complete(self, change: PlanChange, data: dict[str, Any], asked_at: datetime) -> PlanChangeResult:
        async with self.db.tx() as connection:
            outcome = await apply_snapshot(connection, self.catalog, data, asked_at, refreshed_at=self.clock())
            await PlanChangeRepository(connection).finish(change.idempotency_key, "completed")
        # The caller's next CheckAccess must see the new plan at once, not after the notice comes round.
        self.changes.committed(outcome.current.customer_id)
        return PlanChangeResult(await self._local_view(change.subscription_id))

    async def _release(self, key: str, error: BaseException, attempt: _Attempt) -> None:
        """After a failed attempt: keep the key unresolved whenever Dodo may have applied the change (the next attempt
        reads Dodo first and completes without sending it again); free it after a definite refusal."""
        refused = isinstance(error, DomainError) and not isinstance(error, Unavailable)
        never_arrived = isinstance(error, DodoUnreachable) and not error.outcome_unknown
        maybe_applied = attempt.accepted or (attempt.dispatched and not refused and not never_arrived)
        status = "unknown" if maybe_applied else ""
        try:
            async with self.db.tx() as connection:
                repository = PlanChangeRepository(connection)
                if status:
                    await repository.finish(key, status, error=str(error)[:500])
                else:
                    await repository.forget(key)
        except Exception:
            # Postgres is away too: the key keeps its lease and the next attempt after it re-checks Dodo.
            log.warning("plan_change.release_failed", extra={"idempotency_key": key})

    async def _preview(self, change: PlanChange) -> PlanChangeResult:
        with dodo_errors():
            current = await self.dodo.get_subscription(change.subscription_id)
        quantity = change.quantity or int(current.get("quantity") or 1)
        _check_changeable(current, change, quantity)
        with dodo_errors():
            preview = await self.dodo.preview_change_plan(
                change.subscription_id,
                product_id=change.product_id,
                quantity=quantity,
                proration_billing_mode=change.proration,
                effective_at=change.effective_at,
                addons=_addons(current),
            )
        # The would-be subscription, shown but never stored.
        view = self.reader.view(parse_subscription(preview.new_plan))
        return PlanChangeResult(view, immediate_charge=preview.immediate_charge, currency=preview.currency)

    async def _local_view(self, subscription_id: str) -> SubscriptionView:
        return await self.reader.get_subscription(subscription_id=subscription_id)


def _unresolved(record: PlanChangeRecord) -> bool:
    """An earlier attempt may have reached Dodo: it died mid-flight, or its answer was lost."""
    return record.status in ("sending", "unknown") and record.attempts > 0


def _addons(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"addon_id": item["addon_id"], "quantity": int(item.get("quantity") or 1)}
        for item in data.get("addons") or []
        if isinstance(item, dict) and item.get("addon_id")
    ]


class DodoUnreachable(Unavailable):
    """Dodo gave no usable answer; `outcome_unknown` when the request may still have taken effect."""

    def __init__(self, message: str, *, outcome_unknown: bool) -> None:
        super().__init__(message)
        self.outcome_unknown = outcome_unknown


@dataclass
class _Attempt:
    dispatched: bool = False  # change-plan may have left this process
    accepted: bool = False  # Dodo answered 2xx to it


def _check_changeable(current: dict[str, Any], change: PlanChange, quantity: int) -> None:
    status = current.get("status")
    if status != "active":
        raise FailedPrecondition(f"subscription is {status!r}; only an active subscription can change plan")
    if current.get("scheduled_change"):
        raise FailedPrecondition("a plan change is already scheduled for this subscription")
    if current.get("product_id") == change.product_id and current.get("quantity") == quantity:
        raise InvalidArgument("the subscription already has this product and quantity")


@contextmanager
def dodo_errors() -> Iterator[None]:
    """The gateway's failures as the contract's status codes (DESIGN §4)."""
    try:
        yield
    except DodoUnavailable as error:
        raise DodoUnreachable(
            f"Dodo is unavailable ({error.message}); safe to retry with the same idempotency key",
            outcome_unknown=error.outcome_unknown,
        ) from None
    except DodoAuthError:
        log.error("plan_change.dodo_auth_failed: Dodo refused our API key; check DODO_PAYMENTS_API_KEY")
        raise Internal("the plan change could not be made: the service is misconfigured") from None
    except DodoNotFound as error:
        raise NotFound(f"subscription not found at Dodo: {error.message}") from None
    except DodoRejected as error:
        raise FailedPrecondition(f"Dodo refused the request: {error.message}") from None
