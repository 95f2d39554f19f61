"""WatchEntitlements streams: one reader of the watch log per process, fanned out to every open stream.

The hub follows the log's head (woken by the sequencers' NOTIFY from any replica, by this process's own sequencer
at once, and by a poll every second if the listening connection is down), reads each new page of events once, and
hands it to the streams whose filter it matches. So a thousand streams cost one read per page, not a thousand.

A stream first replays from Postgres what lies between its cursor and the hub's position when it joined (its
buffer collects everything after that meanwhile), says it has caught up with a heartbeat, then follows the hub.
Each stream's buffer is bounded: a reader that falls behind by more than `buffer` events (checked per page of at
most 500) is cut off with
WATCH_SUBSCRIBER_TOO_SLOW and the cursor of the last event it was given, and never slows the hub, the writers or
the other streams. While idle, a stream gets a heartbeat every `heartbeat` seconds, whose cursor moves past
events its filter skipped (so a quiet customer's cursor does not age out of retention).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from service.app.background import BackgroundTasks, wait_for_event
from service.domain.errors import CursorExpired, InvalidField, ResourceExhausted, Unavailable, WatchSubscriberTooSlow
from service.domain.watch_rules import Cursor, WatchEvent
from storage.engine import Budget, Database
from storage.errors import is_database_unavailable
from storage.repositories.watch import WATCH_CHANNEL, WatchRepository

log = logging.getLogger("entitlements.watch")

_PAGE = 500
# Replays from Postgres at once per process: streams opened with old cursors take turns, so they cannot take the
# read budget's connections from CheckAccess (each page holds one connection for one short statement).
_REPLAYS = 2
LISTENER_NAME = "entitlements-watch-listener"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    cursor: str


class WatchStreamsFull(ResourceExhausted):
    reason = "WATCH_STREAMS_FULL"


class HubStopping(Unavailable):
    reason = "SHUTTING_DOWN"


class _Stream:
    """One open stream's side of the hub: its filter and its bounded buffer."""

    __slots__ = ("behind", "closed", "customers", "overflowed", "pages", "queued", "ready")

    def __init__(self, customers: frozenset[str] | None) -> None:
        self.customers = customers
        self.pages: deque[Sequence[WatchEvent]] = deque()
        self.queued = 0
        self.ready = asyncio.Event()
        self.overflowed = False
        self.behind = 0
        self.closed = False

    def offer(self, page: Sequence[WatchEvent], limit: int) -> bool:
        """Buffer what of `page` this stream wants; False when the stream is now more than `limit` events behind
        (its buffer is dropped then: it ends, and resumes from its cursor)."""
        if self.customers is not None:
            page = [event for event in page if event.customer_id in self.customers]
            if not page:
                return True
        self.pages.append(page)
        self.queued += len(page)
        self.ready.set()
        if self.queued > limit:
            self.overflowed = True
            self.behind = self.queued
            self.pages.clear()
            self.queued = 0
            return False
        return True

    def take(self) -> Sequence[WatchEvent]:
        page = self.pages.popleft()
        self.queued -= len(page)
        if not self.pages:
            self.ready.clear()
        return page


class WatchHub:
    def __init__(
        self,
        db: Database,
        *,
        buffer: int = 10_000,
        heartbeat: float = 15.0,
        max_streams: int = 1000,
        poll_interval: float = 1.0,
    ) -> None:
        self.db = db
        self.buffer = buffer
        self.heartbeat = heartbeat
        self.max_streams = max_streams
        self.poll_interval = poll_interval
        self.position = -1
        self.epoch = ""
        self._streams: set[_Stream] = set()
        self._wake = asyncio.Event()
        self._started = asyncio.Event()
        self._stopping = False
        self._listener: asyncpg.Connection | None = None
        self._replays = asyncio.Semaphore(_REPLAYS)
        self.overflows = 0

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def start(self, tasks: BackgroundTasks) -> None:
        tasks.spawn("watch-hub", self._follow())
        tasks.spawn("watch-listener", self._listen_forever())

    def appended(self, position: int) -> None:
        """This process's sequencer committed up to `position`: read it now rather than at the notice."""
        if position > self.position:
            self._wake.set()

    def stop(self) -> None:
        """End every stream with UNAVAILABLE (its client resumes elsewhere with its cursor)."""
        self._stopping = True
        for stream in self._streams:
            stream.closed = True
            stream.ready.set()

    def figures(self) -> dict[str, int]:
        return {"streams": len(self._streams), "position": max(self.position, 0), "cut": self.overflows}

    # --- one stream ------------------------------------------------------------------------------------------------

    async def watch(
        self, customers: frozenset[str] | None, after: Cursor | None
    ) -> AsyncIterator[WatchEvent | Heartbeat]:
        """Events after `after` (None: from now) for these customers (None: all), then live; see the module doc."""
        if self._stopping:
            raise HubStopping("the service is shutting down; resume on another replica")
        if len(self._streams) >= self.max_streams:
            raise WatchStreamsFull(f"this replica already serves {self.max_streams} streams; retry on another")
        if not await wait_for_event(self._started, 5.0):
            raise Unavailable("the watch log cannot be read right now")
        stream = _Stream(customers)
        # Joined at `joined`: the buffer gets every event after it; the replay covers (after, joined].
        joined = self.position
        self._streams.add(stream)
        try:
            last = joined
            if after is not None:
                last = await self._check(after)
                while last < joined:
                    async with self._replays, self.db.connection(Budget.READ) as connection:
                        page = await WatchRepository(connection).read(last, joined, customers, _PAGE)
                    if not page:
                        last = joined
                        break
                    for event in page:
                        yield event
                    last = page[-1].position
                    if len(page) < _PAGE:
                        last = joined
            last = max(last, joined)
            yield Heartbeat(self.cursor(last))
            while True:
                if not stream.pages:
                    await wait_for_event(stream.ready, self.heartbeat)
                if stream.closed:
                    raise HubStopping("the service is shutting down; resume on another replica")
                if stream.overflowed:
                    raise WatchSubscriberTooSlow(self.cursor(last), stream.behind)
                if not stream.pages:
                    # Nothing buffered: every event up to the hub's position that this stream wants was given.
                    last = max(last, self.position)
                    yield Heartbeat(self.cursor(last))
                    continue
                for event in stream.take():
                    if event.position > last:
                        yield event
                        last = event.position
        finally:
            self._streams.discard(stream)

    def cursor(self, position: int) -> str:
        return Cursor(self.epoch, position).text()

    async def _check(self, after: Cursor) -> int:
        async with self.db.connection(Budget.READ) as connection:
            head = await WatchRepository(connection).head()
        if after.epoch != head.epoch or after.position > head.position:
            raise InvalidField("after_cursor", "after_cursor is not a cursor this service issued")
        if after.position < head.pruned_through:
            raise CursorExpired(
                "the events after this cursor are past retention; watch from now and reload what you cache",
                metadata={"pruned_through": self.cursor(head.pruned_through)},
            )
        return after.position

    # --- following the log -------------------------------------------------------------------------------------

    async def _follow(self) -> None:
        while True:
            try:
                if not self._started.is_set():
                    async with self.db.connection(Budget.READ) as connection:
                        head = await WatchRepository(connection).head()
                    self.epoch, self.position = head.epoch, head.position
                    self._started.set()
                await self._catch_up()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not is_database_unavailable(error):
                    log.exception("watch.read_failed")
                await asyncio.sleep(self.poll_interval)
                continue
            await wait_for_event(self._wake, self.poll_interval)
            self._wake.clear()

    async def _catch_up(self) -> None:
        if not self._streams:
            # Nobody to give events to: follow the head's position alone (one small read instead of decoding every
            # event). A stream that joins later replays from Postgres up to where it joined.
            async with self.db.connection(Budget.READ) as connection:
                head = await WatchRepository(connection).head()
            if not self._streams:  # still nobody (one that joined meanwhile needs the events read below)
                self.position = max(self.position, head.position)
                return
        while True:
            async with self.db.connection(Budget.READ) as connection:
                page = await WatchRepository(connection).read(self.position, 2**63 - 1, None, _PAGE)
            if not page:
                return
            self._fan_out(page)
            if len(page) < _PAGE:
                return

    def _fan_out(self, page: Sequence[WatchEvent]) -> None:
        # No await from here to the position's move: a stream sees either all of this page or none of it.
        for stream in list(self._streams):
            if not stream.overflowed and not stream.offer(page, self.buffer):
                self.overflows += 1
                log.warning("watch.subscriber_too_slow", extra={"behind": stream.behind})
        self.position = page[-1].position

    # --- the NOTIFY wake-up ------------------------------------------------------------------------------------

    async def _listen_forever(self) -> None:
        while True:
            try:
                connection = await asyncpg.connect(
                    self.db.url,
                    timeout=self.db.connect_timeout,
                    server_settings={"application_name": LISTENER_NAME},
                )
                self._listener = connection
                closed = asyncio.Event()
                connection.add_termination_listener(lambda _, ended=closed: ended.set())
                await connection.add_listener(WATCH_CHANNEL, self._on_notice)
                # Anything appended while we were not listening.
                self._wake.set()
                await closed.wait()
            except asyncio.CancelledError:
                listener, self._listener = self._listener, None
                if listener is not None and not listener.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(listener.close(), timeout=2)
                raise
            except Exception as error:
                if not is_database_unavailable(error):
                    log.exception("watch.listener_failed")
            # Without the listener the hub still polls every poll_interval.
            await asyncio.sleep(self.poll_interval)

    def _on_notice(self, connection: Any, pid: int, channel: str, payload: object) -> None:
        self._wake.set()
