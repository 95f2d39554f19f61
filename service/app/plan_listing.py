"""ListPlans: the catalog's plans for a pricing page, with Dodo's price of each product when this service has API
access. Prices are served from memory and refreshed in the background once they are older than `refresh_interval`
(the first ListPlans waits for the first fetch, at most `first_wait` seconds): a pricing page never waits on Dodo
after that, and a Dodo outage shows the last prices known. Nothing is fetched before anyone asks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.app.background import BackgroundTasks
from service.app.dodo_gateway import DodoGateway
from service.domain.catalog import Catalog, Plan
from service.domain.errors import DomainError
from service.domain.values import DodoProduct

log = logging.getLogger("entitlements.plans")


@dataclass(frozen=True, slots=True)
class PricedPlan:
    plan: Plan
    grace_period_days: int  # the plan's, else the catalog's default
    price: DodoProduct | None  # None: not known (no API key, not fetched yet, or not a Dodo product)


class PlanListing:
    def __init__(
        self,
        catalog: Catalog,
        dodo: DodoGateway,
        *,
        refresh_interval: float = 300.0,
        first_wait: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.dodo = dodo
        self.refresh_interval = refresh_interval
        self.first_wait = first_wait
        self._monotonic = monotonic
        self._prices: dict[str, DodoProduct] = {}
        self._fetched_at: float | None = None
        self._tasks: BackgroundTasks | None = None
        self._refreshing: asyncio.Task[None] | None = None

    async def plans(self) -> list[PricedPlan]:
        if self.dodo.configured and self._tasks is not None and self._due():
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = self._tasks.handle("plan-prices", self._refresh_logged())
            if self._fetched_at is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._refreshing), timeout=self.first_wait)
        return [
            PricedPlan(plan, self.catalog.grace_days(key), self._prices.get(key))
            for key, plan in sorted(self.catalog.plans.items())
        ]

    def start(self, tasks: BackgroundTasks) -> None:
        self._tasks = tasks

    def _due(self) -> bool:
        return self._fetched_at is None or self._monotonic() - self._fetched_at >= self.refresh_interval

    async def refresh(self) -> None:
        products = await self.dodo.list_products()
        self._prices = {product.product_id: product for product in products}
        self._fetched_at = self._monotonic()
        missing = sorted(set(self.catalog.plans) - set(self._prices))
        if missing:
            log.warning("plans.not_at_dodo", extra={"product_ids": ",".join(missing)[:500]})

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except DomainError as error:
            log.warning("plans.refresh_failed", extra={"why": error.message})
