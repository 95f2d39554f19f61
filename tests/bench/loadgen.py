"""Multi-process Python load generators: gRPC unary calls with per-call bodies, and signed webhook posts.

Worker processes are spawned once per bench run and kept: each runs one uvloop event loop for its whole life and
takes jobs over a pipe. A job is two-phase so that all workers measure the same window: the worker prepares (connects,
builds its request bodies) and answers "ready"; the parent then sends a wall-clock start time; load runs from
there, and only calls that complete inside [start + warmup, start + warmup + duration] are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import aiohttp
import grpc
import uvloop
from entitlements.v1 import entitlements_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp
from standardwebhooks.webhooks import Webhook

from tests.bench.common import (
    CHECK_ACCESS,
    CONSUME_CREDITS,
    CREDIT,
    RECORD_USAGE,
    USAGE_EVENT_NAME,
    customer_id,
)

READY = "ready"


@dataclass(frozen=True)
class Window:
    warmup: float
    duration: float


@dataclass(frozen=True)
class GrpcJob:
    """`method` is "CheckAccess", "ConsumeCredits" or "RecordUsage"; `hot` pins every call to one customer, else
    uniform random. RecordUsage sends `events` events a call, with event ids `{tag}-{call}-{i}` (distinct per run
    as long as the tag is)."""

    method: str
    port: int
    concurrency: int
    customers: int
    hot: int | None
    feature: str
    window: Window
    seed: int
    events: int = 1
    tag: str = ""
    # Sent with every call: the bearer token of the bench's caller (the service runs with callers configured).
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class WalkJob:
    """CheckAccess once for each of `indices` (filling any per-customer cache), until done or `budget` seconds."""

    port: int
    concurrency: int
    indices: list[int]
    feature: str
    budget: float
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class WebhookJob:
    """Distinct signed subscription events: a new subscription for a random existing customer each."""

    url: str
    secret: str
    concurrency: int
    customers: int
    tag: str
    events: int
    window: Window
    seed: int


Job = GrpcJob | WalkJob | WebhookJob


@dataclass
class WorkerResult:
    ok_in_window: int = 0
    ok_total: int = 0
    latencies_us: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    # Webhooks: every acknowledged webhook-id (warm-up included), for the durability check.
    acked: list[str] = field(default_factory=list)
    # Whether the worker ran out of prepared work before the window closed, and when it stopped (wall clock).
    exhausted: bool = False
    finished_at: float = 0.0
    # RecordUsage: events the service answered as accepted (inside the window, and in all, warm-up included), and
    # events it answered as duplicates.
    events_in_window: int = 0
    events_total: int = 0
    duplicates: int = 0


class _Meter:
    """Counts completions; keeps latencies of those that complete inside the window (perf_counter clock)."""

    def __init__(self, start_wall: float, window: Window) -> None:
        offset = time.time() - time.perf_counter()
        self.begin = start_wall + window.warmup - offset
        self.end = self.begin + window.duration
        self.start = start_wall - offset
        self.offset = offset
        self.result = WorkerResult()
        self.errors: Counter[str] = Counter()

    def ok(self, began: float, done: float, events: int = 0) -> None:
        self.result.ok_total += 1
        self.result.events_total += events
        if self.begin <= done <= self.end:
            self.result.ok_in_window += 1
            self.result.events_in_window += events
            self.result.latencies_us.append((done - began) * 1e6)

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def finish(self) -> WorkerResult:
        self.result.errors = dict(self.errors)
        self.result.finished_at = time.time()
        return self.result


async def _sleep_until(wall: float) -> None:
    await asyncio.sleep(max(0.0, wall - time.time()))


Counted = Callable[[Any], tuple[int, int]]
"""From a response: (events accepted, events answered as duplicates); RecordUsage only."""


def _request_factory(job: GrpcJob) -> tuple[str, Callable[[], bytes], Any, Counted | None]:
    rng = random.Random(job.seed)
    if job.method == "CheckAccess":

        def check() -> bytes:
            index = job.hot if job.hot is not None else rng.randrange(job.customers)
            return pb.CheckAccessRequest(customer_id=customer_id(index), feature=job.feature).SerializeToString()

        return CHECK_ACCESS, check, pb.CheckAccessResponse.FromString, None

    if job.method == "RecordUsage":
        calls = 0

        def record() -> bytes:
            nonlocal calls
            index = job.hot if job.hot is not None else rng.randrange(job.customers)
            number, calls = calls, calls + 1
            now = Timestamp()
            now.GetCurrentTime()
            request = pb.RecordUsageRequest(customer_id=customer_id(index))
            for i in range(job.events):
                event = request.events.add(event_id=f"{job.tag}-{number}-{i}", event_name=USAGE_EVENT_NAME)
                event.timestamp.CopyFrom(now)
                event.properties["tokens"].number_value = 1 + (number + i) % 100
                event.properties["model"].string_value = "bench-small"
            return request.SerializeToString()

        def counted(response: pb.RecordUsageResponse) -> tuple[int, int]:
            return response.accepted, response.duplicates

        return RECORD_USAGE, record, pb.RecordUsageResponse.FromString, counted

    def consume() -> bytes:
        index = job.hot if job.hot is not None else rng.randrange(job.customers)
        return pb.ConsumeCreditsRequest(
            customer_id=customer_id(index), credit=CREDIT, amount="1", idempotency_key=uuid.uuid4().hex
        ).SerializeToString()

    return CONSUME_CREDITS, consume, pb.ConsumeCreditsResponse.FromString, None


async def _grpc(job: GrpcJob, conn: Connection) -> WorkerResult:
    path, make, parse, counted = _request_factory(job)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{job.port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        # Bodies are serialized by the factory (per call, as a caller would), so the stub passes bytes through.
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, Any] = channel.unary_unary(
            path, request_serializer=None, response_deserializer=parse
        )
        metadata = job.metadata or None
        conn.send(READY)
        start_wall: float = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        meter = _Meter(start_wall, job.window)
        await _sleep_until(start_wall)

        async def loop() -> None:
            while True:
                began = time.perf_counter()
                if began >= meter.end:
                    return
                try:
                    response = await call(make(), metadata=metadata)
                except grpc.aio.AioRpcError as error:
                    meter.error(error.code().name)
                    continue
                done = time.perf_counter()
                if counted is None:
                    meter.ok(began, done)
                    continue
                accepted, duplicates = counted(response)
                meter.result.duplicates += duplicates
                meter.ok(began, done, accepted)

        await asyncio.gather(*(loop() for _ in range(job.concurrency)))
    return meter.finish()


async def _walk(job: WalkJob, conn: Connection) -> WorkerResult:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{job.port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        call = channel.unary_unary(
            CHECK_ACCESS,
            request_serializer=pb.CheckAccessRequest.SerializeToString,
            response_deserializer=pb.CheckAccessResponse.FromString,
        )
        conn.send(READY)
        start_wall: float = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        meter = _Meter(start_wall, Window(0.0, job.budget))
        await _sleep_until(start_wall)
        pending = iter(job.indices)

        async def loop() -> None:
            for index in pending:
                began = time.perf_counter()
                if began >= meter.end:
                    return
                try:
                    await call(
                        pb.CheckAccessRequest(customer_id=customer_id(index), feature=job.feature),
                        metadata=job.metadata or None,
                    )
                except grpc.aio.AioRpcError as error:
                    meter.error(error.code().name)
                    continue
                meter.ok(began, time.perf_counter())

        await asyncio.gather(*(loop() for _ in range(job.concurrency)))
    return meter.finish()


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def webhook_bodies(job: WebhookJob, template: dict[str, Any]) -> list[tuple[str, bytes]]:
    """(webhook-id, body) pairs: `subscription.active` for a new subscription of a random seeded customer."""
    rng = random.Random(job.seed)
    now = datetime.now(UTC)
    bodies: list[tuple[str, bytes]] = []
    for number in range(job.events):
        index = rng.randrange(job.customers)
        at = now + timedelta(microseconds=number)
        data = dict(template)
        data["subscription_id"] = f"sub_W{job.tag}{number:09d}"
        data["customer"] = {
            **template["customer"],
            "customer_id": customer_id(index),
            "email": f"customer{index}@example.com",
            "name": f"Customer {index}",
        }
        data["created_at"] = data["previous_billing_date"] = _iso(at)
        data["next_billing_date"] = _iso(at + timedelta(days=30))
        data["expires_at"] = _iso(at + timedelta(days=3650))
        body: dict[str, Any] = {
            "business_id": "bus_0NmY7fQz4kR2sT8vW1xJa",
            "type": "subscription.active",
            "timestamp": _iso(at),
        }
        body["data"] = data
        bodies.append((f"msg_{job.tag}{number:09d}", json.dumps(body).encode()))
    return bodies


async def _webhooks(job: WebhookJob, conn: Connection) -> WorkerResult:
    from tests.bench.seed import subscription_template

    bodies = webhook_bodies(job, subscription_template())
    hook = Webhook(job.secret)
    connector = aiohttp.TCPConnector(limit=job.concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        conn.send(READY)
        start_wall: float = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        meter = _Meter(start_wall, job.window)
        await _sleep_until(start_wall)
        pending = iter(bodies)

        async def loop() -> None:
            for webhook_id, body in pending:
                began = time.perf_counter()
                if began >= meter.end:
                    return
                # Signed just before sending, as Dodo does: the receiver allows ±5 minutes.
                now = datetime.now(UTC)
                headers = {
                    "webhook-id": webhook_id,
                    "webhook-timestamp": str(int(now.timestamp())),
                    "webhook-signature": hook.sign(webhook_id, now, body.decode()),
                    "content-type": "application/json",
                }
                try:
                    async with session.post(job.url, data=body, headers=headers) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError) as error:
                    meter.error(type(error).__name__)
                    continue
                if 200 <= status < 300:
                    meter.ok(began, time.perf_counter())
                    meter.result.acked.append(webhook_id)
                else:
                    meter.error(f"HTTP {status}")
            meter.result.exhausted = True

        await asyncio.gather(*(loop() for _ in range(job.concurrency)))
    return meter.finish()


async def _serve(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            job: Job | None = await loop.run_in_executor(None, conn.recv)
        except EOFError:
            return
        if job is None:
            return
        try:
            if isinstance(job, GrpcJob):
                result = await _grpc(job, conn)
            elif isinstance(job, WalkJob):
                result = await _walk(job, conn)
            else:
                result = await _webhooks(job, conn)
        except Exception as error:
            conn.send(RuntimeError(f"{type(job).__name__} failed in worker: {error!r}"))
            continue
        conn.send(result)


def worker_main(conn: Connection) -> None:
    # The parent owns shutdown: a Ctrl-C in the terminal must not kill workers mid-job with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    uvloop.run(_serve(conn))


class WorkerPool:
    """N spawned client processes (spawn, not fork: no inherited gRPC or event-loop state)."""

    def __init__(self, size: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[BaseProcess] = []
        for number in range(size):
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(child,), name=f"bench-client-{number}", daemon=True)
            process.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(process)

    @property
    def size(self) -> int:
        return len(self._procs)

    async def _recv(self, conn: Connection) -> Any:
        message = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        if isinstance(message, BaseException):
            raise message
        return message

    async def prepare(self, jobs: list[Job]) -> None:
        """Send one job per worker and wait until every worker is ready to start."""
        assert len(jobs) == len(self._conns)
        for conn, job in zip(self._conns, jobs, strict=True):
            conn.send(job)
        for conn in self._conns:
            message = await self._recv(conn)
            if message != READY:
                raise RuntimeError(f"worker answered {message!r} instead of ready")

    def go(self, start_wall: float) -> None:
        for conn in self._conns:
            conn.send(start_wall)

    async def results(self) -> list[WorkerResult]:
        results: list[WorkerResult] = []
        for conn in self._conns:
            results.append(await self._recv(conn))
        return results

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
        for process in self._procs:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)
