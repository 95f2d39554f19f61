"""The RPC families kept in plain integers render exactly as prometheus_client's own Counter and Histogram would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from service.app.metrics import _LATENCY_BUCKETS, Metrics

# On the bucket bounds themselves (inclusive upper bounds), between them, and above the last.
OBSERVED = [
    ("CheckAccess", "OK", 0.0001),
    ("CheckAccess", "OK", 0.00005),
    ("CheckAccess", "OK", 0.0003),
    ("CheckAccess", "OK", 1.0),
    ("CheckAccess", "INVALID_ARGUMENT", 0.002),
    ("ConsumeCredits", "OK", 12.5),
    ("ConsumeCredits", "UNAVAILABLE", 0.25),
]


def _reference() -> bytes:
    registry = CollectorRegistry()
    requests = Counter(
        "entitlements_rpc_requests", "gRPC calls by method and status code", ["method", "code"], registry=registry
    )
    duration = Histogram(
        "entitlements_rpc_duration_seconds",
        "gRPC call latency in the server, by method and status code",
        ["method", "code"],
        buckets=_LATENCY_BUCKETS,
        registry=registry,
    )
    for method, code, seconds in sorted(OBSERVED):
        requests.labels(method, code).inc()
        duration.labels(method, code).observe(seconds)
    return generate_latest(registry)


def _rpc_lines(text: bytes) -> list[str]:
    # prometheus_client's own families also carry `_created` samples (wall-clock times): not comparable.
    return [
        line
        for line in text.decode().splitlines()
        if line.startswith(("entitlements_rpc_", "# TYPE entitlements_rpc_", "# HELP entitlements_rpc_"))
        and "_created" not in line
    ]


def test_rpc_counts_and_latency_histograms_render_like_prometheus_clients_own() -> None:
    metrics = Metrics()
    for method, code, seconds in OBSERVED:
        metrics.observe_rpc(method, code, seconds)
    assert sorted(_rpc_lines(metrics.render())) == sorted(_rpc_lines(_reference()))


def test_the_bound_recorder_of_a_method_counts_into_the_same_families() -> None:
    metrics = Metrics()
    check = metrics.rpc.method("CheckAccess")
    check.ok.observe(0.0002)
    check.code("NOT_FOUND").observe(0.003)
    text = metrics.render().decode()
    assert 'entitlements_rpc_requests_total{code="OK",method="CheckAccess"} 1.0' in text
    assert 'entitlements_rpc_requests_total{code="NOT_FOUND",method="CheckAccess"} 1.0' in text
    assert 'entitlements_rpc_duration_seconds_bucket{code="OK",le="0.00025",method="CheckAccess"} 1.0' in text
    assert 'entitlements_rpc_duration_seconds_bucket{code="OK",le="0.0001",method="CheckAccess"} 0.0' in text
