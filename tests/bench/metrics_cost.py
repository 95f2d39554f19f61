"""What the RPC metrics cost per call: the guard interceptor around a no-op handler, with and without them.

`.venv/bin/python -m tests.bench.metrics_cost` prints µs per call; compare with the service CPU per CheckAccess
(`make bench`, column srv µs/call) for the share metrics take of the hot path (the target is at most 3%).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from service.app.metrics import Metrics
from service.grpc.interceptors import ErrorInterceptor

CALLS = 200_000


async def _echo(request: Any, context: Any) -> Any:
    return request


class _Details:
    method = "/entitlements.v1.EntitlementService/CheckAccess"
    invocation_metadata = ()


async def per_call_us(metrics: Metrics | None) -> float:
    handler: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(_echo)

    async def continuation(details: Any) -> Any:
        return handler

    guarded = await ErrorInterceptor(metrics).intercept_service(continuation, _Details())  # type: ignore[arg-type]
    assert guarded is not None
    call: Any = guarded.unary_unary
    for _ in range(1000):
        await call(1, None)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(CALLS):
            await call(1, None)
        best = min(best, (time.perf_counter() - started) / CALLS)
    return best * 1e6


async def main() -> None:
    without, with_metrics = await per_call_us(None), await per_call_us(Metrics())
    print(f"guard without metrics: {without:.2f} µs/call; with metrics: {with_metrics:.2f} µs/call")
    print(f"metrics cost: {with_metrics - without:.2f} µs per call (best of 5 × {CALLS} calls)")
    print("command: .venv/bin/python -m tests.bench.metrics_cost")


if __name__ == "__main__":
    asyncio.run(main())
