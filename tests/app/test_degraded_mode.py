"""Degraded mode and truthful readiness (DESIGN §12, §14): when Postgres cannot be reached, CheckAccess answers
from the last-known snapshots for a bounded time, marked stale; ConsumeCredits stays strict; gRPC health and
/readyz both say NOT ready; and a server refuses to start on a schema that is not at head.

Postgres is made unreachable for one service only, the way a network fault would: the service talks to it through
a TCP relay that the test cuts."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2

from service.domain.catalog import Catalog
from service.domain.errors import ConfigurationError
from service.server import Running, start
from storage.engine import Database, plain_url
from storage.migrate import upgrade
from tests.support import (
    API_TOKEN,
    CUSTOMER_ID,
    BearerToken,
    FakeClock,
    WebhookPoster,
    deliver,
    make_settings,
    subscription_event,
    utc,
)

ACTIVE_AT = utc("2026-09-01T10:15:40Z")
GRACE_SECONDS = 1.5


class Relay:
    """A TCP relay in front of Postgres that can be cut (every connection dropped, new ones refused) and mended."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update((writer, up_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers.difference_update((writer, up_writer))


def through(url: str, port: int) -> str:
    parts = urlsplit(plain_url(url))
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{port}"))


@pytest.fixture
async def relay(database_url: str) -> AsyncIterator[Relay]:
    relay = Relay(urlsplit(plain_url(database_url)).port or 5432)
    await relay.open()
    yield relay
    if relay._server is not None:
        await relay.cut()


@pytest.fixture
async def behind_relay(
    relay: Relay, database_url: str, clock: FakeClock, catalog: Catalog, db: Database
) -> AsyncIterator[Running]:
    url = through(database_url, relay.port)
    settings = make_settings(url, ENTITLEMENTS_STALE_GRACE_SECONDS=str(GRACE_SECONDS))
    running = await start(settings, clock=clock, catalog=catalog, db=Database.from_url(url, connect_timeout=1.0))
    yield running
    await running.stop(0)


async def eventually(condition: object, what: str, within: float = 8.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.05)


async def test_postgres_unreachable_checks_answer_from_the_last_known_state_for_a_bounded_time(
    webhooks: WebhookPoster, behind_relay: Running, relay: Relay, clock: FakeClock
) -> None:
    clock.set(ACTIVE_AT + timedelta(days=1))
    await deliver(webhooks, subscription_event("subscription.active", timestamp=ACTIVE_AT))
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{behind_relay.grpc_port}", interceptors=[BearerToken(API_TOKEN)]
    ) as channel:
        stub = pb_grpc.EntitlementServiceStub(channel)
        await eventually(lambda: listening(behind_relay), "the cache listens through the relay")
        await asyncio.sleep(0.2)

        def check(feature: str, customer_id: str = CUSTOMER_ID) -> pb.CheckAccessRequest:
            return pb.CheckAccessRequest(customer_id=customer_id, feature=feature)

        for feature in ("dashboard", "ai_tokens", "audit_log"):
            fresh = await stub.CheckAccess(check(feature))
            assert not fresh.stale
        assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING

        await relay.cut()
        await eventually(lambda: not_listening(behind_relay), "the service notices Postgres is gone")

        stale = await stub.CheckAccess(check("dashboard"))
        assert (stale.allowed, stale.reason, stale.stale) == (True, pb.ACCESS_REASON_ACTIVE, True)
        tokens = await stub.CheckAccess(check("ai_tokens"))
        assert (tokens.allowed, tokens.balance, tokens.stale) == (True, "10000", True)
        denied = await stub.CheckAccess(check("audit_log"))  # the catalog says on_outage = "deny"
        assert (denied.allowed, denied.reason, denied.stale) == (False, pb.ACCESS_REASON_STORAGE_UNAVAILABLE, True)

        with pytest.raises(grpc.aio.AioRpcError) as never_seen:
            await stub.CheckAccess(check("dashboard", customer_id="cus_never_seen"))
        assert never_seen.value.code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as strict:
            await stub.ConsumeCredits(
                pb.ConsumeCreditsRequest(
                    customer_id=CUSTOMER_ID, credit="ai_tokens", amount="1", idempotency_key="during-outage"
                ),
                timeout=10,
            )
        assert strict.value.code() is grpc.StatusCode.UNAVAILABLE

        async def health_says_not_serving() -> bool:
            return await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING

        await eventually(health_says_not_serving, "gRPC health follows readiness")
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{behind_relay.http_port}/readyz") as ready,
        ):
            assert ready.status == 503

        await asyncio.sleep(GRACE_SECONDS)
        with pytest.raises(grpc.aio.AioRpcError) as too_old:
            await stub.CheckAccess(check("dashboard"))
        assert too_old.value.code() is grpc.StatusCode.UNAVAILABLE, "past the grace, stale state is not served"

        await relay.open()  # Postgres is back

        async def serving() -> bool:
            return await health_status(channel) == health_pb2.HealthCheckResponse.SERVING

        await eventually(serving, "health is SERVING again")
        back = await stub.CheckAccess(check("dashboard"))
        assert (back.allowed, back.stale) == (True, False)


async def health_status(channel: grpc.aio.Channel) -> int:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    response: health_pb2.HealthCheckResponse = await check(health_pb2.HealthCheckRequest(), timeout=2)
    return int(response.status)


async def listening(running: Running) -> bool:
    return running.cache.listening


async def not_listening(running: Running) -> bool:
    return not running.cache.listening


async def test_a_flood_of_unknown_ids_is_bounded_and_does_not_push_out_real_customers(
    webhooks: WebhookPoster, database_url: str, db: Database, clock: FakeClock, catalog: Catalog
) -> None:
    clock.set(ACTIVE_AT + timedelta(days=1))
    await deliver(webhooks, subscription_event("subscription.active", timestamp=ACTIVE_AT))
    settings = make_settings(database_url, ENTITLEMENTS_CACHE_MAX_UNKNOWN="50", ENTITLEMENTS_CACHE_MAX_CUSTOMERS="10")
    running = await start(settings, clock=clock, catalog=catalog, db=Database.from_url(database_url))
    try:
        await eventually(lambda: listening(running), "the cache listens")
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{running.grpc_port}", interceptors=[BearerToken(API_TOKEN)]
        ) as channel:
            stub = pb_grpc.EntitlementServiceStub(channel)
            known = pb.CheckAccessRequest(customer_id=CUSTOMER_ID, feature="dashboard")
            assert (await stub.CheckAccess(known)).allowed
            for n in range(300):
                made_up = f"cus_{uuid.uuid4().hex}{'x' * 200}"
                answer = await stub.CheckAccess(pb.CheckAccessRequest(customer_id=made_up, feature="dashboard"))
                assert answer.reason == pb.ACCESS_REASON_NO_SUBSCRIPTION, n
            assert len(running.cache) <= 50 + 1
            misses = running.cache.misses
            assert (await stub.CheckAccess(known)).allowed
            assert running.cache.misses == misses, "the real customer is still cached"
    finally:
        await running.stop(0)


@pytest.mark.parametrize("revision", ["0004", None], ids=["behind-head", "never-migrated"])
async def test_the_server_refuses_to_start_on_a_schema_that_is_not_at_head(
    database_url: str, catalog: Catalog, revision: str | None
) -> None:
    name = f"entitlements_old_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(plain_url(database_url))
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(plain_url(database_url))._replace(path=f"/{name}"))
    try:
        if revision is not None:
            await asyncio.to_thread(upgrade, url, revision)
        with pytest.raises(ConfigurationError, match="migrate"):
            await start(make_settings(url), catalog=catalog)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
