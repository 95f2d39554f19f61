"""Minimal reproductions: what grpc.aio itself charges per call for the things a real server has and the bare
identity echo lacks (registered methods, interceptors, more services, protobuf, an `async def` servicer).

Each variant is the identity echo of tests/bench/echo.py plus one thing (or, `ours_nowork`, the service's whole
server shape with a handler that does nothing); all run in their own process, loaded by h2load with the same body
(the bench's CheckAccess request, bearer token header included), alternating variants round by round. Requests/s
and the CPU per call of the server's main thread (the event loop) are printed per variant, with the ratio to the
bare echo of the same round (median over rounds).

    python -m tests.bench.grpc_overhead [--rounds 3] [--duration 4] [--in-flight 16] [--variants a,b]
    python -m tests.bench.grpc_overhead --serve VARIANT --port P     (one server; what the runner spawns)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import uvloop
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from tests.bench import h2load
from tests.bench.common import AUTH_HEADER, BENCH_CALLERS, CHECK_ACCESS, FEATURE, customer_id
from tests.bench.echo import CHECK_ACCESS_BYTES, CHECK_ACCESS_RESPONSE, SERVICE, identity, identity_handler
from tests.bench.procs import REPO_ROOT, free_port

VARIANTS = {
    "bare": "identity echo, one generic handler (the ceiling)",
    "registered": "identity echo registered with add_registered_method_handlers (as generated code does)",
    "interceptor": "identity echo + one pass-through interceptor",
    "interceptors2": "identity echo + two pass-through interceptors",
    "wrapped": "identity echo + an interceptor that wraps the handler in an async def (as ours do)",
    "protobuf": "protobuf echo: requests parsed, responses serialized",
    "servicer": "the generated servicer (protobuf, registered methods, health-free): our service's shape, no work",
    "servicer_intercepted": "the generated servicer + one pass-through interceptor",
    "protobuf_intercepted": "protobuf echo (generic handler) + one pass-through interceptor",
    "ours_nowork": "the service's server shape, no work: generated servicer answering a constant, health, "
    "reflection, and our AuthInterceptor (the bench's caller) + ErrorInterceptor (metrics on)",
    "ours_nowork_noint": "the same without the two interceptors",
    "work10": "identity echo whose handler spends 10 µs of pure Python (measured in a tight loop) per call",
    "work20": "identity echo whose handler spends 20 µs of pure Python (measured in a tight loop) per call",
}
# Iterations of `_spin` that take one µs in a tight loop on this machine: calibrated at the server's start.
_SPIN_PER_US = [1]


def _spin(iterations: int) -> int:
    total = 0
    for number in range(iterations):
        total += number
    return total


def _calibrate() -> None:
    rounds = 20_000
    started = time.perf_counter()
    _spin(rounds)
    _SPIN_PER_US[0] = max(1, round(rounds / ((time.perf_counter() - started) * 1e6)))


Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]]"


class PassThrough(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        return await continuation(handler_call_details)


class Wrapping(grpc.aio.ServerInterceptor):
    """Returns a cached handler whose behaviour awaits the original one (the shape of our guard)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        found = self._cache.get(handler_call_details.method)
        if found is None or found[0] is not handler:
            inner = handler.unary_unary
            assert inner is not None

            async def wrapped(request: Any, context: Any) -> Any:
                return await inner(request, context)

            found = (
                handler,
                grpc.unary_unary_rpc_method_handler(
                    wrapped,
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                ),
            )
            self._cache[handler_call_details.method] = found
        return found[1]


class NoWorkServicer(pb_grpc.EntitlementServiceServicer):
    async def CheckAccess(self, request: pb.CheckAccessRequest, context: Any) -> pb.CheckAccessResponse:
        return CHECK_ACCESS_RESPONSE


async def _check_access_bytes(request: bytes, context: Any) -> bytes:
    return CHECK_ACCESS_BYTES


def _working(micros: int) -> Callable[[bytes, Any], Awaitable[bytes]]:
    async def work(request: bytes, context: Any) -> bytes:
        _spin(_SPIN_PER_US[0] * micros)
        return CHECK_ACCESS_BYTES

    return work


async def serve(variant: str, port: int) -> None:
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if variant == "ours_nowork":
        from service.app.metrics import Metrics
        from service.grpc.interceptors import AuthInterceptor, ErrorInterceptor, parse_callers

        interceptors = [AuthInterceptor(parse_callers(BENCH_CALLERS)), ErrorInterceptor(Metrics())]
    if variant in ("interceptor", "servicer_intercepted", "protobuf_intercepted"):
        interceptors = [PassThrough()]
    elif variant == "interceptors2":
        interceptors = [PassThrough(), PassThrough()]
    elif variant == "wrapped":
        interceptors = [Wrapping()]
    server = grpc.aio.server(interceptors=interceptors or None, options=[("grpc.so_reuseport", 0)])
    if variant == "registered":
        handler = grpc.unary_unary_rpc_method_handler(
            _check_access_bytes, request_deserializer=identity, response_serializer=identity
        )
        server.add_registered_method_handlers(SERVICE, {"CheckAccess": handler})
    elif variant in ("ours_nowork", "ours_nowork_noint"):
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        from service.grpc import reflection

        pb_grpc.add_EntitlementServiceServicer_to_server(NoWorkServicer(), server)  # type: ignore[abstract]
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        reflection.enable(server, (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    elif variant in ("servicer", "servicer_intercepted"):
        # The other methods stay the generated base class's UNIMPLEMENTED ones (its stub marks them abstract).
        pb_grpc.add_EntitlementServiceServicer_to_server(NoWorkServicer(), server)  # type: ignore[abstract]
    elif variant.startswith("work"):
        _calibrate()
        handler = grpc.unary_unary_rpc_method_handler(
            _working(int(variant.removeprefix("work"))), request_deserializer=identity, response_serializer=identity
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"CheckAccess": handler}),))
    elif variant in ("protobuf", "protobuf_intercepted"):
        from tests.bench.echo import generic_handler

        server.add_generic_rpc_handlers((generic_handler(),))
    else:
        server.add_generic_rpc_handlers((identity_handler(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def _cpu_seconds(pid: int) -> float:
    """The main thread's CPU: the event loop, where grpc.aio's Python-side work and ours run (the process's other
    threads are grpc's poller and event engine)."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(pid: int, port: int, body: Path, in_flight: int, duration: float, log: Path) -> tuple[float, float]:
    """(requests/s, server CPU µs per call) over h2load's main phase."""
    marks: list[float] = []

    def on_window(opening: bool) -> None:
        marks.append(_cpu_seconds(pid))

    load = await h2load.run(
        port=port,
        path=CHECK_ACCESS,
        body_file=body,
        in_flight=in_flight,
        warmup=0.5,
        duration=duration,
        log_file=log,
        on_window=on_window,
        headers=(AUTH_HEADER,),
    )
    cpu = (marks[1] - marks[0]) * 1e6 / max(1, load.ok)
    return load.requests_per_second, cpu


def spawn(variants: list[str]) -> dict[str, tuple[subprocess.Popen[bytes], int]]:
    """One server process per variant, each answering once it listens."""
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for variant in variants:
            port = free_port()
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.bench.grpc_overhead", "--serve", variant, "--port", str(port)],
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
            )
            servers[variant] = (process, port)
            assert process.stdout is not None
            if process.stdout.readline().strip() != b"ready":
                raise SystemExit(f"{variant}: did not start")
    except BaseException:
        stop(servers)
        raise
    return servers


def stop(servers: dict[str, tuple[subprocess.Popen[bytes], int]]) -> None:
    for process, _ in servers.values():
        process.terminate()
        process.wait(10)


async def run(
    servers: dict[str, tuple[subprocess.Popen[bytes], int]], rounds: int, duration: float, in_flight: int
) -> None:
    variants = list(servers)
    work = Path(tempfile.mkdtemp(prefix="grpc-overhead-"))
    body = work / "body.bin"
    request = pb.CheckAccessRequest(customer_id=customer_id(0), feature=FEATURE)
    body.write_bytes(h2load.grpc_frame(request.SerializeToString()))
    rates: dict[str, list[float]] = {v: [] for v in variants}
    cpus: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    for number in range(rounds):
        order = variants if number % 2 == 0 else list(reversed(variants))
        for variant in order:
            process, port = servers[variant]
            rate, cpu = await _measure(process.pid, port, body, in_flight, duration, work / f"{variant}.log")
            rates[variant].append(rate)
            cpus[variant].append(cpu)
        for variant in variants:
            ratios[variant].append(rates[variant][-1] / rates["bare"][-1])
    command = " ".join(["python -m tests.bench.grpc_overhead", *sys.argv[1:]])
    print(f"$ {command}    ({time.strftime('%Y-%m-%d %H:%M')}, h2load at {in_flight} in flight, {rounds} rounds)")
    print(f"{'variant':20} {'req/s':>8} {'main µs/call':>12} {'× bare':>7}  what (medians; × bare per round)")
    for variant in variants:
        each = " ".join(f"{ratio:.2f}" for ratio in ratios[variant])
        print(
            f"{variant:20} {statistics.median(rates[variant]):8.0f} {statistics.median(cpus[variant]):12.0f} "
            f"{statistics.median(ratios[variant]):7.2f}  {VARIANTS[variant]} ({each})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.grpc_overhead")
    parser.add_argument("--serve", choices=sorted(VARIANTS))
    parser.add_argument("--port", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve(args.serve, args.port))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "bare" not in variants:
        parser.error(f"variants must include bare and be among {', '.join(VARIANTS)}")
    servers = spawn(variants)
    try:
        uvloop.run(run(servers, args.rounds, args.duration, args.in_flight))
    finally:
        stop(servers)


if __name__ == "__main__":
    main()
