"""CreateCharge / GetCharge: on-demand charges of a subscription that never charge twice for one request.

Dodo's `POST /subscriptions/{id}/charge` takes no idempotency key, so the protocol is ours (DESIGN §13):
1. The intent row ('sending', our `charge_id`, a lease) commits before Dodo is called.
2. The POST goes once (SDK retries off) with our charge id in `metadata` under `CHARGE_ID_KEY`.
3. 200: PENDING with Dodo's payment_id. A refusal (4xx): FAILED with Dodo's code, never resent. A provable
   non-delivery (connection refused, 429, no API key, unknown subscription): the intent row is removed. Anything
   else (timeout, 5xx, a lost connection after sending): UNKNOWN.
4. A retry of an UNKNOWN charge, or of a 'sending' one whose lease ran out (a crashed process), first searches
   Dodo's payments of the subscription for our charge id. Found: its payment_id and status. Not found, and the
   last send's lease has run out (so a slow POST cannot still land): sent again, under a compare-and-set on the
   attempt count, so two concurrent retries never both send. Payment webhooks move the charge too
   (`apply_payment_webhook`, in the webhook's own transaction).
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from service.app.background import BackgroundTasks
from service.app.dodo_gateway import DodoGateway, DodoPayment
from service.domain import fingerprints, limits
from service.domain.errors import (
    ChargeNotFound,
    DodoRefused,
    DodoUnavailable,
    DomainError,
    IdempotencyKeyReused,
    InvalidField,
    RequestInFlight,
    Unavailable,
)
from storage.engine import Connection, Database
from storage.repositories.charges import FINAL, ChargeRepository, ChargeState, NewCharge, StoredCharge

log = logging.getLogger("entitlements.charges")

CHARGE_ID_KEY = "entsvc_charge_id"
"""The metadata key our charge id rides under at Dodo (on the payment and its webhooks)."""
MAX_AMOUNT = 10**12
_CURRENCY = re.compile(r"[A-Z]{3}")
# Dodo's clock and ours may differ: search payments from a little before the intent row was written.
_CLOCK_SKEW = timedelta(minutes=10)


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    subscription_id: str
    amount: int
    idempotency_key: str
    currency: str = ""
    description: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    caller: str = ""


@dataclass(frozen=True, slots=True)
class Charge:
    charge_id: str
    subscription_id: str
    amount: int
    currency: str
    status: ChargeState
    """SENDING is reported as PENDING (sent, or about to be)."""
    payment_id: str
    error_code: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ChargeResult:
    charge: Charge
    replayed: bool = False


def payment_state(dodo_status: str) -> ChargeState:
    """Dodo's payment IntentStatus as a charge state."""
    if dodo_status == "succeeded":
        return ChargeState.SUCCEEDED
    if dodo_status in ("failed", "cancelled"):
        return ChargeState.FAILED
    return ChargeState.PENDING


_WEBHOOK_STATES = {
    "payment.succeeded": ChargeState.SUCCEEDED,
    "payment.failed": ChargeState.FAILED,
    "payment.cancelled": ChargeState.FAILED,
    "payment.processing": ChargeState.PENDING,
}


async def apply_payment_webhook(connection: Connection, event_type: str, data: Mapping[str, Any]) -> str | None:
    """A `payment.*` webhook naming one of our charges (our id in `data.metadata`, or a known payment_id) moves it
    forward, inside the webhook's transaction. The charge id that moved, or None."""
    state = _WEBHOOK_STATES.get(event_type)
    if state is None:
        return None
    metadata = data.get("metadata")
    charge_id = metadata.get(CHARGE_ID_KEY) if isinstance(metadata, Mapping) else None
    payment_id = data.get("payment_id")
    error_code = data.get("error_code")
    error_message = data.get("error_message")
    moved = await ChargeRepository(connection).apply_payment(
        charge_id=charge_id if isinstance(charge_id, str) and charge_id else None,
        payment_id=payment_id if isinstance(payment_id, str) and payment_id else None,
        status=state,
        error_code=error_code if isinstance(error_code, str) else None,
        error_message=error_message if isinstance(error_message, str) else None,
    )
    if moved is not None:
        log.info("charge.webhook_applied", extra={"charge_id": moved, "type": event_type, "payment_id": payment_id})
    return moved


class Charges:
    def __init__(
        self,
        db: Database,
        dodo: DodoGateway,
        *,
        lease: timedelta = timedelta(seconds=60),
        resolve_interval: float = 30.0,
    ) -> None:
        self.db = db
        self.dodo = dodo
        self.lease = lease
        self.resolve_interval = resolve_interval

    # ------------------------------------------------------------------------------------------------ CreateCharge

    async def create(self, request: ChargeRequest) -> ChargeResult:
        _validate(request)
        intent = NewCharge(
            charge_id=f"chg_{uuid.uuid4().hex}",
            caller=request.caller,
            idempotency_key=request.idempotency_key,
            fingerprint=_fingerprint(request),
            subscription_id=request.subscription_id,
            amount=request.amount,
            currency=request.currency,
            description=request.description,
            metadata=dict(request.metadata),
        )
        # Committed before Dodo hears of it: whatever happens next, the key names this charge.
        async with self.db.tx() as connection:
            stored, created = await ChargeRepository(connection).claim(intent, lease=self.lease)
        if stored.fingerprint != intent.fingerprint:
            raise IdempotencyKeyReused("idempotency_key was already used for a different charge")
        if created:
            return ChargeResult(_view(await self._send(stored)))
        if stored.status in FINAL or stored.status is ChargeState.PENDING:
            return ChargeResult(_view(stored), replayed=True)
        if stored.status is ChargeState.SENDING and not stored.lease_expired:
            raise RequestInFlight("a charge with this idempotency key is being sent; retry shortly")
        return ChargeResult(_view(await self.resolve(stored)), replayed=True)

    async def resolve(self, stored: StoredCharge, *, resend: bool = True) -> StoredCharge:
        """An unresolved charge (UNKNOWN, or 'sending' past its lease): take Dodo's payment for it if there is one;
        otherwise, once no POST of it can still be in flight, send it again (once) when `resend`: only a caller's
        retry resends; the background resolver only resolves."""
        facts = {"charge_id": stored.charge_id, "subscription_id": stored.subscription_id}
        payments = await self.dodo.list_payments(stored.subscription_id, stored.created_at - _CLOCK_SKEW)
        found = _ours(payments, stored.charge_id)
        if found is not None:
            state = payment_state(found.status)
            async with self.db.tx() as connection:
                repository = ChargeRepository(connection)
                await repository.advance(
                    stored.charge_id,
                    state,
                    payment_id=found.payment_id,
                    error_code=found.error_code,
                    error_message=found.error_message,
                )
                current = await repository.by_id(stored.charge_id)
            log.info("charge.resolved", extra={**facts, "payment_id": found.payment_id, "status": state.value})
            assert current is not None
            return current
        if not resend:
            return stored
        async with self.db.tx() as connection:
            taken = await ChargeRepository(connection).take_for_resend(
                stored.charge_id, attempts=stored.attempts, lease=self.lease
            )
        if taken is None:
            # Its last POST may still land (lease running), or another retry just took it: report it as it is.
            async with self.db.tx() as connection:
                current = await ChargeRepository(connection).by_id(stored.charge_id)
            assert current is not None
            return current
        log.info("charge.resending", extra={**facts, "attempt": taken.attempts})
        return await self._send(taken)

    async def _send(self, stored: StoredCharge) -> StoredCharge:
        facts = {"charge_id": stored.charge_id, "subscription_id": stored.subscription_id, "caller": stored.caller}
        metadata = {**stored.metadata, CHARGE_ID_KEY: stored.charge_id}
        try:
            payment_id = await self.dodo.charge_subscription(
                stored.subscription_id,
                amount=stored.amount,
                currency=stored.currency,
                description=stored.description,
                metadata=metadata,
            )
        except DodoRefused as refusal:
            log.info("charge.refused", extra={**facts, "code": refusal.code, "status": refusal.status})
            async with self.db.tx() as connection:
                repository = ChargeRepository(connection)
                await repository.advance(
                    stored.charge_id,
                    ChargeState.FAILED,
                    error_code=refusal.code or f"HTTP_{refusal.status}",
                    error_message=refusal.dodo_message,
                )
                current = await repository.by_id(stored.charge_id)
            assert current is not None
            return current
        except BaseException as error:
            await self._after_failed_send(stored, error)
            if not (isinstance(error, DodoUnavailable) and error.outcome_unknown):
                raise
            # The answer was lost: the caller gets the charge as UNKNOWN, resolved before anything is resent.
            async with self.db.tx() as connection:
                current = await ChargeRepository(connection).by_id(stored.charge_id)
            assert current is not None
            return current
        async with self.db.tx() as connection:
            repository = ChargeRepository(connection)
            await repository.advance(stored.charge_id, ChargeState.PENDING, payment_id=payment_id)
            current = await repository.by_id(stored.charge_id)
        log.info("charge.sent", extra={**facts, "payment_id": payment_id})
        assert current is not None
        return current

    async def _after_failed_send(self, stored: StoredCharge, error: BaseException) -> None:
        """Record what a failed POST leaves behind: UNKNOWN when it may have reached Dodo; otherwise a first send
        frees the key (nothing exists at Dodo) and a resend stays unresolved for the next retry."""
        facts = {"charge_id": stored.charge_id, "subscription_id": stored.subscription_id}
        try:
            async with self.db.tx() as connection:
                repository = ChargeRepository(connection)
                if _maybe_sent(error):
                    log.warning("charge.outcome_unknown", extra={**facts, "why": type(error).__name__})
                    await repository.mark_unknown(stored.charge_id, error=str(error))
                elif stored.attempts == 1:
                    await repository.forget(stored.charge_id)
                else:
                    await repository.mark_unknown(stored.charge_id, error=str(error))
        except Exception:
            # Postgres is away too: the row keeps 'sending' and its lease; the next retry after it resolves first.
            log.warning("charge.release_failed", extra=facts)

    # ------------------------------------------------------------------------------------------------ GetCharge

    async def get(self, *, caller: str, charge_id: str = "", idempotency_key: str = "") -> Charge:
        if charge_id and idempotency_key:
            raise InvalidField("charge_id", "give charge_id or idempotency_key, not both")
        if not charge_id and not idempotency_key:
            raise InvalidField("charge_id", "name the charge: charge_id or idempotency_key")
        async with self.db.tx() as connection:
            repository = ChargeRepository(connection)
            if charge_id:
                limits.check_id("charge_id", charge_id)
                stored = await repository.by_id(charge_id, caller=caller)
            else:
                limits.check_id("idempotency_key", idempotency_key)
                stored = await repository.by_key(caller, idempotency_key)
        if stored is None:
            raise ChargeNotFound(charge_id or idempotency_key)
        return _view(stored)

    # ------------------------------------------------------------------------------------------------ resolver

    def start(self, tasks: BackgroundTasks) -> None:
        if self.resolve_interval > 0:
            tasks.spawn("charge_resolver", self._resolve_forever())

    async def resolve_pending(self, *, limit: int = 50) -> int:
        """One pass over the unresolved charges (the background resolver): how many it looked at."""
        async with self.db.tx() as connection:
            unresolved = await ChargeRepository(connection).unresolved(limit=limit)
        for stored in unresolved:
            try:
                await self.resolve(stored, resend=False)
            except (Unavailable, DodoRefused) as error:
                log.warning("charge.resolve_failed", extra={"charge_id": stored.charge_id, "why": error.message})
        return len(unresolved)

    async def _resolve_forever(self) -> None:
        while True:
            await asyncio.sleep(self.resolve_interval)
            try:
                await self.resolve_pending()
            except Exception as error:
                log.warning("charge.resolver_failed", extra={"why": type(error).__name__})


def _maybe_sent(error: BaseException) -> bool:
    if isinstance(error, DodoUnavailable):
        return error.outcome_unknown
    # A domain error (unknown subscription, refused key, no key): Dodo made no payment. Our own cancellation
    # (deadline, shutdown) mid-POST, or anything unexpected: the POST may have gone out.
    return not isinstance(error, DomainError)


def _ours(payments: list[DodoPayment], charge_id: str) -> DodoPayment | None:
    for payment in payments:
        if payment.metadata.get(CHARGE_ID_KEY) == charge_id:
            return payment
    return None


def _view(stored: StoredCharge) -> Charge:
    status = stored.status
    if status is ChargeState.SENDING:
        status = ChargeState.UNKNOWN if stored.lease_expired else ChargeState.PENDING
    return Charge(
        charge_id=stored.charge_id,
        subscription_id=stored.subscription_id,
        amount=stored.amount,
        currency=stored.currency,
        status=status,
        payment_id=stored.payment_id or "",
        error_code=stored.error_code or "",
        created_at=stored.created_at,
    )


def _validate(request: ChargeRequest) -> None:
    limits.check_id("subscription_id", request.subscription_id)
    if not 0 < request.amount <= MAX_AMOUNT:
        raise InvalidField("amount", f"amount must be between 1 and {MAX_AMOUNT} minor units, got {request.amount}")
    if request.currency and not _CURRENCY.fullmatch(request.currency):
        raise InvalidField("currency", "currency must be empty (the product's) or 3 uppercase letters (ISO 4217)")
    limits.check_text("description", request.description, max_length=limits.MAX_DESCRIPTION)
    limits.check_metadata("metadata", request.metadata)
    if CHARGE_ID_KEY in request.metadata:
        raise InvalidField("metadata", f"metadata.{CHARGE_ID_KEY} is reserved for the charge id")
    if len(request.metadata) >= limits.MAX_METADATA_PAIRS:
        # Our charge id takes one of Dodo's 50 pairs.
        raise InvalidField("metadata", f"metadata may hold at most {limits.MAX_METADATA_PAIRS - 1} entries here")
    limits.check_id("idempotency_key", request.idempotency_key)


def _fingerprint(request: ChargeRequest) -> str:
    return fingerprints.fingerprint(
        {
            "subscription_id": request.subscription_id,
            "amount": request.amount,
            "currency": request.currency,
            "description": request.description,
            "metadata": dict(request.metadata),
        }
    )
