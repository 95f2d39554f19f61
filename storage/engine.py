"""Connections to Postgres and the one transaction helper every edge (RPC, webhook delivery, CLI) uses.

Runtime SQL goes through an asyncpg pool: on the hot paths SQLAlchemy's per-statement cost (about ten times raw
asyncpg's CPU) would dominate. SQLAlchemy remains the schema's home (models, Alembic) and serves ad-hoc reads
(tests, operators) through `session()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeAlias
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from service.domain.errors import ConfigurationError

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"


def async_url(url: str) -> str:
    """Accept `postgresql://`, `postgres://` and `postgresql+asyncpg://` alike: the driver is asyncpg."""
    parts = urlsplit(url)
    if parts.scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        return urlunsplit(parts._replace(scheme="postgresql+asyncpg"))
    raise ConfigurationError(f"DATABASE_URL must be a postgresql:// URL, got scheme {parts.scheme!r}")


def plain_url(url: str) -> str:
    """The same URL for libpq-style clients (asyncpg used directly, psql)."""
    async_url(url)  # validates the scheme
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql"))


def make_engine(url: str, *, pool_size: int = 2, connect_timeout: float = 5.0) -> AsyncEngine:
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=connect_timeout,
        connect_args={"timeout": connect_timeout, "command_timeout": 30},
    )


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(connection: Connection) -> None:
    # orjson: several kilobytes of payload go through here per webhook, about five times faster than json.
    for kind in ("json", "jsonb"):
        await connection.set_type_codec(kind, encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")


async def _no_reset(connection: Connection) -> None:
    """Our code leaves no session state behind (no SET, no LISTEN, no open cursors, transaction-scoped locks only),
    so the pool's default reset query would be a wasted round trip on every release."""


class Database:
    """Owns the connection pool and hands out one transaction per unit of work."""

    def __init__(self, url: str, *, pool_size: int = 10, connect_timeout: float = 5.0) -> None:
        self.url = plain_url(url)
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.engine = make_engine(url, connect_timeout=connect_timeout)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        self._pool: asyncpg.Pool | None = None
        self._pool_lock: asyncio.Lock | None = None

    @classmethod
    def from_url(cls, url: str, *, pool_size: int = 10, connect_timeout: float = 5.0) -> Database:
        return cls(url, pool_size=pool_size, connect_timeout=connect_timeout)

    async def pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        if self._pool_lock is None:
            self._pool_lock = asyncio.Lock()
        async with self._pool_lock:
            if self._pool is None:
                # min_size=0: starting never needs Postgres; connections open on first use and a Postgres outage
                # surfaces per call (UNAVAILABLE / 503) instead of stopping the process.
                self._pool = await asyncpg.create_pool(
                    self.url,
                    min_size=0,
                    max_size=self.pool_size,
                    timeout=self.connect_timeout,
                    command_timeout=30,
                    init=_init_connection,
                    reset=_no_reset,
                    max_inactive_connection_lifetime=60.0,
                )
        return self._pool

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[Connection]:
        """One connection in one transaction: committed when the block ends normally, rolled back if it raises."""
        pool = await self.pool()
        async with pool.acquire(timeout=self.connect_timeout) as connection, connection.transaction():
            yield connection

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """One connection without an explicit transaction, for single-statement reads."""
        pool = await self.pool()
        async with pool.acquire(timeout=self.connect_timeout) as connection:
            yield connection

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A SQLAlchemy session in one transaction, for ad-hoc reads by tests and operators."""
        async with self._sessions() as session, session.begin():
            yield session

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        await self.engine.dispose()
