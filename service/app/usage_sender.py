"""The usage sender: ships the usage outbox (`usage_events`, written by RecordUsage) to Dodo's POST /events/ingest.

Exactly once at Dodo, whatever crashes, restarts or replicas do:

- A row is claimed in a short transaction (`FOR UPDATE SKIP LOCKED`, then `attempts + 1` and `sent_at = now` as a
  lease); no transaction is open while Dodo is asked. Replicas skip each other's claims and leases, so in normal
  operation no event is sent twice at all.
- A row is marked `delivered` only after Dodo's 2xx; a delivered row is never claimed again.
- A crash (or a lost answer) between Dodo's 2xx and our mark leaves the row `pending`: it is sent again once the lease
  runs out (a lost answer gives the lease back at once), and Dodo ignores an `event_id` it has already ingested
  (first write wins), so the resend changes nothing at Dodo.
- Dodo's `event_id` is global to the account while ours is unique per customer, so the id sent is
  `f"{customer_id}:{event_id}"` (Dodo customer ids hold no colon, so two customers never collide). Within one
  request ids are therefore distinct.

Batches hold at most 1000 events, oldest first. 429, 5xx, timeouts and unreachable Dodo back off exponentially with
jitter; every request waits for the rate limiter (Dodo's 240/min is account-wide, so this process takes a share).
400/422 mark the events `rejected` with Dodo's message: a refused batch is split in halves until the refused event
is alone. A pending event that can no longer reach Dodo within its 1 h window (less a safety margin) is marked
`expired` (logged as `usage.expired`), never dropped silently; `entitlements_outbox_backlog{kind="usage_events"}`
is kept current.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, timedelta

from dodopayments.types.event_input_param import EventInputParam

from service.app.background import BackgroundTasks
from service.app.dodo_gateway import DodoGateway
from service.app.metrics import Metrics
from service.app.reconciler import RateLimiter
from service.app.usage import MAX_AGE, MAX_EVENTS
from service.domain.clock import Clock
from service.domain.errors import DodoMisconfigured, DodoNotConfigured, DodoRefused, DodoUnavailable
from storage.engine import Database
from storage.repositories.usage import ClaimedUsageEvent, UsageRepository

log = logging.getLogger("entitlements.usage")

KIND = "usage_events"


def dodo_event_id(customer_id: str, event_id: str) -> str:
    """The id Dodo sees: ours is unique per customer, Dodo's per account."""
    return f"{customer_id}:{event_id}"


class UsageSender:
    def __init__(
        self,
        db: Database,
        dodo: DodoGateway,
        clock: Clock,
        *,
        wake: asyncio.Event,
        limiter: RateLimiter,
        metrics: Metrics | None = None,
        batch_size: int = MAX_EVENTS,
        poll_interval: float = 1.0,
        lease: timedelta = timedelta(seconds=60),
        send_margin: timedelta = timedelta(seconds=60),
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        jitter: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not 1 <= batch_size <= MAX_EVENTS:
            raise ValueError(f"batch_size must be 1 to {MAX_EVENTS}")
        self.db = db
        self.dodo = dodo
        self.clock = clock
        self.wake = wake
        self.limiter = limiter
        self.metrics = metrics
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.lease = lease
        self.send_margin = send_margin
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._jitter = jitter
        self._sleep = sleep
        self.failures = 0
        """Consecutive passes that ended with Dodo unavailable (drives the backoff)."""

    def start(self, tasks: BackgroundTasks, name: str = "usage-sender") -> None:
        tasks.spawn(name, self.run())

    async def run(self) -> None:
        """Forever: a pass, then (unless the batch was full) wait for RecordUsage's signal or the poll interval."""
        while True:
            try:
                claimed, ok = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Postgres away, a bug: keep the loop alive, loudly, and try again after a pause.
                log.exception("usage.sender_failed")
                claimed, ok = 0, False
            if not ok:
                self.failures += 1
                await self._sleep(self.backoff())
                continue
            self.failures = 0
            if claimed >= self.batch_size:
                continue
            try:
                async with asyncio.timeout(self.poll_interval):
                    await self.wake.wait()
            except TimeoutError:
                pass
            self.wake.clear()

    def backoff(self) -> float:
        """Exponential in the consecutive failures, capped, with "equal jitter" (half fixed, half random)."""
        ceiling: float = min(self.backoff_max, self.backoff_base * 2.0 ** max(self.failures - 1, 0))
        return ceiling / 2 + ceiling / 2 * self._jitter()

    async def run_once(self) -> tuple[int, bool]:
        """One pass: expire what can no longer reach Dodo in time, claim one batch and send it. (how many rows were
        claimed, False when Dodo was unavailable)."""
        now = self.clock()
        not_before = now - MAX_AGE + self.send_margin
        lease_ends_before = now - self.lease
        async with self.db.tx() as connection:
            repository = UsageRepository(connection)
            expired = await repository.expire(occurred_before=not_before, lease_ends_before=lease_ends_before)
            batch = await repository.claim(
                now=now, not_before=not_before, lease_ends_before=lease_ends_before, limit=self.batch_size
            )
        if expired:
            log.warning(
                "usage.expired",
                extra={
                    "count": len(expired),
                    "maybe_ingested": sum(1 for _, _, attempts in expired if attempts > 0),
                    "customer_id": expired[0][0],
                    "event_id": expired[0][1],
                },
            )
        ok = True
        if batch:
            ok = await self._deliver(batch)
        await self._report_backlog()
        return len(batch), ok

    async def _deliver(self, batch: Sequence[ClaimedUsageEvent]) -> bool:
        """Send one claimed batch; False (and the rows given back) when Dodo is unavailable."""
        ids = [event.id for event in batch]
        await self.limiter.wait()
        try:
            await self.dodo.ingest_events([_event_param(event) for event in batch])
        except DodoRefused as refused:
            if len(batch) == 1:
                why = f"HTTP {refused.status}{f' {refused.code}' if refused.code else ''}: {refused.dodo_message}"
                async with self.db.tx() as connection:
                    await UsageRepository(connection).mark_rejected(ids, why[:1000])
                log.warning(
                    "usage.rejected",
                    extra={
                        "customer_id": batch[0].customer_id,
                        "event_id": batch[0].event_id,
                        "status": refused.status,
                        "dodo_message": refused.dodo_message,
                    },
                )
                return True
            # One bad event fails Dodo's whole request: find it by halves, the rest goes through.
            middle = len(batch) // 2
            halves = (batch[:middle], batch[middle:])
            for index, half in enumerate(halves):
                if not await self._deliver(half):
                    rest = [event.id for later in halves[index + 1 :] for event in later]
                    if rest:
                        await self._release(rest, "not sent: Dodo became unavailable while a refused batch was split")
                    return False
            return True
        except (DodoUnavailable, DodoMisconfigured, DodoNotConfigured) as error:
            detail = getattr(error, "detail", "") or error.message
            log.warning(
                "usage.send_failed",
                extra={"events": len(batch), "why": detail, "attempt": batch[0].attempts, "failures": self.failures},
            )
            await self._release(ids, detail)
            return False
        async with self.db.tx() as connection:
            await UsageRepository(connection).mark_delivered(ids, self.clock())
        log.info("usage.delivered", extra={"events": len(batch)})
        return True

    async def _release(self, ids: Sequence[int], why: str) -> None:
        async with self.db.tx() as connection:
            await UsageRepository(connection).release(ids, why[:1000])

    async def _report_backlog(self) -> None:
        if self.metrics is None:
            return
        async with self.db.connection() as connection:
            backlog = await UsageRepository(connection).backlog()
        self.metrics.outbox_backlog.labels(KIND).set(backlog)


def _event_param(event: ClaimedUsageEvent) -> EventInputParam:
    param: EventInputParam = {
        "event_id": dodo_event_id(event.customer_id, event.event_id),
        "customer_id": event.customer_id,
        "event_name": event.event_name,
        "timestamp": event.occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
    }
    if event.properties:
        param["metadata"] = dict(event.properties)
    return param
