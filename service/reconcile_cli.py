"""`python -m service reconcile [--subscription ID | --stale | --all]`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta

from service.app.change_feed import ChangeFeed
from service.app.dodo_gateway import DodoGateway
from service.app.reconciler import RateLimiter, StalePolicy, all_ids, reconcile, stale_ids
from service.domain.catalog import load_catalog
from service.domain.clock import utc_now
from service.settings import Settings
from storage.engine import Database


def stale_policy(settings: Settings) -> StalePolicy:
    return StalePolicy(
        renewal_margin=timedelta(hours=settings.reconcile_renewal_margin_hours),
        refresh_after=timedelta(days=settings.reconcile_refresh_days),
        recheck_after=timedelta(minutes=settings.reconcile_recheck_minutes),
    )


async def run_reconcile(settings: Settings, *, subscriptions: Sequence[str] | None, stale: bool) -> int:
    catalog = load_catalog(settings.catalog_path)
    db = Database.from_url(settings.require_database(), pool_size=4, lock_timeout_ms=settings.lock_timeout_ms)
    dodo = DodoGateway(settings.dodo_payments_api_key, settings.dodo_payments_base_url, settings.dodo_timeout_seconds)
    try:
        if subscriptions:
            ids = list(subscriptions)
        elif stale:
            ids = await stale_ids(db, utc_now(), stale_policy(settings))
        else:
            ids = await all_ids(db)
        report = await reconcile(
            ids,
            db=db,
            dodo=dodo,
            catalog=catalog,
            clock=utc_now,
            limiter=RateLimiter(settings.reconcile_rate_per_minute),
        )
        # Serving replicas sweep the change feed every second anyway; publishing here makes it immediate.
        await ChangeFeed(db).publish()
    finally:
        await dodo.close()
        await db.close()
    print(
        json.dumps(
            {
                "checked": report.checked,
                "changed": report.changed,
                "missing": report.missing,
                "failed": report.failed,
            }
        ),
        flush=True,
    )
    return 1 if report.failed else 0
