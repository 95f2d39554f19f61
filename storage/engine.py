"""Engine, sessions and the one transaction helper every edge (RPC, webhook delivery, CLI) uses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


def async_url(url: str) -> str:
    """Accept `postgresql://`, `postgres://` and `postgresql+asyncpg://` alike: the driver is asyncpg."""
    parts = urlsplit(url)
    if parts.scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        return urlunsplit(parts._replace(scheme="postgresql+asyncpg"))
    raise ValueError(f"DATABASE_URL must be a postgresql:// URL, got scheme {parts.scheme!r}")


def plain_url(url: str) -> str:
    """The same URL for libpq-style clients (asyncpg used directly, psql)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql"))


def make_engine(url: str, *, pool_size: int = 10, connect_timeout: float = 5.0) -> AsyncEngine:
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        # Fail fast when Postgres is away so callers get UNAVAILABLE/503 quickly and retry.
        pool_timeout=connect_timeout,
        pool_pre_ping=False,
        connect_args={"timeout": connect_timeout, "command_timeout": 30},
    )


class Database:
    """Owns the engine and hands out one session per unit of work."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False, autoflush=False)

    @classmethod
    def from_url(cls, url: str, **kwargs: float | int) -> Database:
        return cls(make_engine(url, **kwargs))  # type: ignore[arg-type]

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One session, committed when the block ends normally and rolled back when it raises."""
        async with self._sessions() as session, session.begin():
            yield session

    async def close(self) -> None:
        await self.engine.dispose()
