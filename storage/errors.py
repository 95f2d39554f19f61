"""Which exceptions mean "Postgres is unreachable right now" (retry later) rather than a bug."""

from __future__ import annotations

import asyncpg
from sqlalchemy import exc as sa_exc


def is_database_unavailable(error: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(
            current,
            OSError
            | TimeoutError
            | sa_exc.TimeoutError
            | asyncpg.PostgresConnectionError
            | asyncpg.InterfaceError
            | asyncpg.CannotConnectNowError
            | asyncpg.AdminShutdownError
            | asyncpg.TooManyConnectionsError
            # A bounded wait that ran out (lock_timeout, statement timeout): busy now, safe to retry.
            | asyncpg.LockNotAvailableError
            | asyncpg.QueryCanceledError,
        ):
            return True
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, sa_exc.InterfaceError | sa_exc.OperationalError):
            return True
        current = current.__cause__ or current.__context__
    return False


def is_outage(error: BaseException) -> bool:
    """Postgres itself is unreachable or refusing work (not one statement's lock or limit): every request of a
    batch would fail the same way, so there is nothing to gain from retrying them one by one."""
    return is_database_unavailable(error) and not isinstance(
        error, asyncpg.LockNotAvailableError | asyncpg.QueryCanceledError
    )
