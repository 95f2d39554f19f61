"""ChangePlan through the Dodo API: never sent twice for one request, honest about failures, and entitlements
move the moment Dodo accepts (the snapshot is applied through the same path as webhooks).

An idempotency key (scoped per caller) is made durable ('sending') before Dodo is called. If Dodo's answer is lost
(timeout, 5xx), the key stays unresolved; the next attempt with it first reads the subscription back from Dodo and,
when the change is already there, answers success without calling change-plan again.

Mutations of one subscription go one at a time: while one is in flight (any key, any caller), another is
FAILED_PRECONDITION PLAN_CHANGE_IN_PROGRESS before Dodo is asked anything, so two prorations never overlap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from service.app.change_feed import ChangeFeed
from service.app.dodo_gateway import DodoGateway
from service.app.entitlement_reader import EntitlementReader
from service.app.snapshots import apply_snapshot
from service.domain import limits
from service.domain.catalog import Catalog
from service.domain.clock import Clock
from service.domain.dodo_payloads import DodoSubscription
from service.domain.errors import (
    DodoUnavailable,
    DomainError,
    IdempotencyKeyReused,
    InvalidField,
    NotFound,
    PlanChangeInProgress,
    ProductNotInCatalog,
    RequestInFlight,
    Unavailable,
)
from service.domain.plan_change_rules import (
    PlanChange,
    PlanChangeResult,
    check_changeable,
    fingerprint,
    target_quantity,
    took_effect,
)
from service.domain.values import SubscriptionView
from storage.engine import Database
from storage.repositories.plan_changes import ClaimOutcome, PlanChangeRecord, PlanChangeRepository, PlanChangeStatus

log = logging.getLogger("entitlements.plan_changes")


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
        limits.check_id("subscription_id", change.subscription_id)
        limits.check_id("product_id", change.product_id)
        if self.catalog.plan(change.product_id) is None:
            raise ProductNotInCatalog(change.product_id)
        if change.quantity < 0:
            raise InvalidField("quantity", "quantity must not be negative (0 keeps the current quantity)")
        limits.check_id("idempotency_key", change.idempotency_key, required=not change.preview)

    async def change(self, change: PlanChange) -> PlanChangeResult:
        self._validate(change)
        if change.preview:
            return await self._preview(change)
        async with self.db.tx() as connection:
            claim = await PlanChangeRepository(connection).claim(
                caller=change.caller,
                key=change.idempotency_key,
                subscription_id=change.subscription_id,
                fingerprint=fingerprint(change),
                lease=self.lease,
            )
            if claim.outcome is ClaimOutcome.SUBSCRIPTION_BUSY:
                # Raised inside the transaction: its rollback removes the row a new key just got.
                log.info(
                    "plan_change.subscription_busy",
                    extra={"subscription_id": change.subscription_id, "caller": change.caller},
                )
                raise PlanChangeInProgress()
        if claim.outcome is ClaimOutcome.OTHER_PARAMETERS:
            raise IdempotencyKeyReused("idempotency_key was already used for a different plan change")
        if claim.outcome is ClaimOutcome.COMPLETED:
            return PlanChangeResult(await self._local_view(change.subscription_id), replayed=True)
        if claim.outcome is ClaimOutcome.KEY_IN_FLIGHT:
            raise RequestInFlight("a plan change with this idempotency key is in progress; retry shortly")
        attempt = _Attempt()
        try:
            return await self._attempt(change, attempt, retrying=_unresolved(claim.record))
        except BaseException as error:
            await self._release(change, error, attempt)
            raise

    async def _read(self, subscription_id: str) -> tuple[DodoSubscription, datetime]:
        """Dodo's current state and the time just before it was asked: the snapshot is at least that new."""
        asked_at = self.clock()
        return await self.dodo.get_subscription(subscription_id), asked_at

    async def _attempt(self, change: PlanChange, attempt: _Attempt, *, retrying: bool) -> PlanChangeResult:
        current, asked_at = await self._read(change.subscription_id)
        if retrying and took_effect(current.state, change):
            log.info("plan_change.already_applied", extra={"subscription_id": change.subscription_id})
            return await self._complete(change, current, asked_at)
        check_changeable(current.state, change)
        attempt.dispatched = True
        await self.dodo.change_plan(
            change.subscription_id,
            product_id=change.product_id,
            quantity=target_quantity(change, current.state),
            proration_billing_mode=change.proration,
            effective_at=change.effective_at,
            # Omitting add-ons would remove them: pass the current ones through.
            addons=current.state.addons,
        )
        attempt.accepted = True
        log.info("plan_change.accepted", extra={"subscription_id": change.subscription_id})
        try:
            after, asked_at = await self._read(change.subscription_id)
        except (Unavailable, NotFound):
            # Accepted, but entitlements cannot move before the new state is read: say so. The key stays
            # unresolved, so the retry reads Dodo, sees the change and completes without sending it again.
            raise DodoUnavailable(
                "read-back after an accepted change failed",
                message="Dodo accepted the plan change but its new state could not be read yet; "
                "retry with the same idempotency key",
            ) from None
        return await self._complete(change, after, asked_at)

    async def _complete(self, change: PlanChange, fetched: DodoSubscription, asked_at: datetime) -> PlanChangeResult:
        async with self.db.tx() as connection:
            outcome = await apply_snapshot(connection, self.catalog, fetched, asked_at, refreshed_at=self.clock())
            await PlanChangeRepository(connection).finish(
                change.caller, change.idempotency_key, PlanChangeStatus.COMPLETED
            )
        # The caller's next CheckAccess must see the new plan at once, not after the notice comes round.
        self.changes.committed(outcome.current.customer_id)
        return PlanChangeResult(await self._local_view(change.subscription_id))

    async def _release(self, change: PlanChange, error: BaseException, attempt: _Attempt) -> None:
        """After a failed attempt: keep the key unresolved whenever Dodo may have applied the change (the next attempt
        reads Dodo first and completes without sending it again); free it after a definite refusal."""
        refused = isinstance(error, DomainError) and not isinstance(error, Unavailable)
        never_arrived = isinstance(error, DodoUnavailable) and not error.outcome_unknown
        maybe_applied = attempt.accepted or (attempt.dispatched and not refused and not never_arrived)
        try:
            async with self.db.tx() as connection:
                repository = PlanChangeRepository(connection)
                if maybe_applied:
                    await repository.finish(
                        change.caller, change.idempotency_key, PlanChangeStatus.UNKNOWN, error=str(error)[:500]
                    )
                else:
                    await repository.forget(change.caller, change.idempotency_key)
        except Exception:
            # Postgres is away too: the key keeps its lease and the next attempt after it re-checks Dodo.
            log.warning(
                "plan_change.release_failed",
                extra={
                    "subscription_id": change.subscription_id,
                    "caller": change.caller,
                    "idempotency_key": change.idempotency_key,
                },
            )

    async def _preview(self, change: PlanChange) -> PlanChangeResult:
        current, _ = await self._read(change.subscription_id)
        check_changeable(current.state, change)
        preview = await self.dodo.preview_change_plan(
            change.subscription_id,
            product_id=change.product_id,
            quantity=target_quantity(change, current.state),
            proration_billing_mode=change.proration,
            effective_at=change.effective_at,
            addons=current.state.addons,
        )
        # The would-be subscription, shown but never stored.
        view = self.reader.view(preview.new_plan.state)
        return PlanChangeResult(view, immediate_charge=preview.immediate_charge, currency=preview.currency)

    async def _local_view(self, subscription_id: str) -> SubscriptionView:
        return await self.reader.get_subscription(subscription_id=subscription_id)


def _unresolved(record: PlanChangeRecord) -> bool:
    """An earlier attempt may have reached Dodo: it died mid-flight, or its answer was lost."""
    return record.status in (PlanChangeStatus.SENDING, PlanChangeStatus.UNKNOWN) and record.attempts > 0


@dataclass
class _Attempt:
    dispatched: bool = False  # change-plan may have left this process
    accepted: bool = False  # Dodo answered 2xx to it
