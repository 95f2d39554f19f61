"""CancelSubscription and ResumeSubscription: Dodo's PATCH /subscriptions/{id}, on the protocol every subscription
mutation shares (service/app/subscription_mutations.py): idempotent per (caller, key), one at a time per
subscription, the state read back and applied at once.

Cancelling at period end sets `cancel_at_next_billing_date` (access continues as CANCELLATION_SCHEDULED until
then); cancelling now sets status `cancelled`. Resuming undoes a scheduled cancellation, or resumes a `paused`
subscription (status `active`, sent alone, as Dodo requires).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from service.app.dodo_gateway import CancelReason, DodoGateway
from service.app.subscription_mutations import Mutated, SubscriptionMutations
from service.domain import fingerprints, limits
from service.domain.errors import NothingToResume, SubscriptionNotActive
from service.domain.values import SubscriptionState

# Dodo's own cancel reasons: a caller's reason that is one of them is passed on as such; any other text goes to
# Dodo as the cancellation's comment.
_DODO_REASONS: dict[str, CancelReason] = {reason: reason for reason in get_args(CancelReason)}
_CANCELLABLE = frozenset({"active", "on_hold", "past_due", "paused"})
MAX_REASON = 500


@dataclass(frozen=True, slots=True)
class Cancellation:
    subscription_id: str
    idempotency_key: str
    immediately: bool = False
    reason: str = ""
    caller: str = ""
    event = "cancellation"

    def fingerprint(self) -> str:
        return fingerprints.fingerprint(["cancel", self.subscription_id, self.immediately, self.reason])

    def took_effect(self, current: SubscriptionState) -> bool:
        if self.immediately:
            return current.status == "cancelled"
        return current.cancel_at_next_billing_date or current.status == "cancelled"

    def check(self, current: SubscriptionState) -> None:
        if current.status not in _CANCELLABLE:
            raise SubscriptionNotActive(current.status)

    async def send(self, dodo: DodoGateway, current: SubscriptionState) -> None:
        reason = _DODO_REASONS.get(self.reason)
        comment = None if reason is not None or not self.reason else self.reason
        if self.immediately:
            await dodo.update_subscription(
                self.subscription_id, status="cancelled", cancel_reason=reason, cancellation_comment=comment
            )
        else:
            await dodo.update_subscription(
                self.subscription_id,
                cancel_at_next_billing_date=True,
                cancel_reason=reason,
                cancellation_comment=comment,
            )


@dataclass(frozen=True, slots=True)
class Resumption:
    subscription_id: str
    idempotency_key: str
    caller: str = ""
    event = "resumption"

    def fingerprint(self) -> str:
        return fingerprints.fingerprint(["resume", self.subscription_id])

    def took_effect(self, current: SubscriptionState) -> bool:
        return current.status == "active" and not current.cancel_at_next_billing_date

    def check(self, current: SubscriptionState) -> None:
        if current.status == "paused":
            return
        if current.status == "active" and current.cancel_at_next_billing_date:
            return
        raise NothingToResume(current.status)

    async def send(self, dodo: DodoGateway, current: SubscriptionState) -> None:
        if current.status == "paused":
            await dodo.update_subscription(self.subscription_id, status="active")
        else:
            await dodo.update_subscription(self.subscription_id, cancel_at_next_billing_date=False)


class SubscriptionLifecycle:
    def __init__(self, mutations: SubscriptionMutations) -> None:
        self.mutations = mutations

    async def cancel(self, cancellation: Cancellation) -> Mutated:
        limits.check_id("subscription_id", cancellation.subscription_id)
        limits.check_text("reason", cancellation.reason, max_length=MAX_REASON)
        limits.check_id("idempotency_key", cancellation.idempotency_key)
        return await self.mutations.run(cancellation)

    async def resume(self, resumption: Resumption) -> Mutated:
        limits.check_id("subscription_id", resumption.subscription_id)
        limits.check_id("idempotency_key", resumption.idempotency_key)
        return await self.mutations.run(resumption)
