"""Connections to Postgres and the one transaction helper every edge (RPC, webhook delivery, CLI) uses.

Runtime SQL goes through an asyncpg pool: on the hot paths SQLAlchemy's per-statement cost (about ten times raw
asyncpg's CPU) would dominate. SQLAlchemy remains the schema's home (models, Alembic) and serves ad-hoc reads
(tests, operators) through `session()`.
"""

from __future__ import annotations

import asyncio
import enum
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import TypeAlias
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from service.domain.errors import ConfigurationError, StorageBusy

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


# JSON's number grammar (RFC 8259). str(Decimal) also writes "NaN", "Infinity" and "sNaN", which are not JSON.
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _exact_number(value: object) -> orjson.Fragment:
    """Decimals (how Dodo's JSON is read: service/domain/dodo_payloads.py `loads`) are written with their own digits,
    so a stored payload keeps the numbers Dodo sent; through float they would round."""
    if isinstance(value, Decimal):
        text = str(value)
        if _JSON_NUMBER.fullmatch(text):
            return orjson.Fragment(text.encode())
        raise TypeError(f"{text} has no JSON form")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(value: object) -> str:
    return orjson.dumps(value, default=_exact_number).decode()


async def _init_connection(connection: Connection) -> None:
    # orjson: several kilobytes of payload go through here per webhook, about five times faster than json.
    for kind in ("json", "jsonb"):
        await connection.set_type_codec(kind, encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")


async def _no_reset(connection: Connection) -> None:
    """Our code leaves no session state behind (no SET, no LISTEN, no open cursors, transaction-scoped locks only),
    so the pool's default reset query would be a wasted round trip on every release."""


class Budget(enum.Enum):
    """Who a connection is for. Each budget has its own share of the pool, so one kind of work (a webhook burst,
    consumptions queued behind a locked row) can never take the connections the others need, and the readiness
    probe always finds one."""

    READ = "read"  # CheckAccess / GetSubscription loads, ledger pages, the change publisher
    WRITE = "write"  # webhook deliveries, plan changes, reconciliation
    CREDIT = "credit"  # ConsumeCredits batches
    PROBE = "probe"  # readiness and health


def split_pool(pool_size: int) -> dict[Budget, int]:
    """Shares of a pool of `pool_size` (at least 4): one probe connection, about 20% for consumption and 30% for
    writes, the rest (at least one) for reads."""
    if pool_size < len(Budget):
        raise ConfigurationError(f"the connection pool needs at least {len(Budget)} connections, got {pool_size}")
    credit = max(1, round(pool_size * 0.2))
    write = max(1, round(pool_size * 0.3))
    return {Budget.PROBE: 1, Budget.CREDIT: credit, Budget.WRITE: write, Budget.READ: pool_size - 1 - credit - write}


class Database:
    """Owns the connection pool and hands out one transaction per unit of work.

    Every wait is bounded: a lock wait by Postgres' `lock_timeout` (set on every pooled connection), a wait for a
    connection by the budget's `acquire_timeout`; both surface as UNAVAILABLE / 503 for that request only.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        connect_timeout: float = 5.0,
        lock_timeout_ms: int = 1000,
        acquire_timeout: float = 2.0,
    ) -> None:
        self.url = plain_url(url)
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.lock_timeout_ms = lock_timeout_ms
        self.acquire_timeout = acquire_timeout
        self.budgets = split_pool(pool_size)
        self._slots = {budget: asyncio.Semaphore(size) for budget, size in self.budgets.items()}
        self._taken = dict.fromkeys(self.budgets, 0)
        self.engine = make_engine(url, connect_timeout=connect_timeout)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        self._pool: asyncpg.Pool | None = None
        self._pool_lock: asyncio.Lock | None = None

    @classmethod
    def from_url(
        cls, url: str, *, pool_size: int = 10, connect_timeout: float = 5.0, lock_timeout_ms: int = 1000
    ) -> Database:
        return cls(url, pool_size=pool_size, connect_timeout=connect_timeout, lock_timeout_ms=lock_timeout_ms)

    def in_use(self) -> dict[Budget, int]:
        """Connections taken right now, by budget (for metrics and tests)."""
        return dict(self._taken)

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
                    server_settings={"lock_timeout": str(self.lock_timeout_ms)},
                )
        return self._pool

    @asynccontextmanager
    async def _slot(self, budget: Budget) -> AsyncIterator[None]:
        slot = self._slots[budget]
        try:
            async with asyncio.timeout(self.acquire_timeout):
                await slot.acquire()
        except TimeoutError:
            raise StorageBusy(budget.value) from None
        self._taken[budget] += 1
        try:
            yield
        finally:
            self._taken[budget] -= 1
            slot.release()

    @asynccontextmanager
    async def tx(self, budget: Budget = Budget.WRITE) -> AsyncIterator[Connection]:
        """One connection in one transaction: committed when the block ends normally, rolled back if it raises."""
        pool = await self.pool()
        async with (
            self._slot(budget),
            pool.acquire(timeout=self.connect_timeout) as connection,
            connection.transaction(),
        ):
            yield connection

    @asynccontextmanager
    async def connection(self, budget: Budget = Budget.READ) -> AsyncIterator[Connection]:
        """One connection without an explicit transaction, for single-statement reads."""
        pool = await self.pool()
        async with self._slot(budget), pool.acquire(timeout=self.connect_timeout) as connection:
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
