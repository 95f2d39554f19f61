"""Changing a subscription at Dodo (plan change, cancellation, resumption): never sent twice for one request, one
at a time per subscription, honest about failures, and entitlements move the moment Dodo accepts (the state read
back is applied through the same path as webhooks).

The protocol, shared by every mutation:
1. Claim the caller's idempotency key in Postgres ('sending', with a lease) before Dodo is called, unless another
   mutation of the subscription is in flight (PLAN_CHANGE_IN_PROGRESS, Dodo not called).
2. Read Dodo's current state. A retry of an attempt that may have reached Dodo completes without sending again
   when that state already shows the mutation.
3. Check the mutation is possible, send it (SDK retries off), read the state back, apply it, mark the key done.
4. On failure: a definite refusal frees the key; anything that may have reached Dodo leaves it 'unknown', so the
   retry re-reads Dodo first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from service.app.change_feed import ChangeFeed
from service.app.dodo_gateway import DodoGateway
from service.app.entitlement_reader import EntitlementReader
from service.app.snapshots import apply_snapshot
from service.domain.catalog import Catalog
from service.domain.clock import Clock
from service.domain.dodo_payloads import DodoSubscription
from service.domain.errors import (
    DodoUnavailable,
    DomainError,
    IdempotencyKeyReused,
    NotFound,
    PlanChangeInProgress,
    RequestInFlight,
    Unavailable,
)
from service.domain.values import SubscriptionState, SubscriptionView
from storage.engine import Database
from storage.repositories.plan_changes import ClaimOutcome, PlanChangeRecord, PlanChangeRepository, PlanChangeStatus

log = logging.getLogger("entitlements.subscription_mutations")


class Mutation(Protocol):
    """One requested change of one subscription at Dodo."""

    @property
    def caller(self) -> str: ...
    @property
    def idempotency_key(self) -> str: ...
    @property
    def subscription_id(self) -> str: ...

    @property
    def event(self) -> str:
        """The log events' prefix (`plan_change`, `cancellation`, `resumption`): `<event>.accepted`, ..."""
        ...

    def fingerprint(self) -> str:
        """What "the same request" means for the idempotency key."""
        ...

    def took_effect(self, current: SubscriptionState) -> bool:
        """Whether Dodo's state already shows this mutation."""
        ...

    def check(self, current: SubscriptionState) -> None:
        """Refuse (a domain error) a mutation Dodo would refuse, before calling it."""
        ...

    async def send(self, dodo: DodoGateway, current: SubscriptionState) -> None:
        """The one Dodo call that makes the mutation."""
        ...


@dataclass(frozen=True, slots=True)
class Mutated:
    subscription: SubscriptionView
    replayed: bool = False


class SubscriptionMutations:
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

    async def run(self, mutation: Mutation) -> Mutated:
        async with self.db.tx() as connection:
            claim = await PlanChangeRepository(connection).claim(
                caller=mutation.caller,
                key=mutation.idempotency_key,
                subscription_id=mutation.subscription_id,
                fingerprint=mutation.fingerprint(),
                lease=self.lease,
            )
            if claim.outcome is ClaimOutcome.SUBSCRIPTION_BUSY:
                # Raised inside the transaction: its rollback removes the row a new key just got.
                log.info(
                    f"{mutation.event}.subscription_busy",
                    extra={"subscription_id": mutation.subscription_id, "caller": mutation.caller},
                )
                raise PlanChangeInProgress()
        if claim.outcome is ClaimOutcome.OTHER_PARAMETERS:
            raise IdempotencyKeyReused("idempotency_key was already used for a different request")
        if claim.outcome is ClaimOutcome.COMPLETED:
            return Mutated(await self._local_view(mutation.subscription_id), replayed=True)
        if claim.outcome is ClaimOutcome.KEY_IN_FLIGHT:
            raise RequestInFlight("a request with this idempotency key is in progress; retry shortly")
        attempt = _Attempt()
        try:
            return await self._attempt(mutation, attempt, retrying=_unresolved(claim.record))
        except BaseException as error:
            await self._release(mutation, error, attempt)
            raise

    async def read(self, subscription_id: str) -> tuple[DodoSubscription, datetime]:
        """Dodo's current state and the time just before it was asked: the snapshot is at least that new."""
        asked_at = self.clock()
        return await self.dodo.get_subscription(subscription_id), asked_at

    async def _attempt(self, mutation: Mutation, attempt: _Attempt, *, retrying: bool) -> Mutated:
        facts = {"subscription_id": mutation.subscription_id}
        current, asked_at = await self.read(mutation.subscription_id)
        if retrying and mutation.took_effect(current.state):
            log.info(f"{mutation.event}.already_applied", extra=facts)
            return await self._complete(mutation, current, asked_at)
        mutation.check(current.state)
        attempt.dispatched = True
        await mutation.send(self.dodo, current.state)
        attempt.accepted = True
        log.info(f"{mutation.event}.accepted", extra=facts)
        try:
            after, asked_at = await self.read(mutation.subscription_id)
        except (Unavailable, NotFound):
            # Accepted, but entitlements cannot move before the new state is read: say so. The key stays
            # unresolved, so the retry reads Dodo, sees the change and completes without sending it again.
            raise DodoUnavailable(
                "read-back after an accepted change failed",
                message="Dodo accepted the change but the subscription's new state could not be read yet; "
                "retry with the same idempotency key",
            ) from None
        return await self._complete(mutation, after, asked_at)

    async def _complete(self, mutation: Mutation, fetched: DodoSubscription, asked_at: datetime) -> Mutated:
        async with self.db.tx() as connection:
            outcome = await apply_snapshot(connection, self.catalog, fetched, asked_at, refreshed_at=self.clock())
            await PlanChangeRepository(connection).finish(
                mutation.caller, mutation.idempotency_key, PlanChangeStatus.COMPLETED
            )
        # The caller's next CheckAccess must see the new state at once, not after the notice comes round.
        self.changes.committed(outcome.current.customer_id)
        return Mutated(await self._local_view(mutation.subscription_id))

    async def _release(self, mutation: Mutation, error: BaseException, attempt: _Attempt) -> None:
        """After a failed attempt: keep the key unresolved whenever Dodo may have applied the mutation (the next
        attempt reads Dodo first and completes without sending again); free it after a definite refusal."""
        refused = isinstance(error, DomainError) and not isinstance(error, Unavailable)
        never_arrived = isinstance(error, DodoUnavailable) and not error.outcome_unknown
        maybe_applied = attempt.accepted or (attempt.dispatched and not refused and not never_arrived)
        try:
            async with self.db.tx() as connection:
                repository = PlanChangeRepository(connection)
                if maybe_applied:
                    await repository.finish(
                        mutation.caller, mutation.idempotency_key, PlanChangeStatus.UNKNOWN, error=str(error)[:500]
                    )
                else:
                    await repository.forget(mutation.caller, mutation.idempotency_key)
        except Exception:
            # Postgres is away too: the key keeps its lease and the next attempt after it re-checks Dodo.
            log.warning(
                f"{mutation.event}.release_failed",
                extra={
                    "subscription_id": mutation.subscription_id,
                    "caller": mutation.caller,
                    "idempotency_key": mutation.idempotency_key,
                },
            )

    async def _local_view(self, subscription_id: str) -> SubscriptionView:
        return await self.reader.get_subscription(subscription_id=subscription_id)


def _unresolved(record: PlanChangeRecord) -> bool:
    """An earlier attempt may have reached Dodo: it died mid-flight, or its answer was lost."""
    return record.status in (PlanChangeStatus.SENDING, PlanChangeStatus.UNKNOWN) and record.attempts > 0


@dataclass
class _Attempt:
    dispatched: bool = False  # the mutation may have left this process
    accepted: bool = False  # Dodo answered 2xx to it
