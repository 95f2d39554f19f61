"""The watch log's sequencer: turns committed changes into numbered events, and emits the events that time alone
makes (trial end, grace end, period end), exactly once across replicas.

An event's `occurred_at` is this service's clock when the change entered the log (milliseconds after its commit;
later only for a change left behind by a process that died, taken by the next sweep), and the access decisions it
carries are made as of that instant. A time-driven event's `occurred_at` is the instant itself.

Every replica runs one. A pass locks the log's head (one pass at a time across replicas), takes the committed
pending rows in id order (storage/repositories/watch.py says why that is commit order), derives their events with
the catalog (service/domain/watch_rules.py), and, when an instant has come, adds the ACCESS_CHANGED events of every
subscription whose decision changed in (clock_through, now]. Events, pending rows and the head's position and
clock move in one transaction, so a crash anywhere leaves nothing half-done, and a window of time is emitted once.

A pass runs right after a local commit (the change feed calls `wake`), when the next instant comes, and as a sweep
every second (changes committed by another process that runs no sequencer, such as the reconcile CLI). No job table
says when the next instant is: it is derived from the stored subscriptions after every pass that may have moved
it, and lowered at once by the changes this replica sequences.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal

from service.app.background import BackgroundTasks, wait_for_event
from service.domain import credit_rules, watch_rules
from service.domain.catalog import Catalog, CreditDef
from service.domain.clock import Clock
from service.domain.values import SubscriptionState
from service.domain.watch_rules import NewEvent, WatchKind
from storage.engine import Budget, Database
from storage.errors import is_database_unavailable
from storage.repositories.subscriptions import SubscriptionRepository
from storage.repositories.watch import Head, PendingChange, WatchRepository

log = logging.getLogger("entitlements.watch")

_BATCH = 1000
# How far the log is pruned in one pass, and how often.
_PRUNE_BATCH = 10_000
_PRUNE_EVERY = 60.0
# The next instant is found again from the stored subscriptions at least this often, for changes another replica
# sequenced (that replica lowers its own next instant at once; this bounds how late a lone survivor can be).
_RESCAN_EVERY = 30.0
# The shortest time between two passes of one sequencer (seconds): what a change may wait under load.
_MIN_GAP = 0.01


class WatchLog:
    def __init__(
        self,
        db: Database,
        catalog: Catalog,
        clock: Clock,
        *,
        retention: timedelta = timedelta(hours=168),
        sweep_interval: float = 1.0,
        on_appended: Callable[[int], None] | None = None,
    ) -> None:
        self.db = db
        self.catalog = catalog
        self.clock = clock
        self.retention = retention
        self.sweep_interval = sweep_interval
        self.on_appended = on_appended
        self._wake = asyncio.Event()
        self._next_instant: datetime | None = None
        # Monotonic time of the last scan for the next instant; -inf: scan on the first pass.
        self._scanned_at = float("-inf")
        self._pruned_at = float("-inf")
        self._grace = {product_id: catalog.grace_days(product_id) for product_id in catalog.plans}

    def wake(self) -> None:
        self._wake.set()

    def start(self, tasks: BackgroundTasks) -> None:
        tasks.spawn("watch-sequencer", self._run())

    async def sequence(self) -> int:
        """Everything committed so far into the log; returns how many events were added."""
        total = 0
        while True:
            added, more = await self._pass()
            total += added
            if not more:
                return total

    async def _pass(self) -> tuple[int, bool]:
        now = self.clock()
        clock_due = self._next_instant is not None and now >= self._next_instant
        rescan = clock_due or time.monotonic() - self._scanned_at >= _RESCAN_EVERY
        prune = time.monotonic() - self._pruned_at >= _PRUNE_EVERY
        async with self.db.tx(Budget.WRITE) as connection:
            repo = WatchRepository(connection)
            head = await repo.head(lock=True)
            pending = await repo.pending(_BATCH)
            events = await self._events_of(repo, pending, now)
            through = head.clock_through
            if clock_due or rescan:
                # Emitting up to now is always right (the window is stored state); doing it only when an instant
                # may have come keeps the pass cheap.
                through = max(now, head.clock_through)
                events.extend(await self._time_events(repo, head, through))
            if not pending and not events and through == head.clock_through and not prune:
                return 0, False
            position = await repo.append(head, events, [change.id for change in pending], through)
            if prune:
                pruned, pruned_through = await repo.prune(head, self.retention, _PRUNE_BATCH)
                if pruned:
                    log.info("watch.pruned", extra={"events": pruned, "through": pruned_through})
            if rescan:
                self._next_instant = await repo.next_instant(self._grace, self.catalog.grace_period_days, through)
        if rescan:
            self._scanned_at = time.monotonic()
        if prune:
            self._pruned_at = time.monotonic()
        self._lower_next_instant([change.new_state for change in pending if change.new_state is not None])
        if events and self.on_appended is not None:
            self.on_appended(position)
        return len(events), len(pending) == _BATCH

    def _lower_next_instant(self, states: list[SubscriptionState]) -> None:
        """A change sequenced here may bring an instant nearer than the one known."""
        upcoming = watch_rules.next_instant(states, self._grace, self.catalog.grace_period_days, self.clock())
        if upcoming is not None and (self._next_instant is None or upcoming < self._next_instant):
            self._next_instant = upcoming

    async def _events_of(self, repo: WatchRepository, pending: list[PendingChange], now: datetime) -> list[NewEvent]:
        events: list[NewEvent] = []
        thresholds = await self._thresholds(repo, pending)
        headroom = await self._overage_limits(repo, pending, now)
        for change in pending:
            if change.subject == "subscription" and change.new_state is not None:
                new = change.new_state
                kinds = watch_rules.subscription_kinds(
                    change.old_state, new, self.catalog.grace_days(new.product_id), now
                )
                customers = [new.customer_id]
                if change.old_state is not None and change.old_state.customer_id != new.customer_id:
                    customers.append(change.old_state.customer_id)
                for customer_id in customers:
                    ref = change.customer_ref if customer_id == change.customer_id else None
                    events.extend(
                        NewEvent(customer_id, kind, now, subscription=new, customer_ref=ref) for kind in kinds
                    )
            elif change.subject == "credit" and change.credit is not None and change.new_balance is not None:
                key = (change.customer_id, change.credit)
                threshold = thresholds.get(key)
                kinds = watch_rules.credit_kinds(
                    change.old_balance,
                    change.new_balance,
                    threshold=threshold,
                    overage_limit=headroom.get(key, Decimal(0)),
                )
                events.extend(
                    NewEvent(
                        change.customer_id,
                        kind,
                        now,
                        credit=change.credit,
                        balance=change.new_balance,
                        threshold=threshold if kind is WatchKind.CREDITS_LOW else None,
                        customer_ref=change.customer_ref,
                    )
                    for kind in kinds
                )
            elif change.subject == "link":
                events.append(
                    NewEvent(
                        change.customer_id,
                        WatchKind.CUSTOMER_LINKED,
                        now,
                        customer_ref=change.customer_ref,
                    )
                )
        return events

    def _credit(self, change: PendingChange) -> CreditDef | None:
        return None if change.credit is None else self.catalog.credits.get(change.credit)

    async def _thresholds(self, repo: WatchRepository, pending: list[PendingChange]) -> dict[tuple[str, str], Decimal]:
        """The low-balance threshold of each account whose balance fell (a share of the last grant is looked up)."""
        falling = []
        for change in pending:
            definition = self._credit(change)
            if (
                definition is not None
                and definition.low_balance is not None
                and change.new_balance is not None
                and change.new_balance < (change.old_balance or Decimal(0))
            ):
                falling.append((change, definition))
        shares = [(c.customer_id, d.key) for c, d in falling if d.low_balance and d.low_balance.percent_of_last_grant]
        grants = await repo.last_grants(shares)
        thresholds = {}
        for change, definition in falling:
            key = (change.customer_id, definition.key)
            assert definition.low_balance is not None
            resolved = definition.low_balance.resolve(grants.get(key))
            if resolved is not None:
                thresholds[key] = resolved
        return thresholds

    async def _overage_limits(
        self, repo: WatchRepository, pending: list[PendingChange], now: datetime
    ) -> dict[tuple[str, str], Decimal]:
        """How far below zero each changed account may go: the catalog's limit, raised by a Dodo-linked credit's
        cart (which needs the customer's subscriptions)."""
        limits: dict[tuple[str, str], Decimal] = {}
        linked: dict[str, list[CreditDef]] = {}
        for change in pending:
            definition = self._credit(change)
            if definition is None:
                continue
            limits[(change.customer_id, definition.key)] = definition.overage_limit
            if definition.dodo_credit_entitlement_id is not None:
                linked.setdefault(change.customer_id, []).append(definition)
        if linked:
            by_customer = await SubscriptionRepository(repo.connection).for_customers(list(linked))
            for customer_id, definitions in linked.items():
                subs = by_customer[customer_id]
                for definition in definitions:
                    limits[(customer_id, definition.key)] = credit_rules.overage_limit(
                        definition, subs, self.catalog, now
                    )
        return limits

    async def _time_events(self, repo: WatchRepository, head: Head, through: datetime) -> list[NewEvent]:
        # A log whose clock was stopped longer than retention (every replica down) starts from what is still kept.
        after = max(head.clock_through, through - self.retention)
        events: list[NewEvent] = []
        for due in await repo.due(self._grace, self.catalog.grace_period_days, after, through):
            sub = due.state
            grace = self.catalog.grace_days(sub.product_id)
            events.extend(
                NewEvent(
                    sub.customer_id, WatchKind.ACCESS_CHANGED, instant, subscription=sub, customer_ref=due.customer_ref
                )
                for instant in watch_rules.time_changes(sub, grace, after, through)
            )
        events.sort(key=lambda event: event.occurred_at)
        return events

    def _delay(self) -> float:
        if self._next_instant is None:
            return self.sweep_interval
        until = (self._next_instant - self.clock()).total_seconds()
        return max(0.0, min(self.sweep_interval, until))

    async def _run(self) -> None:
        last_pass = float("-inf")
        while True:
            await wait_for_event(self._wake, self._delay())
            # Under load, passes at most every _MIN_GAP: each then takes what many commits left (one lock, one
            # read, one write for all of them) instead of a pass per commit; an idle log is sequenced at once.
            since = time.monotonic() - last_pass
            if since < _MIN_GAP:
                await asyncio.sleep(_MIN_GAP - since)
            self._wake.clear()
            last_pass = time.monotonic()
            try:
                await self.sequence()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not is_database_unavailable(error):
                    log.exception("watch.sequence_failed")
                # The pending rows stay; the next wake-up or sweep takes them.
                await asyncio.sleep(self.sweep_interval)
