"""WatchEntitlements benchmarks (issue 13): fan-out lag and the caller-side cache's check cost.

Fan-out: `subscribers` streams (every customer, from now) spread over subscriber processes, while a producer makes
`rate` changes a second through the service (ConsumeCredits of 1 on 100 seeded customers, as a calling service
would). A change is named by (customer, balance after); the producer notes when each was acknowledged, each stream
when its event arrived, and the lag is the difference (one wall clock, one machine). Reported: deliveries, p50/p99/max
lag, and streams cut off as too slow.

Local check: `client.local()` of the Python client, the per-call cost of a CheckAccess answered in-process
(tests/clients/local_check_timing.py), p50 and p99.

Run alone against a running service: `python -m tests.bench.watch fanout --target HOST:PORT --token T` (a service
seeded by tests/bench/seed.py); the harness (tests/bench/harness.py, `make bench`) runs both as rows of its table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from tests.bench.common import CREDIT, customer_id

# The first seeded customers (tests/bench/seed.py: each has a large ai_tokens balance).
ACCOUNTS = 100
HEARTBEAT = pb.ENTITLEMENT_EVENT_KIND_HEARTBEAT
CHANGED = pb.ENTITLEMENT_EVENT_KIND_CREDITS_CHANGED


@dataclass
class FanOut:
    subscribers: int
    rate: float
    seconds: float
    changes: int
    deliveries: int
    expected: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    cut_off: int
    refused_writes: int

    def as_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def _percentile(ordered: list[float], share: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


# --- a subscriber process --------------------------------------------------------------------------------------


async def _subscribe(target: str, token: str, streams: int) -> dict[str, object]:
    """Open `streams` streams, say "ready" once each has caught up, record arrivals until a line on stdin."""
    metadata = (("authorization", f"Bearer {token}"),)
    received: list[list[tuple[str, str, float]]] = [[] for _ in range(streams)]
    watched = {customer_id(n) for n in range(ACCOUNTS)}
    cut = 0
    ready = 0
    all_ready = asyncio.Event()

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.EntitlementServiceStub(channel)

        async def one(index: int) -> None:
            nonlocal cut, ready
            call = stub.WatchEntitlements(pb.WatchEntitlementsRequest(), metadata=metadata)
            got = received[index]
            first = True
            try:
                async for event in call:
                    now = time.time()
                    if first:
                        first = False
                        ready += 1
                        if ready == streams:
                            all_ready.set()
                    if event.kind == CHANGED and event.customer_id in watched:
                        got.append((event.customer_id, event.balance, now))
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    cut += 1
            except asyncio.CancelledError:
                pass

        tasks = [asyncio.create_task(one(i)) for i in range(streams)]
        await asyncio.wait_for(all_ready.wait(), timeout=30)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"received": received, "cut": cut}


# --- the producer and the whole run ------------------------------------------------------------------------------


async def _produce(target: str, token: str, rate: float, seconds: float) -> tuple[dict[tuple[str, str], float], int]:
    """ConsumeCredits through the service at `rate` a second (as a calling service would write): each answer's
    (customer, balance_after) names the change, noted with the time its commit was acknowledged. Also returns how
    many writes the service refused (UNAVAILABLE when its bounded queue was full: it could not keep the rate)."""
    metadata = (("authorization", f"Bearer {token}"),)
    committed: dict[tuple[str, str], float] = {}
    refused = 0
    tick = 0.01
    per_tick = max(1, round(rate * tick))
    run = uuid.uuid4().hex[:8]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.EntitlementServiceStub(channel)

        async def consume(number: int) -> None:
            nonlocal refused
            customer = customer_id(number % ACCOUNTS)
            try:
                answer = await stub.ConsumeCredits(
                    pb.ConsumeCreditsRequest(
                        customer_id=customer, credit=CREDIT, amount="1", idempotency_key=f"watch-{run}-{number}"
                    ),
                    metadata=metadata,
                    timeout=10,
                )
            except grpc.aio.AioRpcError:
                refused += 1
                return
            committed[(customer, answer.balance_after)] = time.time()

        started = time.perf_counter()
        pending: set[asyncio.Task[None]] = set()
        for index in range(int(seconds / tick)):
            for number in range(index * per_tick, (index + 1) * per_tick):
                task = asyncio.create_task(consume(number))
                pending.add(task)
                task.add_done_callback(pending.discard)
            delay = started + (index + 1) * tick - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.gather(*pending, return_exceptions=True)
    return committed, refused


async def fan_out(
    target: str,
    token: str,
    *,
    subscribers: int = 100,
    rate: float = 1000.0,
    seconds: float = 10.0,
    processes: int = 2,
    work_dir: Path,
) -> FanOut:
    """Run the fan-out case against a running service; see the module doc."""
    per = [subscribers // processes + (1 if i < subscribers % processes else 0) for i in range(processes)]
    outs = [work_dir / f"watch-subscriber-{i}.json" for i in range(processes)]
    command = [sys.executable, "-m", "tests.bench.watch", "subscribe", "--target", target, "--token", token]
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 (started once, before anything is measured)
            [*command, "--streams", str(count), "--out", str(out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for count, out in zip(per, outs, strict=True)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.to_thread(proc.stdout.readline)
            if line.strip() != "ready":
                raise RuntimeError(f"a subscriber process did not get ready: {line!r}")
        committed, refused = await _produce(target, token, rate, seconds)
        await asyncio.sleep(3.0)  # the last events arrive
    finally:
        for proc in procs:
            if proc.stdin is not None and proc.poll() is None:
                proc.stdin.write("stop\n")
                proc.stdin.flush()
        for proc in procs:
            await asyncio.to_thread(proc.wait, 60)
    lags: list[float] = []
    deliveries = 0
    cut = 0
    for out in outs:
        if not out.exists():
            continue
        data = json.loads(out.read_text())
        cut += int(data["cut"])
        for stream in data["received"]:
            for customer, balance, at in stream:
                sent = committed.get((customer, balance))
                if sent is not None:
                    deliveries += 1
                    lags.append((at - sent) * 1000)
    lags.sort()
    return FanOut(
        subscribers=subscribers,
        rate=rate,
        seconds=seconds,
        changes=len(committed),
        deliveries=deliveries,
        expected=len(committed) * subscribers,
        p50_ms=_percentile(lags, 0.5),
        p99_ms=_percentile(lags, 0.99),
        max_ms=lags[-1] if lags else None,
        cut_off=cut,
        refused_writes=refused,
    )


def _main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("subscribe")
    s.add_argument("--target", required=True)
    s.add_argument("--token", required=True)
    s.add_argument("--streams", type=int, required=True)
    s.add_argument("--out", type=Path, required=True)
    f = sub.add_parser("fanout")
    f.add_argument("--target", required=True)
    f.add_argument("--token", required=True)
    f.add_argument("--subscribers", type=int, default=100)
    f.add_argument("--rate", type=float, default=1000.0)
    f.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    if args.command == "subscribe":
        args.out.write_text(json.dumps(asyncio.run(_subscribe(args.target, args.token, args.streams))))
        return 0
    result = asyncio.run(
        fan_out(
            args.target,
            args.token,
            subscribers=args.subscribers,
            rate=args.rate,
            seconds=args.seconds,
            work_dir=Path("."),
        )
    )
    print(json.dumps(result.as_json(), indent=2))
    print(" ".join(sys.argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
