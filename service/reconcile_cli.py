"""`python -m service reconcile [--subscription ID | --stale | --all | --credits]`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta

from service.app.change_feed import ChangeFeed
from service.app.credit_mirror import credit_drift
from service.app.dodo_gateway import DodoGateway
from service.app.reconciler import RateLimiter, StalePolicy, all_ids, reconcile, stale_ids
from service.domain import decimals
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


async def run_credit_report(settings: Settings) -> int:
    """One JSON line per account of a Dodo-linked credit (our balance, Dodo's, what is still on its way to Dodo,
    the drift), then a summary line. 1 when any account drifts or could not be compared."""
    catalog = load_catalog(settings.catalog_path)
    db = Database.from_url(settings.require_database(), pool_size=4, lock_timeout_ms=settings.lock_timeout_ms)
    dodo = DodoGateway(settings.dodo_payments_api_key, settings.dodo_payments_base_url, settings.dodo_timeout_seconds)
    try:
        report = await credit_drift(db, dodo, catalog, RateLimiter(settings.reconcile_rate_per_minute))
    finally:
        await dodo.close()
        await db.close()
    drifted = failed = 0
    for row in report:
        drift = row.drift
        failed += drift is None
        drifted += drift is not None and drift != 0
        line: dict[str, str] = {
            "customer_id": row.customer_id,
            "credit": row.credit,
            "ours": decimals.decimal_text(row.ours),
            "dodo": "" if row.dodo is None else decimals.decimal_text(row.dodo),
            "unsent": decimals.decimal_text(row.unsent),
            "drift": "" if drift is None else decimals.decimal_text(drift),
        }
        if row.error:
            line["error"] = row.error
        print(json.dumps(line), flush=True)
    print(json.dumps({"checked": len(report), "drifted": drifted, "failed": failed}), flush=True)
    return 1 if drifted or failed else 0
