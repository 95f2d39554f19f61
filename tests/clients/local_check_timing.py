"""The local cache's check cost in the caller (issue 13, `make bench`): a timing loop over cache hits, reusable by
tests/bench. Each sample is one `check_access` call answered from memory, timed with perf_counter_ns."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from entitlements_client import LocalEntitlements, SyncLocalEntitlements


@dataclass(frozen=True)
class LocalCheckCost:
    calls: int
    p50_ns: float
    p99_ns: float
    mean_ns: float
    # Hits the cache counted during the loop: equal to `calls` when every call was answered from memory.
    hits: int


def _summary(samples: list[int], hits: int) -> LocalCheckCost:
    ordered = sorted(samples)
    return LocalCheckCost(
        calls=len(ordered),
        p50_ns=float(ordered[len(ordered) // 2]),
        p99_ns=float(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]),
        mean_ns=statistics.fmean(ordered),
        hits=hits,
    )


async def time_local_checks(
    local: LocalEntitlements, customer_id: str, feature: str, calls: int = 100_000
) -> LocalCheckCost:
    """Per-call cost of `await local.check_access(customer_id, feature)` once cached (the cache must be live)."""
    await local.check_access(customer_id, feature)  # fill
    hits = local.stats().hits
    samples = [0] * calls
    clock = time.perf_counter_ns
    check = local.check_access
    for index in range(calls):
        started = clock()
        await check(customer_id, feature)
        samples[index] = clock() - started
    return _summary(samples, local.stats().hits - hits)


def time_sync_local_checks(
    local: SyncLocalEntitlements, customer_id: str, feature: str, calls: int = 100_000
) -> LocalCheckCost:
    """The same for the blocking cache (its lock included)."""
    local.check_access(customer_id, feature)
    hits = local.stats().hits
    samples = [0] * calls
    clock = time.perf_counter_ns
    check = local.check_access
    for index in range(calls):
        started = clock()
        check(customer_id, feature)
        samples[index] = clock() - started
    return _summary(samples, local.stats().hits - hits)
