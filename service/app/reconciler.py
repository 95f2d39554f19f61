"""Reconciliation: fetch subscriptions from Dodo and apply them like webhook snapshots, to heal missed webhooks
(a lost `subscription.renewed` must never leave a paying customer downgraded, nor a lost cancellation leave access
open).

Rate-limited below Dodo's 100 requests/minute, one subscription per transaction, and each change logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from service.app.dodo_gateway import DodoGateway
from service.app.snapshots import apply_snapshot
from service.domain.catalog import Catalog
from service.domain.clock import Clock
from service.domain.errors import DomainError, SubscriptionNotFound
from storage.engine import Database
from storage.repositories.subscriptions import SubscriptionRepository

log = logging.getLogger("entitlements.reconcile")


@dataclass(frozen=True, slots=True)
class StalePolicy:
    renewal_margin: timedelta = timedelta(hours=6)
    refresh_after: timedelta = timedelta(days=7)
    # A subscription fetched this recently is not fetched again, whatever it looks like.
    recheck_after: timedelta = timedelta(hours=1)


@dataclass
class ReconcileReport:
    checked: int = 0
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class RateLimiter:
    """At most `per_minute` calls a minute, spaced evenly (no bursts that Dodo would answer with 429)."""

    def __init__(
        self,
        per_minute: int,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.interval = 60.0 / per_minute
        self._monotonic = monotonic
        self._sleep = sleep
        self._next = 0.0

    async def wait(self) -> None:
        now = self._monotonic()
        if self._next > now:
            await self._sleep(self._next - now)
            now = self._next
        self._next = now + self.interval


async def stale_ids(db: Database, now: datetime, policy: StalePolicy) -> list[str]:
    """Subscriptions whose local state may be out of date (see SubscriptionRepository.stale_ids)."""
    async with db.connection() as connection:
        return await SubscriptionRepository(connection).stale_ids(
            now,
            renewal_margin=policy.renewal_margin,
            silent_for=policy.refresh_after,
            recheck_after=policy.recheck_after,
        )


async def all_ids(db: Database) -> list[str]:
    async with db.connection() as connection:
        return await SubscriptionRepository(connection).all_ids()


async def reconcile(
    ids: Sequence[str],
    *,
    db: Database,
    dodo: DodoGateway,
    catalog: Catalog,
    clock: Clock,
    limiter: RateLimiter,
    on_change: Callable[[str], None] | None = None,
) -> ReconcileReport:
    report = ReconcileReport()
    for subscription_id in ids:
        await limiter.wait()
        report.checked += 1
        asked_at = clock()  # the snapshot holds every change up to here
        try:
            fetched = await dodo.get_subscription(subscription_id)
        except SubscriptionNotFound:
            log.warning("reconcile.missing", extra={"subscription_id": subscription_id})
            report.missing.append(subscription_id)
            continue
        except DomainError as error:
            log.warning("reconcile.fetch_failed", extra={"subscription_id": subscription_id, "why": error.message})
            report.failed.append(subscription_id)
            continue
        try:
            async with db.tx() as connection:
                outcome = await apply_snapshot(connection, catalog, fetched, asked_at, refreshed_at=clock())
        except Exception:
            # One unreadable or unstorable subscription must not stall every one after it, pass after pass.
            log.exception("reconcile.apply_failed", extra={"subscription_id": subscription_id})
            report.failed.append(subscription_id)
            continue
        before, after = outcome.previous, outcome.current
        if outcome.applied and on_change is not None:
            on_change(after.customer_id)
        if outcome.applied and (before is None or _summary(before) != _summary(after)):
            report.changed.append(subscription_id)
            log.info(
                "reconcile.changed",
                extra={
                    "subscription_id": subscription_id,
                    "before": None if before is None else _summary(before),
                    "after": _summary(after),
                },
            )
    return report


def _summary(sub: object) -> tuple[object, ...]:
    return tuple(
        getattr(sub, name)
        for name in (
            "status",
            "product_id",
            "quantity",
            "next_billing_date",
            "cancel_at_next_billing_date",
            "scheduled_change",
        )
    )


async def reconcile_forever(
    *,
    interval: float,
    db: Database,
    dodo: DodoGateway,
    catalog: Catalog,
    clock: Clock,
    limiter: RateLimiter,
    policy: StalePolicy,
    on_change: Callable[[str], None] | None = None,
) -> None:
    """The background loop of `serve`: the stale set every `interval` seconds, until cancelled."""
    while True:
        try:
            ids = await stale_ids(db, clock(), policy)
            if ids:
                report = await reconcile(
                    ids, db=db, dodo=dodo, catalog=catalog, clock=clock, limiter=limiter, on_change=on_change
                )
                log.info(
                    "reconcile.pass",
                    extra={"checked": report.checked, "changed": len(report.changed), "failed": len(report.failed)},
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reconcile.pass_failed")
        await asyncio.sleep(interval)
