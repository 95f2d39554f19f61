"""Prometheus metrics (DESIGN §14): one registry per running service, rendered at `GET /metrics`.

Each family's name says its subject (`entitlements_rpc_…`, `_webhook_…`, `_cache_…`, `_credit_…`, `_dodo_…`,
`_outbox_…`, `_pool_…`). Counts the hot path already keeps (cache hits, pool use) are read when scraped rather than
counted twice; what is counted per call is cached per label set, so CheckAccess pays two lock-free-ish increments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from storage.engine import Database

# From the 0.1 ms of a cached CheckAccess to the seconds a Dodo call may take.
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.rpc_requests = Counter(
            "entitlements_rpc_requests", "gRPC calls by method and status code", ["method", "code"], registry=registry
        )
        self.rpc_duration = Histogram(
            "entitlements_rpc_duration_seconds",
            "gRPC call latency in the server, by method and status code",
            ["method", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.webhook_deliveries = Counter(
            "entitlements_webhook_deliveries",
            "Dodo webhook deliveries by event type and outcome (applied, stale, duplicate, malformed, rejected, ...)",
            ["type", "outcome"],
            registry=registry,
        )
        self.webhook_unknown_products = Counter(
            "entitlements_webhook_unknown_products",
            "subscription webhooks for a product missing from the catalog (its customer gets no plan features)",
            ["product_id"],
            registry=registry,
        )
        self.credit_batch_size = Histogram(
            "entitlements_credit_batch_size",
            "ConsumeCredits requests decided in one transaction",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )
        self.dodo_requests = Counter(
            "entitlements_dodo_requests",
            "Dodo API calls by endpoint and HTTP status (timeout, unreachable when there is none)",
            ["endpoint", "status"],
            registry=registry,
        )
        self.dodo_duration = Histogram(
            "entitlements_dodo_request_duration_seconds",
            "Dodo API call latency by endpoint",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.outbox_backlog = Gauge(
            "entitlements_outbox_backlog",
            "rows waiting in an outbox to be sent to Dodo, by kind",
            ["kind"],
            registry=registry,
        )
        self._rpc: dict[tuple[str, str], tuple[Any, Any]] = {}

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        children = self._rpc.get((method, code))
        if children is None:
            children = (self.rpc_requests.labels(method, code), self.rpc_duration.labels(method, code))
            self._rpc[(method, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def watch(self, collector: Collector) -> None:
        """Add a collector read at scrape time (cache and pool figures the hot path keeps anyway)."""
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CacheCollector(Collector):
    """The CheckAccess cache's own counters, read when scraped."""

    def __init__(self, figures: Callable[[], Mapping[str, int]]) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Any]:
        figures = self._figures()
        hits = CounterMetricFamily("entitlements_cache_hits", "CheckAccess/ConsumeCredits lookups served from memory")
        hits.add_metric([], figures["hits"])
        misses = CounterMetricFamily("entitlements_cache_misses", "lookups that read Postgres")
        misses.add_metric([], figures["misses"])
        size = GaugeMetricFamily("entitlements_cache_entries", "entries cached, by kind", labels=["kind"])
        size.add_metric(["customer"], figures["customers"])
        size.add_metric(["unknown"], figures["unknown"])
        yield from (hits, misses, size)


class PoolCollector(Collector):
    """Connections in use and each budget's size (storage/engine.py Budget), read when scraped."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def collect(self) -> Iterator[Any]:
        used = GaugeMetricFamily(
            "entitlements_pool_connections_in_use", "pooled Postgres connections in use, by budget", labels=["budget"]
        )
        for budget, count in self._db.in_use().items():
            used.add_metric([budget.value], count)
        size = GaugeMetricFamily(
            "entitlements_pool_connections_budget", "the share of the pool each budget may use", labels=["budget"]
        )
        for budget, count in self._db.budgets.items():
            size.add_metric([budget.value], count)
        yield from (used, size)
