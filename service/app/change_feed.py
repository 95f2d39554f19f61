"""After a write commits: forget the changed customers in this process's cache at once, and have the other
replicas forget them too.

Write transactions record the changed customers in the `entitlement_changes` table (atomically with the change);
the publisher here turns committed rows into Postgres notices in its own small transactions, right after a local
commit and, as a sweep, every second (rows written by another process, such as the reconcile CLI, or left by a
process that died between its commit and its publish).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from service.app.background import BackgroundTasks, wait_for_event
from service.app.entitlement_cache import EntitlementCache
from storage.engine import Database
from storage.errors import is_database_unavailable
from storage.repositories.changes import publish_changes

log = logging.getLogger("entitlements.changes")

_BATCH = 1000


class ChangeFeed:
    def __init__(self, db: Database, cache: EntitlementCache | None = None, *, sweep_interval: float = 1.0) -> None:
        self.db = db
        self.cache = cache
        self.sweep_interval = sweep_interval
        self._wake = asyncio.Event()
        self._after_commit: list[Callable[[], None]] = []

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every local commit of a change (the watch log's sequencer wakes on it)."""
        self._after_commit.append(callback)

    def committed(self, *customer_ids: str, balances_only: bool = False) -> None:
        if self.cache is not None:
            for customer_id in customer_ids:
                self.cache.invalidate(customer_id, balances_only=balances_only)
        if customer_ids:
            self._wake.set()
            for callback in self._after_commit:
                callback()

    def refs_changed(self, *customer_refs: str) -> None:
        """A link of these refs committed: forget their resolution here at once, and have the notices sent."""
        if self.cache is not None:
            for customer_ref in customer_refs:
                self.cache.invalidate_ref(customer_ref)
        if customer_refs:
            self._wake.set()
            for callback in self._after_commit:
                callback()

    def start(self, tasks: BackgroundTasks) -> None:
        tasks.spawn("entitlement-change-publisher", self._run())

    async def publish(self) -> int:
        """Publish everything committed so far; returns how many change rows went out."""
        total = 0
        while True:
            async with self.db.connection() as connection:
                sent = await publish_changes(connection, _BATCH)
            total += sent
            if sent < _BATCH:
                return total

    async def _run(self) -> None:
        while True:
            await wait_for_event(self._wake, self.sweep_interval)
            self._wake.clear()
            try:
                await self.publish()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not is_database_unavailable(error):
                    log.exception("changes.publish_failed")
                # Rows stay in the table; the next wake-up or sweep sends them.
                await asyncio.sleep(self.sweep_interval)
