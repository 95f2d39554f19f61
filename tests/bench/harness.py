"""The bench run: database, servers, sanity checks, the cases, the table and the JSON."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import uvloop
from entitlements.v1 import entitlements_pb2 as pb
from entitlements_client import EntitlementsClient

from service.domain.catalog import EXAMPLE_CATALOG
from storage.migrate import upgrade
from tests.bench import h2load, rawsql, seed, watch
from tests.bench.common import (
    AUTH_HEADER,
    AUTH_METADATA,
    BENCH_CALLERS,
    BENCH_TOKEN,
    CHECK_ACCESS,
    CONSUME_CREDITS,
    CREDIT,
    FEATURE,
    HOT_CHECK_CUSTOMER,
    HOT_CONSUME_CUSTOMER,
    RECORD_USAGE,
    USAGE_EVENT_NAME,
    WEBHOOK_SECRET,
    BenchError,
    LoadResult,
    customer_id,
)
from tests.bench.loadgen import GrpcJob, WalkJob, WebhookJob, Window, WorkerPool, WorkerResult
from tests.bench.procs import (
    REPO_ROOT,
    CpuWindow,
    Managed,
    free_port,
    machine_busy,
    memory_kib,
    spawn,
    wait_http_ok,
    wait_log_line,
)
from tests.bench.report import Case, Side, table, write_json
from tests.clients.local_check_timing import time_local_checks

CASES = (
    "check_hot",
    "check_random",
    "consume_random",
    "consume_hot",
    "webhooks",
    "rss",
    "record_usage_batched",
    "record_usage_single",
    "watch_fanout",
    "local_check",
)
# CheckAccess targets are ratios to the bare identity echo (issue 14): the framework's own ceiling.
CHECK_HOT_TARGET, CHECK_HOT_P99 = 0.85, 1.5
CHECK_RANDOM_TARGET = 0.75
# Issue 14: random customers >= 0.5x the protobuf echo; a hot customer >= 1.0x the raw single-row UPDATE loop at
# its best concurrency (the sweep below finds it).
CONSUME_RANDOM_TARGET = 0.5
CONSUME_HOT_TARGET = 1.0
WEBHOOK_TARGET = 2000.0
RSS_TARGET_MB = 300.0
# RecordUsage (issue 14): durable events per second with 100 events a call; one event a call is for information.
USAGE_BATCHED_TARGET = 20_000.0
USAGE_BATCH = 100
# WatchEntitlements (issue 13): 100 streams of every change at 100 committed changes/s (10,000 deliveries/s: the lag
# where the machine keeps up), then at 1,000/s (issue 13's figure, 100,000 deliveries/s; last, as it leaves a backlog).
WATCH_SUBSCRIBERS, WATCH_RATES, WATCH_SECONDS = 100, (100.0, 1000.0), 10.0
# Prepared webhook events per second of load: above any rate the receiver (or aiohttp's echo) reaches here.
WEBHOOK_EVENTS_PER_SECOND = 10_000
# Cores used by processes outside the bench above which a row is flagged as skewed.
OTHER_LOAD_NOTE = 0.2
# Connection counts of the informational raw UPDATE sweep (the baseline itself runs at the hot case's in-flight).
RAW_SWEEP = (1, 16)


@dataclass
class Options:
    quick: bool
    customers: int
    duration: float
    warmup: float
    in_flight: int
    h2load_in_flight: list[int]
    rounds: int
    round_duration: float
    workers: int
    cases: list[str]
    walk_budget: float
    keep_db: bool
    wait_idle: float
    output: Path
    strict: bool


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Benchmark the service against a bare grpc.aio echo baseline (make bench).",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 5k customers, 2 s per case")
    parser.add_argument("--customers", type=int, help="customers to seed (default 100000; 5000 with --quick)")
    parser.add_argument("--duration", type=float, help="seconds measured per case (default 8; 2 with --quick)")
    parser.add_argument("--warmup", type=float, help="seconds of unmeasured load first (default 1; 0.5 quick)")
    parser.add_argument("--inflight", type=int, default=64, help="calls in flight for the Python clients (64)")
    parser.add_argument("--h2load-inflight", default="1,16,64", help="in-flight levels for h2load (1,16,64)")
    parser.add_argument(
        "--rounds", type=int, help="alternating rounds per h2load level: the median ratio counts (3; 1 with --quick)"
    )
    parser.add_argument("--round-duration", type=float, help="seconds measured per h2load round (4; 2 with --quick)")
    parser.add_argument("--workers", type=int, default=2, help="client processes for the Python clients (2)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--walk-budget", type=float, help="seconds allowed to touch every customer once (60)")
    parser.add_argument(
        "--wait-idle", type=float, default=0.0, help="wait up to this many seconds for other load to stop (0)"
    )
    parser.add_argument("--keep-db", action="store_true", help="keep the database (its name is printed)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench-results.json")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    cases = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    if args.inflight % args.workers:
        parser.error("--inflight must be a multiple of --workers")
    return Options(
        quick=args.quick,
        customers=args.customers or (5_000 if args.quick else 100_000),
        duration=args.duration or (2.0 if args.quick else 8.0),
        warmup=args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0),
        in_flight=args.inflight,
        h2load_in_flight=[int(part) for part in args.h2load_inflight.split(",") if part.strip()],
        rounds=max(1, args.rounds or (1 if args.quick else 3)),
        round_duration=args.round_duration or (2.0 if args.quick else 4.0),
        workers=args.workers,
        cases=cases,
        walk_budget=args.walk_budget or (10.0 if args.quick else 60.0),
        keep_db=args.keep_db,
        wait_idle=args.wait_idle,
        output=args.output,
        strict=args.strict,
    )


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Servers:
    """Everything the run starts, so that one `close()` stops it all whatever happened."""

    service: Managed | None = None
    echo: Managed | None = None
    bare: Managed | None = None
    pool: WorkerPool | None = None

    def all(self) -> list[Managed]:
        return [server for server in (self.service, self.echo, self.bare) if server is not None]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        for server in (self.service, self.echo, self.bare):
            if server is not None:
                server.stop()


@dataclass
class Ports:
    service_grpc: int
    service_http: int
    echo_grpc: int
    echo_http: int
    bare_grpc: int


def rss_mb(pid: int) -> float:
    return memory_kib(pid).get("VmRSS", 0) / 1024


def per_call_us(seconds: float | None, calls: int) -> float | None:
    return None if seconds is None or calls <= 0 else seconds * 1e6 / calls


def side(name: str, load: LoadResult, window: CpuWindow | None, rss_pid: int | None) -> Side:
    return Side(
        name,
        load,
        server_cpu_us=None if window is None else per_call_us(window.server_seconds, load.ok),
        postgres_cpu_us=None if window is None else per_call_us(window.postgres_seconds, load.ok),
        machine_busy=None if window is None else window.machine_busy,
        rss_mb=None if rss_pid is None else rss_mb(rss_pid),
        other_cores=None if window is None else window.other_cores,
    )


def merge(results: list[WorkerResult], window: Window) -> LoadResult:
    latencies = sorted(latency for result in results for latency in result.latencies_us)
    errors: Counter[str] = Counter()
    for result in results:
        errors.update(result.errors)
    ok = sum(result.ok_in_window for result in results)
    return LoadResult(ok / window.duration, ok, latencies, dict(errors), window.duration)


class Bench:
    def __init__(self, options: Options, url: str, database: str, servers: Servers, log_dir: Path) -> None:
        self.options = options
        self.url = url
        self.database = database
        self.servers = servers
        self.log_dir = log_dir
        self.window = Window(options.warmup, options.duration)
        self.cases: list[Case] = []
        self.setup: dict[str, Any] = {}
        self._baselines: dict[tuple[str, int], Side] = {}
        self._ports = Ports(free_port(), free_port(), free_port(), free_port(), free_port())

    @property
    def service(self) -> Managed:
        assert self.servers.service is not None
        return self.servers.service

    @property
    def echo(self) -> Managed:
        assert self.servers.echo is not None
        return self.servers.echo

    @property
    def bare(self) -> Managed:
        assert self.servers.bare is not None
        return self.servers.bare

    @property
    def pool(self) -> WorkerPool:
        assert self.servers.pool is not None
        return self.servers.pool

    def check_alive(self, stage: str) -> None:
        for server in self.servers.all():
            if server.process.poll() is not None:
                raise BenchError(
                    f"{server.name} (pid {server.pid}) exited with {server.process.returncode} during {stage} "
                    "(something outside the bench may have stopped it)"
                )

    def _record(self, case: Case) -> None:
        others = [side.other_cores or 0.0 for side in (case.service, case.baseline, case.ceiling) if side is not None]
        if max(others) > OTHER_LOAD_NOTE:
            note = f"other processes used up to {max(others):.1f} cores meanwhile: skewed"
            case.why = f"{case.why}; {note}" if case.why else note
        self.cases.append(case)
        s = case.service
        ratio = "" if case.ratio is None else f", {case.ratio:.2f}× {case.baseline.name if case.baseline else ''}"
        if case.ceiling_ratio is not None:
            ratio += f", {case.ceiling_ratio:.2f}× bare echo"
        errors = f", errors {s.load.errors}" if s.load.errors else ""
        say(
            f"  {case.name} @{case.in_flight}: {s.load.requests_per_second:.0f}/s, p99 {s.load.p99_ms:.2f} ms"
            f"{ratio}{errors}"
        )

    # --- servers -------------------------------------------------------------------------------------------

    async def start_servers(self, ports: Ports) -> None:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("ENTITLEMENTS_", "DODO_"))}
        env.update(
            DATABASE_URL=self.url,
            DODO_PAYMENTS_WEBHOOK_KEY=WEBHOOK_SECRET,
            ENTITLEMENTS_GRPC_ADDR=f"127.0.0.1:{ports.service_grpc}",
            ENTITLEMENTS_HTTP_ADDR=f"127.0.0.1:{ports.service_http}",
            ENTITLEMENTS_CATALOG=str(EXAMPLE_CATALOG),
            # Production configuration: callers with tokens (so the auth interceptor runs), metrics on, TLS off.
            ENTITLEMENTS_CALLERS=BENCH_CALLERS,
            PYTHONUNBUFFERED="1",
        )
        started = time.perf_counter()
        self.servers.service = spawn("service", ["-m", "service", "serve"], env, self.log_dir)
        self.servers.echo = spawn(
            "echo",
            ["-m", "tests.bench.echo", "--grpc-port", str(ports.echo_grpc), "--http-port", str(ports.echo_http)],
            env,
            self.log_dir,
        )
        self.servers.bare = spawn(
            "bare echo",
            ["-m", "tests.bench.echo", "--identity", "--grpc-port", str(ports.bare_grpc)],
            env,
            self.log_dir,
        )
        await wait_http_ok(self.service, f"http://127.0.0.1:{ports.service_http}/readyz", limit_seconds=120)
        self.setup["service_ready_seconds"] = round(time.perf_counter() - started, 2)
        await wait_log_line(self.echo, "echo: ready", limit_seconds=30)
        await wait_log_line(self.bare, "echo: ready", limit_seconds=30)
        self.setup["service_rss_mb_at_ready"] = round(rss_mb(self.service.pid), 1)
        self.setup["echo_rss_mb"] = round(rss_mb(self.echo.pid), 1)
        say(
            f"service ready in {self.setup['service_ready_seconds']}s (pid {self.service.pid}, "
            f"RSS {self.setup['service_rss_mb_at_ready']} MB, callers on); echo pid {self.echo.pid}, "
            f"bare echo pid {self.bare.pid}"
        )

    # --- sanity --------------------------------------------------------------------------------------------

    async def sanity(self, ports: Ports, body_file: Path) -> None:
        """Before any number: the calls the load generators make really succeed (gRPC status OK, access granted)."""
        try:
            await self._sanity(ports, body_file)
        except grpc.aio.AioRpcError as error:
            raise BenchError(f"sanity call failed: {error.code().name}: {error.details()}") from None

    async def _sanity(self, ports: Ports, body_file: Path) -> None:
        for port in (ports.service_grpc, ports.echo_grpc, ports.bare_grpc):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                check = channel.unary_unary(
                    CHECK_ACCESS,
                    request_serializer=pb.CheckAccessRequest.SerializeToString,
                    response_deserializer=pb.CheckAccessResponse.FromString,
                )
                answer = await check(
                    pb.CheckAccessRequest(customer_id=customer_id(HOT_CHECK_CUSTOMER), feature=FEATURE),
                    metadata=AUTH_METADATA,
                )
                if not answer.allowed:
                    raise BenchError(f"sanity: CheckAccess for the hot customer on :{port} denied: {answer}")
                consume = channel.unary_unary(
                    CONSUME_CREDITS,
                    request_serializer=pb.ConsumeCreditsRequest.SerializeToString,
                    response_deserializer=pb.ConsumeCreditsResponse.FromString,
                )
                spent = await consume(
                    pb.ConsumeCreditsRequest(
                        customer_id=customer_id(HOT_CONSUME_CUSTOMER),
                        credit=CREDIT,
                        amount="1",
                        idempotency_key=f"sanity-{uuid.uuid4().hex}",
                    ),
                    metadata=AUTH_METADATA,
                )
                if not spent.entry_id or spent.replayed:
                    raise BenchError(f"sanity: ConsumeCredits on :{port} answered {spent}")
        if any(name.startswith("record_usage") for name in self.options.cases):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.service_grpc}") as channel:
                record = channel.unary_unary(
                    RECORD_USAGE,
                    request_serializer=pb.RecordUsageRequest.SerializeToString,
                    response_deserializer=pb.RecordUsageResponse.FromString,
                )
                usage = pb.RecordUsageRequest(customer_id=customer_id(HOT_CHECK_CUSTOMER))
                usage.events.add(event_id=f"sanity-{uuid.uuid4().hex}", event_name=USAGE_EVENT_NAME)
                recorded = await record(usage, metadata=AUTH_METADATA)
                if recorded.accepted != 1 or recorded.duplicates:
                    raise BenchError(f"sanity: RecordUsage answered {recorded}")
        if "check_hot" in self.options.cases:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.service_grpc}") as channel:
                check = channel.unary_unary(
                    CHECK_ACCESS,
                    request_serializer=pb.CheckAccessRequest.SerializeToString,
                    response_deserializer=pb.CheckAccessResponse.FromString,
                )
                try:
                    await check(pb.CheckAccessRequest(customer_id=customer_id(HOT_CHECK_CUSTOMER), feature=FEATURE))
                except grpc.aio.AioRpcError as error:
                    if error.code() is not grpc.StatusCode.UNAUTHENTICATED:
                        raise
                else:
                    raise BenchError("sanity: the service answered a call without a token: callers are not on")
            for port in (ports.service_grpc, ports.echo_grpc, ports.bare_grpc):
                status, output = await h2load.grpc_status_of(port, CHECK_ACCESS, body_file, (AUTH_HEADER,))
                if status != "0":
                    raise BenchError(
                        f"sanity: h2load's request body gets grpc-status {status!r} on :{port}:\n"
                        f"{output.decode(errors='replace')[-1500:]}"
                    )
        say(
            "sanity: CheckAccess allowed, ConsumeCredits applied (RecordUsage accepted where selected), "
            "h2load body gets grpc-status 0 on all three servers, no token is UNAUTHENTICATED"
        )

    # --- load helpers --------------------------------------------------------------------------------------

    async def _pool_run(
        self, jobs: list[Any], pid: int, window: Window, *, open_ended: bool = False
    ) -> tuple[list[WorkerResult], CpuWindow, float]:
        """Run one job per worker; CPU is sampled over the measurement window, or until the workers are done when
        `open_ended` (work that may finish before its time budget). Also returns the wall-clock start."""
        await self.pool.prepare(jobs)
        start = time.time() + 0.1
        self.pool.go(start)
        cpu = CpuWindow(pid, self.database)
        await asyncio.sleep(max(0.0, start + window.warmup - time.time()))
        cpu.start()
        if open_ended:
            results = await self.pool.results()
            cpu.stop()
            return results, cpu, start
        await asyncio.sleep(max(0.0, start + window.warmup + window.duration - time.time()))
        cpu.stop()
        return await self.pool.results(), cpu, start

    async def grpc_load(self, server: Managed, port: int, method: str, hot: int | None) -> Side:
        per_worker = self.options.in_flight // self.pool.size
        jobs = [
            GrpcJob(
                method,
                port,
                per_worker,
                self.options.customers,
                hot,
                FEATURE,
                self.window,
                seed=1000 + n,
                metadata=AUTH_METADATA,
            )
            for n in range(self.pool.size)
        ]
        results, cpu, _ = await self._pool_run(jobs, server.pid, self.window)
        return side(server.name, merge(results, self.window), cpu, server.pid)

    async def h2load_load(
        self, server: Managed, port: int, body_file: Path, in_flight: int, duration: float, tag: str = ""
    ) -> Side:
        cpu = CpuWindow(server.pid, self.database)

        def on_window(opening: bool) -> None:
            (cpu.start if opening else cpu.stop)()

        load = await h2load.run(
            port=port,
            path=CHECK_ACCESS,
            body_file=body_file,
            in_flight=in_flight,
            warmup=self.options.warmup,
            duration=duration,
            log_file=self.log_dir / f"h2load-{server.name.replace(' ', '-')}-{in_flight}{tag}.log",
            on_window=on_window,
            headers=(AUTH_HEADER,),
        )
        return side(server.name, load, cpu, server.pid)

    async def echo_baseline(self, method: str, *, bare: bool = False) -> Side:
        """An echo under the Python client: measured once per method and echo, and reused (echoes ignore
        customers). `bare`: the identity echo, else the protobuf one."""
        key = (f"{method}{' bare' if bare else ''}", self.options.in_flight)
        if key not in self._baselines:
            server, port = (self.bare, self._ports.bare_grpc) if bare else (self.echo, self._ports.echo_grpc)
            self._baselines[key] = await self.grpc_load(server, port, method, hot=None)
        return self._baselines[key]

    # --- cases ---------------------------------------------------------------------------------------------

    async def check_hot(self, body_file: Path) -> None:
        """h2load at each level: `rounds` alternating rounds (service, protobuf echo, bare echo; the order turns
        each round), and the round with the median ratio to the bare echo is the row (all rounds in the JSON)."""
        duration = self.options.round_duration
        for in_flight in self.options.h2load_in_flight:
            rounds: list[tuple[Side, Side, Side]] = []
            servers = [
                (self.service, self._ports.service_grpc),
                (self.echo, self._ports.echo_grpc),
                (self.bare, self._ports.bare_grpc),
            ]
            for number in range(self.options.rounds):
                measured: dict[str, Side] = {}
                for server, port in servers if number % 2 == 0 else list(reversed(servers)):
                    measured[server.name] = await self.h2load_load(
                        server, port, body_file, in_flight, duration, tag=f"-r{number}"
                    )
                rounds.append((measured[self.service.name], measured[self.echo.name], measured[self.bare.name]))
            by_ratio = sorted(
                rounds, key=lambda r: r[0].load.requests_per_second / max(1e-9, r[2].load.requests_per_second)
            )
            service, echo, bare = by_ratio[len(by_ratio) // 2]
            case = Case("CheckAccess hot customer", service.load.note, in_flight, service, echo, bare)
            case.extra["rounds"] = [
                {
                    "service_rps": round(s.load.requests_per_second, 1),
                    "echo_rps": round(e.load.requests_per_second, 1),
                    "bare_echo_rps": round(b.load.requests_per_second, 1),
                    "ratio_to_echo": round(s.load.requests_per_second / max(1e-9, e.load.requests_per_second), 3),
                    "ratio_to_bare_echo": round(s.load.requests_per_second / max(1e-9, b.load.requests_per_second), 3),
                    "p99_ratio_to_bare_echo": round(s.load.p99_ms / max(1e-9, b.load.p99_ms), 3),
                }
                for s, e, b in rounds
            ]
            ratio = case.ceiling_ratio or 0.0
            problems = []
            if ratio < CHECK_HOT_TARGET:
                problems.append(f"{ratio:.2f}× bare echo < {CHECK_HOT_TARGET}×")
            case.target = f"≥{CHECK_HOT_TARGET}× bare"
            if in_flight == 64:
                case.target += f", p99≤{CHECK_HOT_P99}× bare's"
                p99 = case.ceiling_p99_ratio or 0.0
                if p99 > CHECK_HOT_P99:
                    problems.append(f"p99 {p99:.2f}× bare echo's > {CHECK_HOT_P99}×")
            if service.load.errors:
                problems.append(f"errors {service.load.errors}")
            case.passed = not problems
            if self.options.rounds > 1:
                ratios = ", ".join(f"{r['ratio_to_bare_echo']:.2f}" for r in case.extra["rounds"])
                problems.append(f"median of {self.options.rounds} alternating rounds (×bare {ratios})")
            case.why = "; ".join(problems)
            self._record(case)

    async def walk_all(self) -> None:
        """CheckAccess once per customer (a shuffled order, split over the workers): whatever the service caches
        per customer is then fully populated, and its RSS is the '100k customers cached' number."""
        indices = list(range(self.options.customers))
        random.Random(7).shuffle(indices)
        per_worker = self.options.in_flight // self.pool.size
        jobs = [
            WalkJob(
                self._ports.service_grpc,
                per_worker,
                indices[n :: self.pool.size],
                FEATURE,
                self.options.walk_budget,
                metadata=AUTH_METADATA,
            )
            for n in range(self.pool.size)
        ]
        results, cpu, start = await self._pool_run(
            jobs, self.service.pid, Window(0.0, self.options.walk_budget), open_ended=True
        )
        seconds = max(result.finished_at for result in results) - start
        walked = sum(result.ok_total for result in results)
        errors: Counter[str] = Counter()
        for result in results:
            errors.update(result.errors)
        memory = memory_kib(self.service.pid)
        load = LoadResult(walked / max(seconds, 1e-9), walked, [], dict(errors), seconds)
        load.note = f"walked {walked} of {self.options.customers} customers in {seconds:.1f}s"
        service = Side(
            "service",
            load,
            server_cpu_us=per_call_us(cpu.server_seconds, walked),
            rss_mb=memory.get("VmRSS", 0) / 1024,
            other_cores=cpu.other_cores,
        )
        case = Case(
            f"RSS, {self.options.customers // 1000}k customers cached", "python walk", self.options.in_flight, service
        )
        case.target = f"≤{RSS_TARGET_MB:.0f} MB"
        problems = []
        if service.rss_mb is not None and service.rss_mb > RSS_TARGET_MB:
            problems.append(f"RSS {service.rss_mb:.0f} MB > {RSS_TARGET_MB:.0f} MB")
        if walked < self.options.customers:
            problems.append(f"only {walked} of {self.options.customers} customers walked in {seconds:.0f}s")
        if errors:
            problems.append(f"errors {dict(errors)}")
        case.passed = not problems
        case.why = "; ".join(problems) or load.note
        case.extra = {"walked": walked, "walk_seconds": round(seconds, 2), "peak_rss_mb": memory.get("VmHWM", 0) / 1024}
        # Only a full walk at the full size answers the target; a smaller run reports it for information.
        if self.options.customers < 100_000:
            case.passed = None
        self._record(case)

    async def check_random(self) -> None:
        service = await self.grpc_load(self.service, self._ports.service_grpc, "CheckAccess", hot=None)
        echo = await self.echo_baseline("CheckAccess")
        bare = await self.echo_baseline("CheckAccess", bare=True)
        self._ratio_case(
            Case("CheckAccess random", f"python ×{self.pool.size}", self.options.in_flight, service, echo, bare),
            CHECK_RANDOM_TARGET,
            what="bare echo",
        )

    async def consume_random(self) -> None:
        service = await self.grpc_load(self.service, self._ports.service_grpc, "ConsumeCredits", hot=None)
        echo = await self.echo_baseline("ConsumeCredits")
        bare = await self.echo_baseline("ConsumeCredits", bare=True)
        self._ratio_case(
            Case("ConsumeCredits random", f"python ×{self.pool.size}", self.options.in_flight, service, echo, bare),
            CONSUME_RANDOM_TARGET,
        )

    async def consume_hot(self) -> None:
        service = await self.grpc_load(self.service, self._ports.service_grpc, "ConsumeCredits", HOT_CONSUME_CUSTOMER)
        raw, connections = await self.raw_update(self.options.in_flight, self.window)
        case = Case("ConsumeCredits hot customer", f"python ×{self.pool.size}", self.options.in_flight, service, raw)
        echo = self._baselines.get(("ConsumeCredits", self.options.in_flight))
        if echo is not None:
            case.extra["ratio_to_echo"] = round(service.load.requests_per_second / echo.load.requests_per_second, 3)
        bare = self._baselines.get(("ConsumeCredits bare", self.options.in_flight))
        if bare is not None:
            case.ceiling = bare
        self._ratio_case(case, CONSUME_HOT_TARGET, what="raw UPDATE")
        info = Case("raw UPDATE, one row", "asyncpg", connections, raw)
        info.why = f"the hot ConsumeCredits baseline: {raw.load.note}"
        self._record(info)
        # Single-row UPDATE throughput depends on how many sessions queue on the row lock: the same loop at fewer
        # connections, for information (shorter windows), shows where the row's ceiling lies on this machine.
        short = Window(self.window.warmup / 2, max(2.0, self.window.duration / 2))
        best, best_connections = raw, connections
        for level in RAW_SWEEP:
            if level >= connections:
                continue
            swept, used = await self.raw_update(level, short)
            info = Case("raw UPDATE, one row", "asyncpg", used, swept)
            info.why = f"for information: {swept.load.note}"
            self._record(info)
            if swept.load.requests_per_second > best.load.requests_per_second:
                best, best_connections = swept, used
        best_ratio = service.load.requests_per_second / max(best.load.requests_per_second, 1e-9)
        case.extra["best_raw_update"] = {
            "connections": best_connections,
            "requests_per_second": round(best.load.requests_per_second, 1),
            "ratio": round(best_ratio, 3),
        }
        note = (
            f"vs the raw loop at its best ({best_connections} connections, "
            f"{best.load.requests_per_second:.0f}/s): {best_ratio:.2f}×"
        )
        case.why = f"{case.why}; {note}" if case.why else note
        # The target is the loop at its best, not at the service's concurrency (where it queues on the row lock).
        case.target = f"≥{CONSUME_HOT_TARGET:.1f}× raw UPDATE at its best"
        case.passed = best_ratio >= CONSUME_HOT_TARGET

    async def raw_update(self, in_flight: int, window: Window) -> tuple[Side, int]:
        connections = await self._connections_available(in_flight)
        cpu = CpuWindow(os.getpid(), self.database)

        def on_window(opening: bool) -> None:
            (cpu.start if opening else cpu.stop)()

        load = await rawsql.update_loop(self.url, connections, window.warmup, window.duration, on_window)
        load.note = f"{connections} connections, autocommit, one row, {window.duration:g}s"
        # The client is this process: its CPU is not a server's, so only Postgres's time per update is reported.
        side = Side(
            "raw UPDATE",
            load,
            postgres_cpu_us=per_call_us(cpu.postgres_seconds, load.ok),
            machine_busy=cpu.machine_busy,
            other_cores=cpu.other_cores,
        )
        return side, connections

    async def _connections_available(self, wanted: int) -> int:
        connection = await asyncpg.connect(self.url)
        try:
            limit = int(await connection.fetchval("SHOW max_connections"))
            used = int(await connection.fetchval("SELECT count(*) FROM pg_stat_activity"))
        finally:
            await connection.close()
        free = limit - used - 8
        if free < wanted:
            say(f"  raw UPDATE: only {free} Postgres connections free (max_connections {limit}), using that many")
        return max(1, min(wanted, free))

    def _ratio_case(self, case: Case, target: float, what: str = "echo") -> None:
        """Judged against the bare echo when `what` says so, else against the row's baseline."""
        ratio = (case.ceiling_ratio if what == "bare echo" else case.ratio) or 0.0
        case.target = f"≥{target}× {what}"
        problems = []
        if ratio < target:
            problems.append(f"{ratio:.2f}× {what} < {target}×")
        if case.service.load.errors:
            problems.append(f"errors {case.service.load.errors}")
        case.passed = not problems
        case.why = "; ".join(problems)
        self._record(case)

    async def webhooks(self) -> None:
        events = int(WEBHOOK_EVENTS_PER_SECOND * (self.window.warmup + self.window.duration) / self.pool.size) + 1
        per_worker = self.options.in_flight // self.pool.size

        def jobs(port: int, tag: str) -> list[WebhookJob]:
            return [
                WebhookJob(
                    f"http://127.0.0.1:{port}/webhooks/dodo",
                    WEBHOOK_SECRET,
                    per_worker,
                    self.options.customers,
                    f"{tag}{n}",
                    events,
                    self.window,
                    seed=2000 + n,
                )
                for n in range(self.pool.size)
            ]

        before = await self._inbox_count()
        results, cpu, _ = await self._pool_run(jobs(self._ports.service_http, "s"), self.service.pid, self.window)
        service = side("service", self._webhook_load(results), cpu, self.service.pid)
        acked = [webhook_id for result in results for webhook_id in result.acked]
        durable = await self._durability(acked, before)
        results, cpu, _ = await self._pool_run(jobs(self._ports.echo_http, "e"), self.echo.pid, self.window)
        echo = side("aiohttp echo", self._webhook_load(results), cpu, self.echo.pid)
        case = Case("webhook ingest (signed)", f"python ×{self.pool.size}", self.options.in_flight, service, echo)
        case.target = f"≥{WEBHOOK_TARGET:.0f}/s, durable"
        problems = []
        if service.load.requests_per_second < WEBHOOK_TARGET:
            problems.append(f"{service.load.requests_per_second:.0f}/s < {WEBHOOK_TARGET:.0f}/s")
        if not durable["durable"]:
            problems.append(f"durability check failed: {durable}")
        if service.load.errors:
            problems.append(f"errors {service.load.errors}")
        case.passed = not problems
        case.why = "; ".join(problems)
        case.extra = durable
        self._record(case)

    def _webhook_load(self, results: list[WorkerResult]) -> LoadResult:
        load = merge(results, self.window)
        if any(result.exhausted for result in results):
            load.note = "prepared events ran out before the window closed: the rate is a lower bound"
        return load

    async def _inbox_count(self) -> int:
        connection = await asyncpg.connect(self.url)
        try:
            return int(await connection.fetchval("SELECT count(*) FROM webhook_inbox"))
        finally:
            await connection.close()

    async def _durability(self, acked: list[str], before: int) -> dict[str, Any]:
        """Every acknowledged delivery is in the inbox, and nothing else was added."""
        connection = await asyncpg.connect(self.url)
        try:
            after = int(await connection.fetchval("SELECT count(*) FROM webhook_inbox"))
            rows = await connection.fetch(
                "SELECT status, count(*) AS n FROM webhook_inbox WHERE webhook_id = ANY($1::text[]) GROUP BY status",
                acked,
            )
        finally:
            await connection.close()
        found = {row["status"]: int(row["n"]) for row in rows}
        stored = sum(found.values())
        return {
            "durable": bool(acked) and stored == len(acked) and after - before == len(acked),
            "acknowledged": len(acked),
            "acknowledged_in_inbox": stored,
            "inbox_rows_added": after - before,
            "inbox_statuses": found,
        }

    async def record_usage(self, name: str, batch: int, tag: str, target: float | None) -> None:
        """RecordUsage for random seeded customers, `batch` distinct events a call; the rate that counts is events
        answered as accepted per second, and every one of them must be a row of `usage_events` afterwards."""
        per_worker = self.options.in_flight // self.pool.size
        jobs = [
            GrpcJob(
                "RecordUsage",
                self._ports.service_grpc,
                per_worker,
                self.options.customers,
                None,
                FEATURE,
                self.window,
                seed=3000 + n,
                events=batch,
                tag=f"{tag}{n}",
                metadata=AUTH_METADATA,
            )
            for n in range(self.pool.size)
        ]
        before = await self._usage_count()
        results, cpu, _ = await self._pool_run(jobs, self.service.pid, self.window)
        service = side("service", merge(results, self.window), cpu, self.service.pid)
        events_in_window = sum(result.events_in_window for result in results)
        events_per_second = events_in_window / self.window.duration
        accepted = sum(result.events_total for result in results)
        duplicates = sum(result.duplicates for result in results)
        added = await self._usage_count() - before
        durable = {
            "durable": accepted > 0 and added == accepted and duplicates == 0,
            "accepted": accepted,
            "duplicates": duplicates,
            "usage_rows_added": added,
        }
        service.load.note = f"{batch} event{'s' if batch > 1 else ''} a call; req/s are calls/s"
        case = Case(name, f"python ×{self.pool.size}", self.options.in_flight, service)
        case.extra = {
            "events_per_call": batch,
            "events_per_second": round(events_per_second, 1),
            "events_in_window": events_in_window,
            **durable,
        }
        problems = []
        if target is not None:
            case.target = f"≥{target:.0f} events/s, durable"
            if events_per_second < target:
                problems.append(f"{events_per_second:.0f} events/s < {target:.0f}/s")
        if not durable["durable"]:
            problems.append(
                f"durability check failed: {accepted} accepted, {added} rows added to usage_events, "
                f"{duplicates} duplicates"
            )
        if service.load.errors:
            problems.append(f"errors {service.load.errors}")
        # The single-event case is for information, unless what it was told is durable is not.
        case.passed = not problems if target is not None else (False if problems else None)
        rate = f"{events_per_second:.0f} events/s durable ({batch} a call; {accepted} accepted, {added} rows added)"
        case.why = "; ".join([rate, *problems])
        self._record(case)
        say(f"  {name}: {events_per_second:.0f} events/s, {accepted} accepted, {added} rows added to usage_events")

    async def settle_watch_log(self) -> None:
        """The seed's rows went through the watch log's triggers like any write: wait until the service has
        sequenced them, so that no case is measured while that backlog is worked off (and say how fast it was)."""
        connection = await asyncpg.connect(self.url)
        try:
            backlog = int(await connection.fetchval("SELECT count(*) FROM watch_pending"))
            started = time.perf_counter()
            while await connection.fetchval("SELECT count(*) FROM watch_pending") > 0:
                if time.perf_counter() - started > 600:
                    raise BenchError("the watch log's backlog was not sequenced within 600 s")
                await asyncio.sleep(0.5)
            seconds = time.perf_counter() - started
            events = int(await connection.fetchval("SELECT count(*) FROM watch_events"))
        finally:
            await connection.close()
        self.setup["watch_seed_backlog"] = {"pending": backlog, "events": events, "seconds": round(seconds, 1)}
        say(f"watch log: sequenced the seed's {backlog} changes into {events} events in {seconds:.1f}s")

    async def watch_fanout(self) -> None:
        for rate in WATCH_RATES:
            cpu = CpuWindow(self.service.pid, self.database)
            cpu.start()
            result = await watch.fan_out(
                f"127.0.0.1:{self._ports.service_grpc}",
                BENCH_TOKEN,
                subscribers=WATCH_SUBSCRIBERS,
                rate=rate,
                seconds=WATCH_SECONDS,
                work_dir=self.log_dir,
            )
            load = LoadResult(requests_per_second=result.deliveries / WATCH_SECONDS, ok=result.deliveries)
            cpu.stop()
            side = Side("service", load, server_cpu_us=per_call_us(cpu.server_seconds, result.deliveries))
            side.other_cores = cpu.other_cores
            case = Case(f"Watch fan-out {rate:.0f}/s", "tests/bench/watch.py", WATCH_SUBSCRIBERS, side)
            case.target = "every change to every stream; p99 change-to-delivery lag"
            delivered = result.deliveries / result.expected if result.expected else 0.0
            case.passed = result.expected > 0 and result.deliveries == result.expected and result.cut_off == 0
            case.why = (
                f"{result.changes} changes x {WATCH_SUBSCRIBERS} streams: {delivered:.1%} delivered within 3 s of the "
                f"last commit, lag p50 {_ms(result.p50_ms)} p99 {_ms(result.p99_ms)} max {_ms(result.max_ms)}, "
                f"{result.cut_off} streams cut off, {result.refused_writes} writes refused"
            )
            case.extra = result.as_json()
            self.cases.append(case)
            say(f"  {case.why}")

    async def local_check(self) -> None:
        target = f"127.0.0.1:{self._ports.service_grpc}"
        async with EntitlementsClient(target, token=BENCH_TOKEN) as client:
            local = client.local()
            await local.start()
            try:
                await local.wait_live(timeout=10)
                cost = await time_local_checks(local, customer_id(HOT_CHECK_CUSTOMER), FEATURE, calls=200_000)
            finally:
                await local.close()
        load = LoadResult(requests_per_second=1e9 / cost.mean_ns if cost.mean_ns else 0.0, ok=cost.calls)
        case = Case("CheckAccess local cache", "tests/clients/local_check_timing.py", 1, Side("client", load))
        case.target = "p50 per call in the caller (information)"
        case.passed = cost.hits == cost.calls
        case.why = f"p50 {cost.p50_ns / 1000:.2f} µs, p99 {cost.p99_ns / 1000:.2f} µs per call, {cost.hits} hits"
        case.extra = {"p50_ns": cost.p50_ns, "p99_ns": cost.p99_ns, "mean_ns": cost.mean_ns, "hits": cost.hits}
        self.cases.append(case)
        say(f"  {case.why}")

    async def _usage_count(self) -> int:
        connection = await asyncpg.connect(self.url)
        try:
            return int(await connection.fetchval("SELECT count(*) FROM usage_events"))
        finally:
            await connection.close()

    # --- the run -------------------------------------------------------------------------------------------

    async def run(self) -> None:
        ports = self._ports
        await self.start_servers(ports)
        body_file = self.log_dir / "check_access.bin"
        request = pb.CheckAccessRequest(customer_id=customer_id(HOT_CHECK_CUSTOMER), feature=FEATURE)
        body_file.write_bytes(h2load.grpc_frame(request.SerializeToString()))
        self.servers.pool = WorkerPool(self.options.workers)
        await self.sanity(ports, body_file)
        await self.settle_watch_log()
        selected = self.options.cases
        stages = [
            ("check_hot", f"CheckAccess, one hot customer, h2load at {self.options.h2load_in_flight} in flight"),
            ("walk", f"CheckAccess once for each of {self.options.customers} customers (cache fill, RSS)"),
            ("check_random", f"CheckAccess, random customers, Python client at {self.options.in_flight} in flight"),
            ("consume_random", f"ConsumeCredits, random customers, Python client at {self.options.in_flight}"),
            ("consume_hot", f"ConsumeCredits, one hot customer, and the raw UPDATE loop at {self.options.in_flight}"),
            ("webhooks", f"webhook ingest, distinct signed events, Python client at {self.options.in_flight}"),
            (
                "record_usage_batched",
                f"RecordUsage, {USAGE_BATCH} events a call, random customers, Python client at "
                f"{self.options.in_flight}",
            ),
            ("record_usage_single", f"RecordUsage, 1 event a call, random customers, at {self.options.in_flight}"),
            (
                "watch_fanout",
                f"WatchEntitlements, {WATCH_SUBSCRIBERS} streams, {' and '.join(f'{r:.0f}' for r in WATCH_RATES)} "
                f"committed changes/s for {WATCH_SECONDS:.0f} s each",
            ),
            ("local_check", "client.local(): CheckAccess answered in the caller's process"),
        ]
        for stage, title in stages:
            wanted = ("rss" in selected or "check_random" in selected) if stage == "walk" else stage in selected
            if not wanted:
                continue
            say(title)
            if stage == "check_hot":
                await self.check_hot(body_file)
            elif stage == "walk":
                await self.walk_all()
            elif stage == "check_random":
                await self.check_random()
            elif stage == "consume_random":
                await self.consume_random()
            elif stage == "consume_hot":
                await self.consume_hot()
            elif stage == "record_usage_batched":
                await self.record_usage("RecordUsage batched", USAGE_BATCH, "b", USAGE_BATCHED_TARGET)
            elif stage == "record_usage_single":
                await self.record_usage("RecordUsage single", 1, "s", None)
            elif stage == "watch_fanout":
                await self.watch_fanout()
            elif stage == "local_check":
                await self.local_check()
            else:
                await self.webhooks()
            self.check_alive(title)
        memory = memory_kib(self.service.pid)
        self.setup["service_rss_mb_at_end"] = round(memory.get("VmRSS", 0) / 1024, 1)
        self.setup["service_peak_rss_mb"] = round(memory.get("VmHWM", 0) / 1024, 1)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


IDLE_BELOW = 0.15


def wait_for_idle(limit_seconds: float) -> float:
    """The machine's busy share before anything starts, after waiting up to `limit_seconds` for it to drop. Other
    work on a 2-core machine (a test suite, a build) moves every number here, so a busy start is announced."""
    deadline = time.monotonic() + limit_seconds
    busy = machine_busy(1.0)
    while busy > IDLE_BELOW and time.monotonic() < deadline:
        busy = machine_busy(2.0)
    if busy > IDLE_BELOW:
        say(f"WARNING: the machine is {busy:.0%} busy before the bench starts: other load will skew the numbers")
    return busy


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    # SIGTERM (a CI timeout, a kill) cleans up like Ctrl-C: servers stopped, database dropped.
    signal.signal(signal.SIGTERM, _interrupt)
    missing = h2load.missing_tools() if "check_hot" in options.cases else []
    if missing:
        print(
            f"bench: {', '.join(missing)} not found: install Debian's nghttp2-client "
            "(make bench does: apt-get install -y nghttp2-client)",
            file=sys.stderr,
        )
        return 2
    busy = wait_for_idle(options.wait_idle)
    extra_args = sys.argv[1:] if argv is None else argv
    command = "make bench" + (f" BENCH_ARGS='{' '.join(extra_args)}'" if extra_args else "")
    server = seed.server_url()
    name = seed.new_database_name()
    url = seed.with_database(server, name)
    servers = Servers()
    created = False
    started = time.perf_counter()
    log_dir = Path(tempfile.mkdtemp(prefix="entitlements-bench-"))
    bench: Bench | None = None
    aborted = ""
    try:
        asyncio.run(seed.create_database(server, name))
        created = True
        say(f"database {name} on {seed.with_database(server, '')}; logs in {log_dir}")
        upgrade(url)
        seeded = asyncio.run(seed.seed(url, options.customers))
        say(f"seeded {seeded.customers} customers in {seeded.seconds:.1f}s ({seeded.database_mb:.0f} MB)")
        bench = Bench(options, url, name, servers, log_dir)
        bench.setup.update(
            seed_seconds=round(seeded.seconds, 2),
            database_mb=round(seeded.database_mb, 1),
            machine_busy_before_start=round(busy, 3),
        )
        uvloop.run(bench.run())
    except KeyboardInterrupt:
        print(f"bench: interrupted (logs in {log_dir})", file=sys.stderr)
        return 130
    except BenchError as error:
        for server_process in servers.all():
            print(f"--- {server_process.name} log tail ---\n{server_process.log_tail()}", file=sys.stderr)
        print(f"bench: stopped: {error} (logs in {log_dir})", file=sys.stderr)
        aborted = str(error)
    finally:
        servers.close()
        if created and not options.keep_db:
            asyncio.run(seed.drop_database(server, name))
        elif created:
            say(f"kept database {name}")
    if bench is None or not bench.cases:
        return 1
    elapsed = time.perf_counter() - started
    bench.setup["total_seconds"] = round(elapsed, 1)
    if aborted:
        bench.setup["aborted"] = aborted
    lines = [f"$ {command}    ({elapsed:.0f}s, {options.customers} customers, {options.duration:g}s per case)"]
    if busy > IDLE_BELOW:
        lines.append(f"(the machine was {busy:.0%} busy with other work when the bench started: numbers are skewed)")
    if aborted:
        lines.append(f"(stopped early, the cases after this table did not run: {aborted})")
    lines.append(table(bench.cases))
    printed = "\n".join(lines)
    print()
    print(printed)
    config = asdict(options) | {"output": str(options.output)}
    write_json(options.output, command=command, config=config, setup=bench.setup, cases=bench.cases)
    # The figures as printed, with the command that produced them, beside the JSON.
    options.output.with_suffix(".txt").write_text(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n{printed}\n")
    print(f"\nwrote {options.output} and {options.output.with_suffix('.txt')}")
    if aborted or any(case.service.load.errors for case in bench.cases):
        print(f"the servers' logs are kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    failed = [case.name for case in bench.cases if case.passed is False]
    return 1 if aborted or (failed and options.strict) else 0
