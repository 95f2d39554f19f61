"""The one mechanism for long-lived tasks (cache listener, change publisher, credit writers, reconciler, ...):
spawned through a `BackgroundTasks`, cancelled and awaited together when the process stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("entitlements.background")


class BackgroundTasks:
    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def spawn(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        _ = self.handle(name, work)

    def handle(self, name: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """`spawn`, keeping the task: for work a caller may also wait for (still stopped with the rest)."""
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(_report_crash)
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(task)
        return task

    @property
    def running(self) -> dict[str, asyncio.Task[None]]:
        """The tasks still running, by name."""
        return {task.get_name(): task for task in self._tasks if not task.done()}

    async def stop(self) -> None:
        """Cancel every task spawned here and wait until each has finished its cleanup."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _report_crash(task: asyncio.Task[None]) -> None:
    # A background loop is meant to run until cancelled: ending any other way is a bug an operator must see.
    if not task.cancelled() and task.exception() is not None:
        log.error("background.crashed", extra={"task": task.get_name()}, exc_info=task.exception())


async def wait_for_event(event: asyncio.Event, seconds: float) -> bool:
    """Whether `event` is set within `seconds`.

    For the wake-ups of background loops, instead of `asyncio.wait_for(event.wait(), timeout)`: on Python 3.11 that
    can swallow a cancellation that arrives just as its timeout expires (CPython gh-86296), and a loop whose stop
    was swallowed keeps running, so stopping the process waits for it forever. `asyncio.timeout` keeps it."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
