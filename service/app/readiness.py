"""Readiness: Postgres answers and its schema is the one this build was written for. `/readyz` and the gRPC
health service both report it (DESIGN §14), so a load balancer sees the same truth on either port."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from service.app.background import BackgroundTasks
from service.domain.errors import ConfigurationError
from storage.engine import Budget, Database
from storage.errors import is_database_unavailable

log = logging.getLogger("entitlements.readiness")

PROBE_TIMEOUT_SECONDS = 2.0


class Readiness:
    def __init__(self, db: Database, head: str, *, interval: float = 1.0) -> None:
        self.db = db
        self.head = head
        self.interval = interval
        self.ready = False

    async def problem(self) -> str | None:
        """Why the service is not ready right now, or None when it is. Uses the probe's own connection budget,
        so a saturated pool cannot make a healthy replica look dead (or the other way round)."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_SECONDS), self.db.connection(Budget.PROBE) as connection:
                version = await connection.fetchval("SELECT max(version_num) FROM alembic_version")
        except Exception as error:
            if is_database_unavailable(error):
                return "storage unavailable"
            if type(error).__name__ == "UndefinedTableError":
                return f"database schema is not migrated (this build needs {self.head})"
            raise
        if version != self.head:
            return f"database schema is at {version}, this build needs {self.head}"
        return None

    async def require_schema(self) -> None:
        """At start: refuse to serve a database whose schema is not at head. An unreachable database is not a
        reason to refuse (the service starts not ready and degrades); a wrong schema is."""
        problem = await self.problem()
        if problem is None:
            self.ready = True
        elif problem == "storage unavailable":
            log.warning("readiness.storage_unavailable_at_start")
        else:
            raise ConfigurationError(f"{problem}: run `python -m service migrate`")

    def start(self, tasks: BackgroundTasks, on_change: Callable[[bool], Awaitable[None]]) -> None:
        tasks.spawn("readiness-probe", self._watch(on_change))

    async def _watch(self, on_change: Callable[[bool], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                problem = await self.problem()
            except Exception:
                log.exception("readiness.probe_failed")
                problem = "probe failed"
            ready = problem is None
            if ready != self.ready:
                log.warning("readiness.changed", extra={"ready": ready, "why": problem or "ok"})
                self.ready = ready
                await on_change(ready)
