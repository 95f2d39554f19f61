"""Prometheus metrics (DESIGN §14): one registry per running service, rendered at `GET /metrics`.

Each family's name says its subject (`entitlements_rpc_…`, `_webhook_…`, `_cache_…`, `_credit_…`, `_dodo_…`,
`_outbox_…`, `_pool_…`). Counts the hot path already keeps (cache hits, pool use) are read when scraped rather than
counted twice. The RPC families are kept by `RpcRecorder`: plain integers per method and code, touched only on the
event loop's thread, and turned into Prometheus families when scraped, so a call pays a few list increments instead
of prometheus_client's locked counter and histogram (two lock round trips and a bucket scan in Python).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from storage.engine import Database

# From the 0.1 ms of a cached CheckAccess to the seconds a Dodo call may take.
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class RpcCode:
    """One method's calls that ended with one code: count, summed seconds and per-bucket counts (not cumulative;
    the last one is +Inf). Single-threaded by design: only the event loop's thread observes and scrapes."""

    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.buckets = [0] * (len(_LATENCY_BUCKETS) + 1)

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        # Prometheus buckets are upper bounds, inclusive: the first bound >= seconds.
        self.buckets[bisect_left(_LATENCY_BUCKETS, seconds)] += 1


class RpcMethod:
    """One method's figures by code; `ok` is bound up front, the code nearly every call ends with."""

    __slots__ = ("by_code", "ok")

    def __init__(self) -> None:
        self.ok = RpcCode()
        self.by_code: dict[str, RpcCode] = {"OK": self.ok}

    def code(self, code: str) -> RpcCode:
        found = self.by_code.get(code)
        if found is None:
            found = self.by_code[code] = RpcCode()
        return found


class RpcRecorder(Collector):
    """`entitlements_rpc_requests` (counter) and `entitlements_rpc_duration_seconds` (histogram) by method and
    code, counted in plain integers and rendered when scraped."""

    def __init__(self) -> None:
        self._methods: dict[str, RpcMethod] = {}

    def method(self, name: str) -> RpcMethod:
        found = self._methods.get(name)
        if found is None:
            found = self._methods[name] = RpcMethod()
        return found

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily(
            "entitlements_rpc_requests", "gRPC calls by method and status code", labels=["method", "code"]
        )
        duration = HistogramMetricFamily(
            "entitlements_rpc_duration_seconds",
            "gRPC call latency in the server, by method and status code",
            labels=["method", "code"],
        )
        # As prometheus_client's Histogram writes them (`le="0.0001"`, `le="1.0"`).
        bounds = [repr(float(bound)) for bound in _LATENCY_BUCKETS] + ["+Inf"]
        for name, method in sorted(self._methods.items()):
            for code, figures in sorted(method.by_code.items()):
                if not figures.count:
                    continue
                requests.add_metric([name, code], figures.count)
                cumulative, running = [], 0
                for bound, count in zip(bounds, figures.buckets, strict=True):
                    running += count
                    cumulative.append((bound, running))
                duration.add_metric([name, code], cumulative, figures.total)
        yield from (requests, duration)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.rpc = RpcRecorder()
        registry.register(self.rpc)
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

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """One finished call (the hot path binds `rpc.method(name)` once instead)."""
        self.rpc.method(method).code(code).observe(seconds)

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


class WatchCollector(Collector):
    """WatchEntitlements in this process (service/app/watch_hub.py), read when scraped."""

    def __init__(self, figures: Callable[[], Mapping[str, int]]) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Any]:
        figures = self._figures()
        streams = GaugeMetricFamily("entitlements_watch_streams", "open WatchEntitlements streams")
        streams.add_metric([], figures["streams"])
        position = GaugeMetricFamily("entitlements_watch_position", "the last watch log position read by this process")
        position.add_metric([], figures["position"])
        cut = CounterMetricFamily(
            "entitlements_watch_streams_cut", "streams ended because their reader fell too far behind"
        )
        cut.add_metric([], figures["cut"])
        yield from (streams, position, cut)
