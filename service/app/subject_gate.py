"""At most one in-flight transaction per subject (a subscription, a customer's credit account) in this process.

Deliveries for one subject serialize on its row lock in Postgres anyway; without this gate each waiter would hold a
pooled connection while it waits, so a burst for one stuck subject could take every write connection. Waiting
here costs no connection, and is bounded: past `timeout` the delivery is refused (503, Dodo retries later).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from service.domain.errors import Unavailable


class SubjectBusy(Unavailable):
    def __init__(self) -> None:
        super().__init__("another delivery for the same subject is in progress; retry later")


class SubjectGate:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @asynccontextmanager
    async def hold(self, subject: str | None) -> AsyncIterator[None]:
        if subject is None:
            yield
            return
        lock = self._locks.setdefault(subject, asyncio.Lock())
        self._users[subject] = self._users.get(subject, 0) + 1
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    await lock.acquire()
            except TimeoutError:
                raise SubjectBusy() from None
            try:
                yield
            finally:
                lock.release()
        finally:
            # Forget subjects nobody waits for: the map stays as small as the number of subjects in flight.
            self._users[subject] -= 1
            if not self._users[subject]:
                del self._users[subject]
                del self._locks[subject]
