"""`watch()`: WatchEntitlements as an iterator of typed events that resumes by itself.

The server stream replays every event after a cursor in commit order, sends one HEARTBEAT once caught up ("live
from here"), then follows live with a HEARTBEAT while idle; every message carries the cursor to resume from. A
watch keeps the last cursor it received (`cursor`) and, when the stream breaks (UNAVAILABLE: a replica went away, a
restart; RESOURCE_EXHAUSTED / WATCH_SUBSCRIBER_TOO_SLOW; the server ending or cancelling the stream; no message for
`heartbeat_timeout` seconds), reconnects from it with bounded exponential backoff: nothing is lost or repeated. A
cursor the server refuses (CURSOR_EXPIRED, an unknown cursor) is raised as `CursorExpired` / `InvalidCursor`,
never retried, and so is every other failure.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc

from entitlements_client import _rpcs
from entitlements_client.errors import (
    Cancelled,
    EntitlementsError,
    SubscriberTooSlow,
    Unavailable,
    from_rpc_error,
)
from entitlements_client.models import EntitlementEvent
from entitlements_client.options import ReconnectPolicy

__all__ = ["DEFAULT_HEARTBEAT_TIMEOUT", "EntitlementWatch", "SyncEntitlementWatch", "WatchStateListener"]

# The server heartbeats every 15 s by default: three missed ones mean the connection is dead.
DEFAULT_HEARTBEAT_TIMEOUT = 45.0

WatchStateListener = Callable[["_WatchCore"], None]


def resumable(failure: EntitlementsError) -> bool:
    """Whether reconnecting from the last cursor is the answer to `failure`. CANCELLED counts when this side did
    not ask for it (a server or proxy that cancels its streams as it shuts down)."""
    return isinstance(failure, Unavailable | SubscriberTooSlow | Cancelled)


class _WatchCore:
    """State both flavours share: the cursor, whether the stream is live, the reconnect bookkeeping."""

    def __init__(
        self,
        customer_ids: Sequence[str],
        after_cursor: str,
        *,
        metadata: tuple[tuple[str, str], ...],
        heartbeats: bool,
        reconnect: ReconnectPolicy | None,
        heartbeat_timeout: float | None,
        on_state: WatchStateListener | None,
    ) -> None:
        if heartbeat_timeout is not None and heartbeat_timeout <= 0:
            raise ValueError("heartbeat_timeout must be positive (or None: never)")
        # Refuse a bad argument before anything is sent.
        _rpcs.watch_entitlements_request(customer_ids, after_cursor)
        self.customer_ids = tuple(customer_ids)
        self._cursor = after_cursor
        self._metadata = metadata
        self._heartbeats = heartbeats
        self._reconnect = reconnect or ReconnectPolicy()
        self._heartbeat_timeout = heartbeat_timeout
        self._on_state = on_state
        self._connected = False
        self._caught_up = False
        self._failures = 0
        self._closed = False
        self.reconnects = 0
        self.last_error: EntitlementsError | None = None

    @property
    def cursor(self) -> str:
        """The last cursor received (an event's or a heartbeat's): where a new watch would resume."""
        return self._cursor

    @property
    def connected(self) -> bool:
        """A stream is open and has delivered at least one message."""
        return self._connected

    @property
    def caught_up(self) -> bool:
        """The open stream has replayed everything after the cursor and follows live."""
        return self._caught_up

    @property
    def live(self) -> bool:
        return self._connected and self._caught_up

    @property
    def closed(self) -> bool:
        return self._closed

    def _request(self) -> Any:
        return _rpcs.watch_entitlements_request(self.customer_ids, self._cursor)

    def _notify(self) -> None:
        if self._on_state is not None:
            self._on_state(self)

    def _received(self, message: Any) -> EntitlementEvent | None:
        """The event to hand out for `message` (None: a heartbeat the caller did not ask for)."""
        event = _rpcs.WATCH_ENTITLEMENTS.convert(message)
        if event.cursor:
            self._cursor = event.cursor
        self._failures = 0
        changed = not self._connected or (event.is_heartbeat and not self._caught_up)
        self._connected = True
        if event.is_heartbeat:
            self._caught_up = True
        if changed:
            self._notify()
        if event.is_heartbeat and not self._heartbeats:
            return None
        return event

    def _broken(self, failure: EntitlementsError) -> float:
        """Record a broken stream; the pause before reconnecting, or raise `failure` when that is not the answer."""
        was = self.live or self._connected
        self._connected = self._caught_up = False
        self.last_error = failure
        if isinstance(failure, SubscriberTooSlow) and failure.cursor:
            self._cursor = failure.cursor
        if was:
            self._notify()
        if self._closed:
            raise StopIteration
        if not resumable(failure):
            self._closed = True
            self._notify()
            raise failure
        self._failures += 1
        if self._reconnect.max_attempts is not None and self._failures >= self._reconnect.max_attempts:
            self._closed = True
            self._notify()
            raise failure
        self.reconnects += 1
        return self._reconnect.backoff(self._failures)


def _ended() -> Unavailable:
    return Unavailable(grpc.StatusCode.UNAVAILABLE, "the server ended the watch stream")


def _silent(seconds: float) -> Unavailable:
    return Unavailable(grpc.StatusCode.UNAVAILABLE, f"no message on the watch stream for {seconds:g} s")


class EntitlementWatch(_WatchCore, AsyncIterator[EntitlementEvent]):
    """An async iterator of `EntitlementEvent`s (see the module docstring); `aclose()` ends it."""

    def __init__(self, channel: grpc.aio.Channel, customer_ids: Sequence[str], after_cursor: str, **options: Any):
        super().__init__(customer_ids, after_cursor, **options)
        self._method = channel.unary_stream(
            _rpcs.WATCH_ENTITLEMENTS.path,
            request_serializer=_rpcs.WATCH_ENTITLEMENTS.serialize,
            response_deserializer=_rpcs.WATCH_ENTITLEMENTS.deserialize,
        )
        self._call: Any = None
        self._pause = 0.0
        self._silenced: Any = None

    def __aiter__(self) -> EntitlementWatch:
        return self

    def _silence(self, call: Any) -> None:
        self._silenced = call
        call.cancel()

    async def __anext__(self) -> EntitlementEvent:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._call is None:
                if self._pause:
                    await asyncio.sleep(self._pause)
                    self._pause = 0.0
                    if self._closed:
                        raise StopAsyncIteration
                self._call = self._method(self._request(), metadata=self._metadata)
            call = self._call
            # The watchdog cancels a silent call (a timer, not asyncio.wait_for: no task per message, and no
            # cancellation of ours swallowed by wait_for's race on Python < 3.12).
            timer = None
            if self._heartbeat_timeout is not None:
                timer = asyncio.get_running_loop().call_later(self._heartbeat_timeout, self._silence, call)
            try:
                message = await call.read()
            except asyncio.CancelledError:
                if self._silenced is not call:
                    raise
                self._fail(_silent(self._heartbeat_timeout or 0))
                continue
            except grpc.RpcError as error:
                if self._silenced is call:
                    self._fail(_silent(self._heartbeat_timeout or 0))
                else:
                    self._fail(from_rpc_error(error), error)
                continue
            finally:
                if timer is not None:
                    timer.cancel()
            if message is grpc.aio.EOF:
                self._fail(_ended())
                continue
            event = self._received(message)
            if event is not None:
                return event

    def _fail(self, failure: EntitlementsError, cause: BaseException | None = None) -> None:
        self._call = None
        try:
            self._pause = self._broken(failure)
        except StopIteration:
            raise StopAsyncIteration from None
        except EntitlementsError as raised:
            raise raised from cause

    async def aclose(self) -> None:
        self._closed = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def __aenter__(self) -> EntitlementWatch:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


class SyncEntitlementWatch(_WatchCore, Iterator[EntitlementEvent]):
    """An iterator of `EntitlementEvent`s (see the module docstring); `close()` (from any thread) ends it."""

    def __init__(self, channel: grpc.Channel, customer_ids: Sequence[str], after_cursor: str, **options: Any):
        super().__init__(customer_ids, after_cursor, **options)
        self._method = channel.unary_stream(
            _rpcs.WATCH_ENTITLEMENTS.path,
            request_serializer=_rpcs.WATCH_ENTITLEMENTS.serialize,
            response_deserializer=_rpcs.WATCH_ENTITLEMENTS.deserialize,
        )
        self._call: Any = None
        self._pause = 0.0
        self._lock = threading.Lock()
        self._last_message = time.monotonic()
        self._timed_out = False
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    def __iter__(self) -> SyncEntitlementWatch:
        return self

    def __next__(self) -> EntitlementEvent:
        while True:
            if self._closed:
                raise StopIteration
            if self._call is None:
                if self._pause:
                    self._stop.wait(self._pause)
                    self._pause = 0.0
                with self._lock:
                    if self._closed:
                        raise StopIteration
                    self._timed_out = False
                    self._last_message = time.monotonic()
                    self._call = self._method(self._request(), metadata=self._metadata)
                self._start_watchdog()
            call = self._call
            try:
                message = next(call)
            except StopIteration:
                self._fail(_ended())
                continue
            except grpc.RpcError as error:
                if self._timed_out:
                    self._fail(_silent(self._heartbeat_timeout or 0))
                else:
                    self._fail(from_rpc_error(error), error)
                continue
            self._last_message = time.monotonic()
            event = self._received(message)
            if event is not None:
                return event

    def _fail(self, failure: EntitlementsError, cause: BaseException | None = None) -> None:
        with self._lock:
            self._call = None
        try:
            self._pause = self._broken(failure)
        except EntitlementsError as raised:
            self._stop.set()
            raise raised from cause
        except StopIteration:
            self._stop.set()
            raise

    def _start_watchdog(self) -> None:
        if self._heartbeat_timeout is None or self._watchdog is not None:
            return
        limit = self._heartbeat_timeout

        def watch() -> None:
            while not self._stop.wait(min(limit / 4, 1.0)):
                with self._lock:
                    if self._call is not None and time.monotonic() - self._last_message > limit:
                        self._timed_out = True
                        self._call.cancel()

        self._watchdog = threading.Thread(target=watch, name="entitlements-watchdog", daemon=True)
        self._watchdog.start()

    def close(self) -> None:
        self._closed = True
        self._stop.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()

    def __enter__(self) -> SyncEntitlementWatch:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
