"""Real Postgres for the whole run (a fresh database, migrated with Alembic), truncated before each test; a real
grpc.aio server on port 0 and the real aiohttp app, assembled by the same `start()` that `serve` uses."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import grpc
import pytest
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from service.app.dodo_gateway import DodoGateway
from service.domain.catalog import Catalog, load_catalog
from service.server import Running, start
from storage.engine import Database, plain_url
from storage.migrate import upgrade
from tests.fakedodo import FakeDodo, start_fake_dodo
from tests.support import (
    API_TOKEN,
    DODO_API_KEY,
    LOCAL_SERVER,
    RESET_WATCH_HEAD,
    TABLES,
    FakeClock,
    WebhookPoster,
    bearer,
    make_settings,
)


def _docker_engine_answers() -> bool:
    import socket

    # Ask the engine's socket directly: the docker client alone (no engine) is common, and its SDK leaks sockets.
    path = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock").removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
            probe.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return b"OK" in probe.recv(1024)
        except OSError:
            return False


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """TEST_DATABASE_URL if set, else a testcontainers Postgres when a Docker engine answers, else the local one."""
    explicit = os.environ.get("TEST_DATABASE_URL")
    if explicit:
        yield explicit
        return
    if os.environ.get("ENTITLEMENTS_TEST_NO_DOCKER") != "1" and _docker_engine_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    yield LOCAL_SERVER


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(plain_url(url))
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    name = f"entitlements_test_{uuid.uuid4().hex[:12]}"
    admin = plain_url(server_url)

    async def admin_sql(sql: str) -> None:
        connection = await asyncpg.connect(admin)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(admin_sql(f'CREATE DATABASE "{name}"'))
    url = _with_database(server_url, name)
    try:
        upgrade(url)
        yield url
    finally:
        asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database.from_url(database_url, pool_size=10)
    async with database.engine.begin() as connection:
        await connection.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
        await connection.exec_driver_sql(RESET_WATCH_HEAD)
    yield database
    await database.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog(Path(__file__).resolve().parent.parent / "service" / "catalog.example.toml")


@pytest.fixture
async def fake_dodo() -> AsyncIterator[FakeDodo]:
    """A fake Dodo API on a real port, spoken to through the real dodopayments SDK."""
    async with start_fake_dodo(api_key=DODO_API_KEY) as (fake, _base_url):
        yield fake


@pytest.fixture
async def service(
    database_url: str, db: Database, clock: FakeClock, catalog: Catalog, fake_dodo: FakeDodo
) -> AsyncIterator[Running]:
    # SDK read retries off: tests inject Dodo failures and want one request per call, quickly.
    dodo = DodoGateway(DODO_API_KEY, fake_dodo.base_url, timeout=1.0, read_max_retries=0)
    running = await start(make_settings(database_url), clock=clock, catalog=catalog, db=db, dodo=dodo)
    yield running
    if not running.stopped.is_set():
        await running.stop(0)


@pytest.fixture
async def channel(service: Running) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}", interceptors=bearer(API_TOKEN)) as channel:
        yield channel


@pytest.fixture
async def anonymous_channel(service: Running) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.EntitlementServiceAsyncStub:
    return pb_grpc.EntitlementServiceStub(channel)


@pytest.fixture
async def webhooks(service: Running) -> AsyncIterator[WebhookPoster]:
    async with aiohttp.ClientSession() as session:
        yield WebhookPoster(f"http://127.0.0.1:{service.http_port}/webhooks/dodo", session)
