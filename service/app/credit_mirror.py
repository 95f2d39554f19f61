"""The credit mirror: our consumptions of Dodo-linked credits sent to Dodo's ledger as batched debits, exactly once
(DESIGN §13, DODO_WAVE2 §3 option A).

- ConsumeCredits adds each consumption of a linked credit to the open batch of its (customer, credit), in the
  consumption's own transaction (`CreditRepository.save`): what committed is on its way, what rolled back is not.
- A pass closes open batches older than `close_after` seconds (`sending`: the amount is final), claims them with
  `FOR UPDATE SKIP LOCKED` and a lease (`sent_at`), and POSTs one debit per batch with the batch id as
  `idempotency_key` and the SDK's retries off. No transaction is open while Dodo is asked. Replicas skip each
  other's claims and live leases.
- 201: Dodo's entry id is stored (`sent`); the `credit.*` echo carrying that id is then acknowledged without a
  balance change (`credit_grants.apply_dodo_ledger_entry`).
- 409 (the key exists: an earlier attempt landed and its answer was lost): `unknown`, resolved from Dodo's ledger
  list: a debit of the batch's amount created after the batch closed, preferring one whose description names the
  batch id, whose id no batch and no applied entry holds yet.
- 400 (Dodo's balance is short): `debt`, logged as an error; sent again after the next Dodo credit of the account.
- 5xx, 429, timeouts, unreachable: kept `sending` with the lease given back; retried with the same key after a
  backoff, so Dodo applies it once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal

from service.app.background import BackgroundTasks
from service.app.dodo_gateway import DodoGateway
from service.app.reconciler import RateLimiter
from service.domain import decimals
from service.domain.catalog import Catalog
from service.domain.dodo_payloads import DodoLedgerEntry
from service.domain.errors import DodoMisconfigured, DodoNotConfigured, DodoRefused, DodoUnavailable, DomainError
from storage.engine import Database
from storage.repositories.credit_mirror import ECHO_SLACK, MirrorBatch, MirrorRepository
from storage.repositories.credits import CreditRepository

log = logging.getLogger("entitlements.credit_mirror")


def mirror_reason(batch_id: str) -> str:
    return f"entsvc mirror batch {batch_id}"


class CreditMirror:
    def __init__(
        self,
        db: Database,
        dodo: DodoGateway,
        *,
        limiter: RateLimiter,
        close_after: float = 5.0,
        poll_interval: float = 1.0,
        lease: float = 60.0,
        batch_size: int = 50,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        jitter: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.db = db
        self.dodo = dodo
        self.limiter = limiter
        self.close_after = close_after
        self.poll_interval = poll_interval
        self.lease = lease
        self.batch_size = batch_size
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._jitter = jitter
        self._sleep = sleep
        self.failures = 0
        """Consecutive passes that ended with Dodo unavailable (drives the backoff)."""

    def start(self, tasks: BackgroundTasks, name: str = "credit-mirror") -> None:
        tasks.spawn(name, self.run())

    async def run(self) -> None:
        while True:
            try:
                ok = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("credit_mirror.pass_failed")
                ok = False
            if ok:
                self.failures = 0
                await self._sleep(self.poll_interval)
            else:
                self.failures += 1
                ceiling: float = min(self.backoff_max, self.backoff_base * 2.0 ** max(self.failures - 1, 0))
                await self._sleep(ceiling / 2 + ceiling / 2 * self._jitter())

    async def run_once(self) -> bool:
        """Close due batches, send what is `sending`, resolve what is `unknown`. False when Dodo was unavailable."""
        async with self.db.tx() as connection:
            repository = MirrorRepository(connection)
            await repository.close_due(self.close_after)
            claimed = await repository.claim(("sending", "unknown"), lease_seconds=self.lease, limit=self.batch_size)
        for index, batch in enumerate(claimed):
            ok = await (self._send(batch) if batch.status == "sending" else self._resolve(batch))
            if not ok:
                for rest in claimed[index + 1 :]:
                    await self._release(rest, "not tried: Dodo became unavailable during this pass")
                return False
        return True

    async def _send(self, batch: MirrorBatch) -> bool:
        facts = _facts(batch)
        if batch.dodo_entry_id is not None:
            # The echo beat our answer and a crash lost the answer: its id is Dodo's confirmation.
            async with self.db.tx() as connection:
                await MirrorRepository(connection).mark_sent(batch.batch_id, batch.dodo_entry_id)
            return True
        await self.limiter.wait()
        try:
            entry = await self.dodo.create_ledger_debit(
                batch.credit_entitlement_id,
                batch.customer_id,
                amount=batch.amount,
                idempotency_key=batch.batch_id,
                reason=mirror_reason(batch.batch_id),
            )
        except DodoRefused as refused:
            why = f"HTTP {refused.status}{f' {refused.code}' if refused.code else ''}: {refused.dodo_message}"
            if refused.status == 409:
                log.warning("credit_mirror.key_exists", extra={**facts, "why": why})
                async with self.db.tx() as connection:
                    await MirrorRepository(connection).mark(batch.batch_id, "unknown", why)
                return await self._resolve(batch)
            # Dodo will not take it (400: its balance is short; 404/422: a misconfigured entitlement): our balance
            # and Dodo's now differ by this amount until someone acts. Loud on purpose.
            log.error("credit_mirror.debt", extra={**facts, "status": refused.status, "why": why})
            async with self.db.tx() as connection:
                await MirrorRepository(connection).mark(batch.batch_id, "debt", why)
            return True
        except (DodoUnavailable, DodoMisconfigured, DodoNotConfigured) as error:
            detail = getattr(error, "detail", "") or error.message
            log.warning("credit_mirror.send_failed", extra={**facts, "why": detail, "attempt": batch.attempts})
            await self._release(batch, detail)
            return False
        async with self.db.tx() as connection:
            previous = await MirrorRepository(connection).mark_sent(batch.batch_id, entry.entry_id)
        if previous is not None:
            # An identical foreign debit was taken for this batch's echo and not applied: our balance is now
            # short of Dodo's by its amount. Should not happen; reconcile --credits shows the drift.
            log.error(
                "credit_mirror.echo_mismatch", extra={**facts, "dodo_entry_id": entry.entry_id, "taken": previous}
            )
        log.info("credit_mirror.sent", extra={**facts, "dodo_entry_id": entry.entry_id})
        return True

    async def _resolve(self, batch: MirrorBatch) -> bool:
        """Find the debit an earlier attempt created (the 409 case) in Dodo's ledger."""
        facts = _facts(batch)
        if batch.dodo_entry_id is not None:
            async with self.db.tx() as connection:
                await MirrorRepository(connection).mark_sent(batch.batch_id, batch.dodo_entry_id)
            return True
        start = None if batch.closed_at is None else batch.closed_at - ECHO_SLACK
        await self.limiter.wait()
        try:
            entries = await self.dodo.list_ledger(batch.credit_entitlement_id, batch.customer_id, start=start)
        except (DodoUnavailable, DodoMisconfigured, DodoNotConfigured, DodoRefused) as error:
            detail = getattr(error, "detail", "") or error.message
            log.warning("credit_mirror.resolve_failed", extra={**facts, "why": detail})
            await self._release(batch, detail)
            return False
        candidates = [
            e
            for e in entries
            if not e.is_credit and e.amount == batch.amount and (start is None or e.created_at >= start)
        ]
        async with self.db.tx() as connection:
            mirror = MirrorRepository(connection)
            taken = await mirror.known_entry_ids([e.entry_id for e in candidates])
            ledger = CreditRepository(connection)
            free = [e for e in candidates if e.entry_id not in taken and not await ledger.has_dodo_entry(e.entry_id)]
            found = _best(free, batch.batch_id)
            if found is None:
                await mirror.mark(batch.batch_id, "unknown", "409 and no matching debit in Dodo's ledger yet")
            else:
                await mirror.mark_sent(batch.batch_id, found.entry_id)
        if found is None:
            log.warning("credit_mirror.unresolved", extra={**facts, "searched": len(entries)})
        else:
            log.info("credit_mirror.resolved", extra={**facts, "dodo_entry_id": found.entry_id})
        return True

    async def _release(self, batch: MirrorBatch, why: str) -> None:
        async with self.db.tx() as connection:
            await MirrorRepository(connection).release(batch.batch_id, why)


@dataclass(frozen=True, slots=True)
class CreditDrift:
    customer_id: str
    credit: str
    ours: Decimal
    dodo: Decimal | None
    """None when Dodo could not say (see `error`)."""
    unsent: Decimal
    """Mirror batches not yet at Dodo: Dodo's balance will drop by this much."""
    error: str = ""

    @property
    def drift(self) -> Decimal | None:
        """Dodo's balance once what is unsent arrives, less ours: 0 when the mirror is whole."""
        if self.dodo is None:
            return None
        return decimals.MATH.subtract(decimals.MATH.subtract(self.dodo, self.unsent), self.ours)


async def credit_drift(db: Database, dodo: DodoGateway, catalog: Catalog, limiter: RateLimiter) -> list[CreditDrift]:
    """Our balance against Dodo's (GET .../balances/{customer_id}) for every account of a Dodo-linked credit."""
    linked = {key: d.dodo_credit_entitlement_id for key, d in catalog.credits.items() if d.dodo_credit_entitlement_id}
    async with db.connection() as connection:
        accounts = await MirrorRepository(connection).linked_balances(sorted(linked))
    report: list[CreditDrift] = []
    for customer_id, credit, ours, unsent in accounts:
        await limiter.wait()
        try:
            balance = await dodo.get_credit_balance(linked[credit], customer_id)
        except DomainError as error:
            report.append(CreditDrift(customer_id, credit, ours, None, unsent, error.message))
            continue
        report.append(CreditDrift(customer_id, credit, ours, balance.balance, unsent))
    return report


def _best(entries: list[DodoLedgerEntry], batch_id: str) -> DodoLedgerEntry | None:
    """The debit naming the batch in its description if any, else the oldest."""
    named = [e for e in entries if batch_id in e.description]
    pool = named or entries
    return min(pool, key=lambda e: (e.created_at, e.entry_id)) if pool else None


def _facts(batch: MirrorBatch) -> dict[str, str]:
    return {
        "batch_id": batch.batch_id,
        "customer_id": batch.customer_id,
        "credit": batch.credit,
        "amount": format(batch.amount, "f"),
    }
