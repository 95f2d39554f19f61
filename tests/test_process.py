"""The real entry points as a deployment runs them: `python -m service migrate|serve` in a child process,
configured only by an environment built here (DESIGN §9, §10)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2

from storage.engine import plain_url
from tests.support import API_TOKEN, CUSTOMER_ID, REPO_ROOT, WEBHOOK_SECRET, in_current_period, load_event, sign

AUTH = (("authorization", f"Bearer {API_TOKEN}"),)
START_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def service_env(database_url: str, **overrides: str) -> dict[str, str]:
    """Only what a deployment would set, plus what the interpreter needs to run; nothing leaks from the test env."""
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "TMPDIR") if name in os.environ}
    env.update(
        {
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "DATABASE_URL": database_url,
            "DODO_PAYMENTS_WEBHOOK_KEY": WEBHOOK_SECRET,
            "ENTITLEMENTS_GRPC_ADDR": f"127.0.0.1:{free_port()}",
            "ENTITLEMENTS_HTTP_ADDR": f"127.0.0.1:{free_port()}",
            "ENTITLEMENTS_API_TOKENS": API_TOKEN,
        }
    )
    env.update(overrides)
    return env


def run_service(command: str, env: dict[str, str], *, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", command],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_migrate_is_idempotent_on_a_migrated_database(database_url: str) -> None:
    result = run_service("migrate", service_env(database_url))
    assert result.returncode == 0, result.stderr
    assert "migrations: at head" in result.stdout


def test_serve_refuses_to_start_without_a_webhook_key(database_url: str) -> None:
    started = time.monotonic()
    result = run_service("serve", service_env(database_url, DODO_PAYMENTS_WEBHOOK_KEY=""), timeout=15)
    assert result.returncode != 0
    assert time.monotonic() - started < 10
    assert "DODO_PAYMENTS_WEBHOOK_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_to_start_with_a_missing_catalog_naming_the_file(database_url: str) -> None:
    started = time.monotonic()
    result = run_service("serve", service_env(database_url, ENTITLEMENTS_CATALOG="/nonexistent.toml"), timeout=15)
    assert result.returncode != 0
    assert time.monotonic() - started < 10
    assert "/nonexistent.toml" in result.stderr
    assert "Traceback" not in result.stderr


@dataclass
class ServeProcess:
    process: asyncio.subprocess.Process
    grpc_target: str
    http_base: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@asynccontextmanager
async def serve_process(env: dict[str, str], log_path: Path) -> AsyncIterator[ServeProcess]:
    """`python -m service serve` in a child; killed on the way out whatever happened."""
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            "serve",
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield ServeProcess(
            process,
            env["ENTITLEMENTS_GRPC_ADDR"],
            f"http://{env['ENTITLEMENTS_HTTP_ADDR']}",
            log_path,
        )
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def wait_until_ready(server: ServeProcess, session: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.returncode is not None:
            pytest.fail(f"serve exited with {server.process.returncode} before it was ready:\n{server.log()}")
        with suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.get(f"{server.http_base}/readyz", timeout=aiohttp.ClientTimeout(total=1)) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.05)
    pytest.fail(f"serve was not ready within {START_TIMEOUT}s:\n{server.log()}")


async def eventually(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"timed out waiting until {what}")


async def health_refuses_new_work(target: str) -> bool:
    """True once a fresh connection hears NOT_SERVING, or cannot start a call at all."""
    async with grpc.aio.insecure_channel(target) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            response = await check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.UNAVAILABLE
    return bool(response.status == health_pb2.HealthCheckResponse.NOT_SERVING)


@dataclass
class Serving:
    """A serve child process that has applied one active subscription, with a client stub on its gRPC port."""

    server: ServeProcess
    session: aiohttp.ClientSession
    stub: pb_grpc.EntitlementServiceAsyncStub


REQUEST = pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="dashboard")


async def serving_an_active_subscription(stack: AsyncExitStack, env: dict[str, str], log_path: Path) -> Serving:
    server = await stack.enter_async_context(serve_process(env, log_path))
    session = await stack.enter_async_context(aiohttp.ClientSession())
    await asyncio.wait_for(wait_until_ready(server, session), START_TIMEOUT + 5)

    body = json.dumps(in_current_period(load_event("subscription_active"))).encode()
    async with session.post(f"{server.http_base}/webhooks/dodo", data=body, headers=sign(body)) as response:
        status, text = response.status, await response.text()
    assert status == 200, f"{text}\n{server.log()}"
    assert json.loads(text) == {"status": "applied"}

    channel = await stack.enter_async_context(grpc.aio.insecure_channel(server.grpc_target))
    stub = pb_grpc.EntitlementServiceStub(channel)
    # Warm the process (pool, prepared statements) with another customer: CUSTOMER_ID's next read must still reach
    # Postgres rather than the in-process entitlement cache.
    warm = await stub.CheckAccess(
        pb.CheckAccessRequest(customer_id="cus_nobody", feature="dashboard"), metadata=AUTH, timeout=5
    )
    assert warm.reason == pb.ACCESS_REASON_NO_SUBSCRIPTION
    return Serving(server, session, stub)


async def check_access_blocked_on_a_locked_table(
    stack: AsyncExitStack, database_url: str, stub: pb_grpc.EntitlementServiceAsyncStub
) -> tuple[asyncpg.transaction.Transaction, asyncio.Task[pb.CheckAccessResponse]]:
    """Lock `subscriptions` from outside, then start a CheckAccess that waits on it inside the server."""
    locker = await asyncpg.connect(plain_url(database_url))
    stack.push_async_callback(locker.close)
    hold = locker.transaction()
    await hold.start()
    await locker.execute("LOCK TABLE subscriptions IN ACCESS EXCLUSIVE MODE")

    async def check() -> pb.CheckAccessResponse:
        return await stub.CheckAccess(REQUEST, metadata=AUTH, timeout=15)

    in_flight = asyncio.create_task(check())
    stack.callback(in_flight.cancel)

    async def read_is_blocked() -> bool:
        waiting = await locker.fetchval(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'subscriptions'::regclass"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return bool(waiting)

    await eventually(read_is_blocked, "the in-flight CheckAccess waits on the locked table")
    await asyncio.sleep(0.3)
    assert not in_flight.done()
    return hold, in_flight


@pytest.mark.usefixtures("db")  # an empty database: the child process shares it
async def test_sigterm_drains_an_in_flight_check_access_then_exits_cleanly(database_url: str, tmp_path: Path) -> None:
    # The call is held on a table lock for longer than the default lock_timeout: this test is about draining.
    env = service_env(database_url, ENTITLEMENTS_SHUTDOWN_GRACE_SECONDS="10", ENTITLEMENTS_LOCK_TIMEOUT_MS="30000")
    async with AsyncExitStack() as stack:
        serving = await serving_an_active_subscription(stack, env, tmp_path / "serve.log")
        server = serving.server
        hold, in_flight = await check_access_blocked_on_a_locked_table(stack, database_url, serving.stub)

        server.process.send_signal(signal.SIGTERM)
        await eventually(
            lambda: health_refuses_new_work(server.grpc_target),
            "health reports NOT_SERVING or new calls are refused",
        )
        readyz = f"{server.http_base}/readyz"
        async with serving.session.get(readyz, timeout=aiohttp.ClientTimeout(total=2)) as response:
            assert response.status == 503, "readiness must fail while draining"

        await asyncio.sleep(0.5)
        assert not in_flight.done(), "the in-flight call must wait for its read, not be cut off"
        assert server.process.returncode is None, "the process must not exit while a call is in flight"
        await hold.commit()

        drained = await asyncio.wait_for(in_flight, 5)
        assert drained.allowed
        assert drained.reason == pb.ACCESS_REASON_ACTIVE
        returncode = await asyncio.wait_for(server.process.wait(), 5)
        assert returncode == 0, server.log()
        assert "server.stopped" in server.log()


@pytest.mark.usefixtures("db")  # an empty database: the child process shares it
async def test_sigterm_stops_waiting_for_a_stuck_call_after_the_grace_period(database_url: str, tmp_path: Path) -> None:
    env = service_env(database_url, ENTITLEMENTS_SHUTDOWN_GRACE_SECONDS="0.3", ENTITLEMENTS_LOCK_TIMEOUT_MS="30000")
    async with AsyncExitStack() as stack:
        serving = await serving_an_active_subscription(stack, env, tmp_path / "serve.log")
        server = serving.server
        _hold, in_flight = await check_access_blocked_on_a_locked_table(stack, database_url, serving.stub)

        server.process.send_signal(signal.SIGTERM)
        # The lock is never released: shutdown is bounded by the grace period, not by the stuck read.
        with pytest.raises(grpc.aio.AioRpcError) as cut_off:
            await asyncio.wait_for(in_flight, 5)
        assert cut_off.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        returncode = await asyncio.wait_for(server.process.wait(), 5)
        assert returncode == 0, server.log()


@pytest.mark.usefixtures("db")  # an empty database: the child process shares it
async def test_kill_9_mid_burst_loses_no_acknowledged_consumption(database_url: str, tmp_path: Path) -> None:
    """Every consumption the service answered OK is in the ledger after a SIGKILL mid-burst, once each, and the
    balance is still the sum of the ledger: durability comes from the commit, not from a clean shutdown."""
    acknowledged: dict[str, str] = {}
    async with AsyncExitStack() as stack:
        serving = await serving_an_active_subscription(stack, service_env(database_url), tmp_path / "serve.log")

        async def consumer(number: int) -> None:
            for sequence in range(10_000):
                key = f"burst-{number}-{sequence}"
                request = pb.ConsumeCreditsRequest(
                    customer_id=CUSTOMER_ID, credit="ai_tokens", amount="1", idempotency_key=key
                )
                try:
                    response = await serving.stub.ConsumeCredits(request, metadata=AUTH, timeout=5)
                except grpc.aio.AioRpcError:
                    return
                acknowledged[key] = response.entry_id

        consumers = [asyncio.create_task(consumer(n)) for n in range(16)]

        async def enough() -> bool:
            return len(acknowledged) >= 300

        await eventually(enough, "the burst is under way")
        serving.server.process.kill()
        await serving.server.process.wait()
        await asyncio.gather(*consumers)

    connection = await asyncpg.connect(plain_url(database_url))
    try:
        rows = await connection.fetch("SELECT idempotency_key, entry_id FROM credit_ledger WHERE kind = 'consumption'")
        totals = await connection.fetchrow(
            "SELECT b.balance, (SELECT sum(amount) FROM credit_ledger l"
            "   WHERE l.customer_id = b.customer_id AND l.credit = b.credit)"
            " FROM credit_balances b WHERE customer_id = $1 AND credit = 'ai_tokens'",
            CUSTOMER_ID,
        )
    finally:
        await connection.close()
    assert totals is not None
    balance, ledger_sum = totals
    stored = {row["idempotency_key"]: row["entry_id"] for row in rows}
    assert len(stored) == len(rows), "one ledger row per key"
    missing = {key for key, entry in acknowledged.items() if stored.get(key) != entry}
    assert missing == set(), f"{len(missing)} acknowledged consumptions lost"
    assert balance == ledger_sum == 10_000 - len(rows)


@pytest.mark.usefixtures("db")
def test_serve_with_its_port_taken_says_so_in_one_line_and_exits(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_service("serve", service_env(database_url, ENTITLEMENTS_HTTP_ADDR=f"127.0.0.1:{port}"))
    assert result.returncode == 2
    assert f"cannot listen for HTTP on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_a_malformed_setting_names_it_without_a_traceback(database_url: str) -> None:
    result = run_service("serve", service_env(database_url, ENTITLEMENTS_DB_POOL_SIZE="2"))
    assert result.returncode == 2
    assert "ENTITLEMENTS_DB_POOL_SIZE" in result.stderr
    assert "Traceback" not in result.stderr
