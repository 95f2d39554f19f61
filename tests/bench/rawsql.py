"""The ConsumeCredits hot-customer baseline: what Postgres itself does with one hot row.

N asyncpg connections (as many as the hot case has calls in flight), each looping the single-row conditional UPDATE
in autocommit on one dedicated credit_balances row. Commits on one row serialize, so this is the ceiling a
one-transaction-per-call design can reach on this machine.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import asyncpg

from tests.bench.common import CREDIT, RAW_UPDATE_CUSTOMER, LoadResult

UPDATE = "UPDATE credit_balances SET balance = balance - 1 WHERE customer_id = $1 AND credit = $2 AND balance >= 1"


async def update_loop(
    url: str, connections: int, warmup: float, duration: float, on_window: Callable[[bool], None]
) -> LoadResult:
    """`on_window(True)` is called when the measurement window opens and `on_window(False)` when it closes."""
    pool = [await asyncpg.connect(url) for _ in range(connections)]
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    counted = 0
    try:
        start = time.perf_counter()
        begin, end = start + warmup, start + warmup + duration

        async def loop(connection: asyncpg.Connection) -> None:
            nonlocal counted
            while True:
                began = time.perf_counter()
                if began >= end:
                    return
                try:
                    # execute() with arguments goes through asyncpg's prepared-statement cache.
                    status = await connection.execute(UPDATE, RAW_UPDATE_CUSTOMER, CREDIT)
                except asyncpg.PostgresError as error:
                    errors[type(error).__name__] += 1
                    continue
                done = time.perf_counter()
                if status != "UPDATE 1":
                    errors["no row updated"] += 1
                elif begin <= done <= end:
                    counted += 1
                    latencies.append((done - began) * 1e6)

        async def windows() -> None:
            await asyncio.sleep(warmup)
            on_window(True)
            await asyncio.sleep(duration)
            on_window(False)

        await asyncio.gather(windows(), *(loop(connection) for connection in pool))
        rows = await pool[0].fetchval(
            "SELECT count(*) FROM credit_balances WHERE customer_id = $1 AND credit = $2", RAW_UPDATE_CUSTOMER, CREDIT
        )
        if rows != 1:
            errors["row missing"] += 1
    finally:
        for connection in pool:
            await connection.close()
    latencies.sort()
    return LoadResult(counted / duration, counted, latencies, dict(errors), duration)
