"""A caller-side cache of CheckAccess answers, kept right by the WatchEntitlements stream: `client.local(...)`.

    async with client.local(policies={"dashboard": Policy.FAIL_OPEN}, max_staleness=30) as local:
        await local.wait_live()
        decision = await local.check_access("cus_123", "dashboard")   # in-process after the first call

How it stays right:

- An answer is cached per (customer, feature) the first time it is asked for (a CheckAccess RPC) and served from
  memory after that. Entries asked for by `customer_ref` are also tied to the Dodo customer the server resolved
  (`CheckAccessResponse.customer_id`).
- Every event of the stream drops the entries of its `customer_id` and of its `customer_ref` (CUSTOMER_LINKED among
  them), so the next check asks the server again. An entry also expires at its `access_ends_at` (the clock is
  injectable), even before the server's time-driven ACCESS_CHANGED arrives.
- The fill race: an event may arrive while a CheckAccess RPC for that customer is in flight, and its answer may be
  older than the event. Every event gets a sequence number and stamps its customer and ref with it (a
  per-customer generation); an answer is cached only if nothing it is about was stamped after its RPC began.
  Nothing is cached before the stream has a cursor (an event before it could never reach the cache). An answer
  about a customer that had an event in the last `settle` seconds is handed out but not cached either: the replica
  that answers may hear of the change a moment after the stream has told us (its own cache listens separately),
  and an answer cached then would have no later event to drop it.
- While the stream is down (not connected, or reconnected but still replaying): FAIL_CLOSED features never answer
  from the cache (the server is asked; its failure is raised); FAIL_OPEN features answer from the cache for at most
  `max_staleness` seconds after the stream was last known live (up to the moment its break was detected; a silent
  connection is detected by `heartbeat_timeout`), then ask the server. When the stream is back it replays what
  it missed from its cursor, dropping what changed; a cursor past retention empties the whole cache.
- At most `max_entries` answers are kept, least recently used first out.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from entitlements_client._watch import DEFAULT_HEARTBEAT_TIMEOUT, _WatchCore
from entitlements_client.errors import CursorExpired, EntitlementsError, InvalidCursor
from entitlements_client.models import AccessReason, CheckAccessResult, EntitlementEvent, EntitlementEventKind
from entitlements_client.options import ReconnectPolicy

if TYPE_CHECKING:
    from entitlements_client._clients import EntitlementsClient, SyncEntitlementsClient

__all__ = ["LocalCacheStats", "LocalEntitlements", "Policy", "SyncLocalEntitlements"]

log = logging.getLogger("entitlements_client.local")

Clock = Callable[[], datetime]
# ("id" | "ref", the customer id or ref, the feature)
Key = tuple[str, str, str]

# How long to wait before watching again after a failure the watch itself does not retry (a missing scope, an
# older server): the cache keeps working meanwhile, through the server.
_REWATCH_PAUSE = 5.0


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Policy(enum.Enum):
    """What a feature's check does while the stream is down."""

    # Never answer from the cache: ask the server (and raise its failure).
    FAIL_CLOSED = "fail_closed"
    # Answer from the cache for at most `max_staleness` seconds after the stream was last live, then ask the server.
    FAIL_OPEN = "fail_open"


class StreamState(enum.Enum):
    # Connecting, or reconnecting after a break (with backoff).
    DOWN = "down"
    # Connected, replaying what happened after the cursor.
    CATCHING_UP = "catching_up"
    # Caught up and following live: the cache answers.
    LIVE = "live"
    CLOSED = "closed"


@dataclass(frozen=True)
class LocalCacheStats:
    # Answers from memory (`stale_hits` of them while the stream was down, FAIL_OPEN).
    hits: int
    stale_hits: int
    # Checks that asked the server: nothing cached, expired, or the stream down for the feature's policy.
    misses: int
    # Answers stored / not stored because an event for that customer arrived while the RPC was in flight.
    fills: int
    fills_discarded: int
    # Entries dropped by events, by `access_ends_at`, by the size bound; events received.
    invalidations: int
    expirations: int
    evictions: int
    events: int
    entries: int
    stream: StreamState
    reconnects: int
    cursor: str
    # Seconds since the stream was last known live (0 while live, None if it never was).
    staleness: float | None


class _Entry:
    __slots__ = ("customer_id", "ends_at", "ref", "result")

    def __init__(self, result: CheckAccessResult, customer_id: str, ref: str) -> None:
        self.result = result
        self.ends_at = result.access_ends_at
        self.customer_id = customer_id
        self.ref = ref


def _key(customer_id: str | None, customer_ref: str | None, feature: str | None) -> Key:
    if bool(customer_id) == bool(customer_ref):
        raise ValueError("name exactly one of customer_id and customer_ref")
    if feature is None:
        raise TypeError("missing required argument: 'feature'")
    if customer_id:
        return ("id", customer_id, feature)
    return ("ref", customer_ref or "", feature)


def _cacheable(result: CheckAccessResult) -> bool:
    # The server's degraded answers (Postgres unreachable) are for now only.
    return not result.stale and result.reason is not AccessReason.STORAGE_UNAVAILABLE


class _CacheCore:
    """The cache's state and rules, without I/O or locking (the flavours add those)."""

    def __init__(
        self,
        *,
        policies: Mapping[str, Policy],
        default_policy: Policy,
        max_staleness: float,
        max_entries: int,
        clock: Clock,
        settle: float = 0.25,
    ) -> None:
        if settle < 0:
            raise ValueError("settle must be zero or more seconds")
        if max_staleness < 0:
            raise ValueError("max_staleness must be zero or more seconds")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        for feature, policy in policies.items():
            if not isinstance(policy, Policy):
                raise TypeError(f"the policy of {feature!r} must be a Policy, not {type(policy).__name__}")
        self.policies = dict(policies)
        self.default_policy = default_policy
        self.max_staleness = max_staleness
        self.max_entries = max_entries
        self.clock = clock
        self.entries: OrderedDict[Key, _Entry] = OrderedDict()
        self.by_customer: dict[str, set[Key]] = {}
        self.by_ref: dict[str, set[Key]] = {}
        # The fill race: each event's sequence number stamped on what it touched, while any fill is in flight.
        self.seq = 0
        self.cleared_at = 0
        self.touched: dict[tuple[str, str], int] = {}
        self.inflight: Counter[int] = Counter()
        # (monotonic time, customer or ref) of the events of the last `settle` seconds, oldest first.
        self.settle = settle
        self.recent: deque[tuple[float, tuple[str, str]]] = deque()
        self.recent_at: dict[tuple[str, str], float] = {}
        self.state = StreamState.DOWN
        self.has_cursor = False
        self.last_live: datetime | None = None
        self.reconnects = 0
        self.cursor = ""
        self.hits = self.stale_hits = self.misses = self.fills = self.fills_discarded = 0
        self.invalidations = self.expirations = self.evictions = self.events = 0

    # --- answering -------------------------------------------------------------------------------------------

    def lookup(self, key: Key) -> CheckAccessResult | None:
        """The cached answer to serve, or None: ask the server."""
        stale = self.state is not StreamState.LIVE
        if stale:
            policy = self.policies.get(key[2], self.default_policy)
            if policy is Policy.FAIL_CLOSED or not self._fresh_enough():
                self.misses += 1
                return None
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry.ends_at is not None and self.clock() >= entry.ends_at:
            self._drop(key)
            self.expirations += 1
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        if stale:
            self.stale_hits += 1
        return entry.result

    def peek(self, key: Key) -> CheckAccessResult | None:
        """The cached answer as it stands (expired or not), without counting or reordering anything."""
        entry = self.entries.get(key)
        return None if entry is None else entry.result

    def _fresh_enough(self) -> bool:
        if self.last_live is None:
            return False
        return (self.clock() - self.last_live).total_seconds() <= self.max_staleness

    def begin_fill(self) -> int | None:
        """A token for an RPC about to fill the cache (None: this answer may not be cached)."""
        if not self.has_cursor:
            return None
        self.inflight[self.seq] += 1
        return self.seq

    def end_fill(self, token: int | None, key: Key, result: CheckAccessResult | None) -> None:
        """The RPC begun with `token` answered `result` (None: it failed)."""
        if token is None:
            return
        self.inflight[token] -= 1
        if self.inflight[token] <= 0:
            del self.inflight[token]
        try:
            if result is None or not _cacheable(result):
                return
            customer_id = result.customer_id or (key[1] if key[0] == "id" else "")
            ref = key[1] if key[0] == "ref" else ""
            names = [("id", customer_id)] if customer_id else []
            if ref:
                names.append(("ref", ref))
            if (
                token < self.cleared_at
                or any(self.touched.get(name, 0) > token for name in names)
                or self._settling(names)
            ):
                self.fills_discarded += 1
                return
            self._store(key, _Entry(result, customer_id, ref))
        finally:
            if not self.inflight:
                self.touched.clear()

    def _settling(self, names: list[tuple[str, str]]) -> bool:
        if not self.settle:
            return False
        now = time.monotonic()
        recent = self.recent
        while recent and now - recent[0][0] > self.settle:
            at, name = recent.popleft()
            if self.recent_at.get(name) == at:
                del self.recent_at[name]
        return any(now - self.recent_at.get(name, -self.settle - 1) <= self.settle for name in names)

    def _store(self, key: Key, entry: _Entry) -> None:
        if key in self.entries:
            self._drop(key)
        self.entries[key] = entry
        if entry.customer_id:
            self.by_customer.setdefault(entry.customer_id, set()).add(key)
        if entry.ref:
            self.by_ref.setdefault(entry.ref, set()).add(key)
        self.fills += 1
        while len(self.entries) > self.max_entries:
            oldest = next(iter(self.entries))
            self._drop(oldest)
            self.evictions += 1

    def _drop(self, key: Key) -> None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        for index, name in ((self.by_customer, entry.customer_id), (self.by_ref, entry.ref)):
            if name:
                keys = index.get(name)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del index[name]

    # --- the stream ------------------------------------------------------------------------------------------

    def on_event(self, event: EntitlementEvent) -> None:
        if event.cursor:
            self.cursor = event.cursor
        if event.kind is EntitlementEventKind.HEARTBEAT:
            return
        self.events += 1
        self.seq += 1
        touched: list[tuple[str, str]] = []
        if event.customer_id:
            touched.append(("id", event.customer_id))
        if event.customer_ref:
            touched.append(("ref", event.customer_ref))
        now = time.monotonic() if self.settle else 0.0
        for name in touched:
            if self.inflight:
                self.touched[name] = self.seq
            if self.settle:
                self.recent.append((now, name))
                self.recent_at[name] = now
            keys = (self.by_customer if name[0] == "id" else self.by_ref).get(name[1])
            if keys:
                for key in tuple(keys):
                    self._drop(key)
                    self.invalidations += 1

    def clear(self) -> None:
        """Forget every answer (the stream cannot say what changed), and every fill in flight."""
        self.seq += 1
        self.cleared_at = self.seq
        self.invalidations += len(self.entries)
        self.entries.clear()
        self.by_customer.clear()
        self.by_ref.clear()

    def on_state(self, watch: _WatchCore) -> None:
        self.has_cursor = bool(watch.cursor)
        self.cursor = watch.cursor
        self.reconnects = watch.reconnects
        if watch.closed:
            state = StreamState.DOWN
        elif watch.live:
            state = StreamState.LIVE
        elif watch.connected:
            state = StreamState.CATCHING_UP
        else:
            state = StreamState.DOWN
        if state is not self.state and StreamState.LIVE in (state, self.state):
            self.last_live = self.clock()
        self.state = state

    def stats(self) -> LocalCacheStats:
        staleness: float | None
        if self.state is StreamState.LIVE:
            staleness = 0.0
        elif self.last_live is None:
            staleness = None
        else:
            staleness = max((self.clock() - self.last_live).total_seconds(), 0.0)
        return LocalCacheStats(
            hits=self.hits,
            stale_hits=self.stale_hits,
            misses=self.misses,
            fills=self.fills,
            fills_discarded=self.fills_discarded,
            invalidations=self.invalidations,
            expirations=self.expirations,
            evictions=self.evictions,
            events=self.events,
            entries=len(self.entries),
            stream=self.state,
            reconnects=self.reconnects,
            cursor=self.cursor,
            staleness=staleness,
        )


@dataclass(frozen=True)
class _Options:
    policies: Mapping[str, Policy]
    default_policy: Policy
    max_staleness: float
    max_entries: int
    customer_ids: Sequence[str]
    clock: Clock
    reconnect: ReconnectPolicy | None
    heartbeat_timeout: float | None
    settle: float

    def core(self) -> _CacheCore:
        return _CacheCore(
            policies=self.policies,
            default_policy=self.default_policy,
            max_staleness=self.max_staleness,
            max_entries=self.max_entries,
            clock=self.clock,
            settle=self.settle,
        )

    def watch_options(self, on_state: Callable[[_WatchCore], None]) -> dict[str, Any]:
        return {
            "heartbeats": True,
            "reconnect": self.reconnect,
            "heartbeat_timeout": self.heartbeat_timeout,
            "on_state": on_state,
        }


def local_options(
    *,
    policies: Mapping[str, Policy] | None = None,
    default_policy: Policy = Policy.FAIL_CLOSED,
    max_staleness: float = 30.0,
    max_entries: int = 100_000,
    customer_ids: Sequence[str] = (),
    clock: Clock | None = None,
    reconnect: ReconnectPolicy | None = None,
    heartbeat_timeout: float | None = DEFAULT_HEARTBEAT_TIMEOUT,
    settle: float = 0.25,
) -> _Options:
    if isinstance(customer_ids, str):
        raise TypeError("customer_ids must be a sequence of customer ids, not a single one")
    return _Options(
        policies=dict(policies or {}),
        default_policy=default_policy,
        max_staleness=max_staleness,
        max_entries=max_entries,
        customer_ids=tuple(customer_ids),
        clock=clock or _utc_now,
        reconnect=reconnect,
        heartbeat_timeout=heartbeat_timeout,
        settle=settle,
    )


class LocalEntitlements:
    """The async local cache (see the module docstring). `async with client.local(...) as local:` starts
    following the stream (or `await local.start()`, then `await local.close()`)."""

    def __init__(self, client: EntitlementsClient, options: _Options) -> None:
        self._client = client
        self._options = options
        self._core = options.core()
        self._task: asyncio.Task[None] | None = None
        self._watch: Any = None
        self._live = asyncio.Event()
        self._closed = False
        self.last_error: EntitlementsError | None = None

    async def __aenter__(self) -> LocalEntitlements:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow(), name="entitlements-local-watch")

    async def wait_live(self, timeout: float | None = None) -> None:
        """Until the stream has caught up (the cache answers from memory from then on); TimeoutError after
        `timeout` seconds."""
        await asyncio.wait_for(self._live.wait(), timeout)

    @property
    def live(self) -> bool:
        return self._core.state is StreamState.LIVE

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> LocalCacheStats:
        return self._core.stats()

    def peek(
        self, customer_id: str | None = None, feature: str | None = None, *, customer_ref: str | None = None
    ) -> CheckAccessResult | None:
        """The answer the cache holds for this customer and feature, if any (no RPC, no policy, no counters)."""
        return self._core.peek(_key(customer_id, customer_ref, feature))

    def _on_state(self, watch: _WatchCore) -> None:
        self._core.on_state(watch)
        if self._core.state is StreamState.LIVE:
            self._live.set()
        else:
            self._live.clear()

    async def _follow(self) -> None:
        cursor = ""
        options = self._options
        while not self._closed:
            watch = self._client.watch(
                options.customer_ids, after_cursor=cursor, **options.watch_options(self._on_state)
            )
            self._watch = watch
            refused = False
            try:
                async for event in watch:
                    self._core.on_event(event)
                    if self.closed:
                        break
            except (CursorExpired, InvalidCursor) as error:
                log.warning("local cache: the stream's cursor was refused (%s); emptying the cache", error)
                self.last_error = error
                self._core.clear()
                refused = True
            except EntitlementsError as error:
                log.warning("local cache: watching failed (%s); again in %g s", error, _REWATCH_PAUSE)
                self.last_error = error
                await asyncio.sleep(_REWATCH_PAUSE)
            finally:
                await watch.aclose()
                self._on_state(watch)
            cursor = "" if refused else watch.cursor

    async def close(self) -> None:
        self._closed = True
        watch = self._watch
        if watch is not None:
            await watch.aclose()  # ends the iteration even if the cancellation below were lost
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._core.state = StreamState.CLOSED
        self._live.clear()

    async def check_access(
        self,
        customer_id: str | None = None,
        feature: str | None = None,
        *,
        customer_ref: str | None = None,
        timeout: float | None = None,
    ) -> CheckAccessResult:
        """As `EntitlementsClient.check_access`, answered from memory when the cache may."""
        key = _key(customer_id, customer_ref, feature)
        core = self._core
        cached = core.lookup(key)
        if cached is not None:
            return cached
        token = core.begin_fill()
        result: CheckAccessResult | None = None
        try:
            if key[0] == "id":
                result = await self._client.check_access(key[1], key[2], timeout=timeout)
            else:
                result = await self._client.check_access(customer_ref=key[1], feature=key[2], timeout=timeout)
            return result
        finally:
            core.end_fill(token, key, result)


class SyncLocalEntitlements:
    """The blocking local cache (see the module docstring): a daemon thread follows the stream. Thread-safe.
    `with client.local(...) as local:` (or `start()`, then `close()`)."""

    def __init__(self, client: SyncEntitlementsClient, options: _Options) -> None:
        self._client = client
        self._options = options
        self._core = options.core()
        self._lock = threading.Lock()
        self._live = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Any = None
        self.last_error: EntitlementsError | None = None

    def __enter__(self) -> SyncLocalEntitlements:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, name="entitlements-local-watch", daemon=True)
            self._thread.start()

    def wait_live(self, timeout: float | None = None) -> None:
        """Until the stream has caught up; TimeoutError after `timeout` seconds."""
        if not self._live.wait(timeout):
            raise TimeoutError("the entitlement stream did not catch up in time")

    @property
    def live(self) -> bool:
        return self._core.state is StreamState.LIVE

    def stats(self) -> LocalCacheStats:
        with self._lock:
            return self._core.stats()

    def peek(
        self, customer_id: str | None = None, feature: str | None = None, *, customer_ref: str | None = None
    ) -> CheckAccessResult | None:
        """The answer the cache holds for this customer and feature, if any (no RPC, no policy, no counters)."""
        key = _key(customer_id, customer_ref, feature)
        with self._lock:
            return self._core.peek(key)

    def _on_state(self, watch: _WatchCore) -> None:
        with self._lock:
            self._core.on_state(watch)
            live = self._core.state is StreamState.LIVE
        if live:
            self._live.set()
        else:
            self._live.clear()

    def _follow(self) -> None:
        cursor = ""
        options = self._options
        while not self._stop.is_set():
            watch = self._client.watch(
                options.customer_ids, after_cursor=cursor, **options.watch_options(self._on_state)
            )
            self._watch = watch
            if self._stop.is_set():
                watch.close()
            try:
                for event in watch:
                    with self._lock:
                        self._core.on_event(event)
            except (CursorExpired, InvalidCursor) as error:
                log.warning("local cache: the stream's cursor was refused (%s); emptying the cache", error)
                self.last_error = error
                with self._lock:
                    self._core.clear()
                cursor = ""
                continue
            except EntitlementsError as error:
                log.warning("local cache: watching failed (%s); again in %g s", error, _REWATCH_PAUSE)
                self.last_error = error
                self._stop.wait(_REWATCH_PAUSE)
            finally:
                watch.close()
                self._on_state(watch)
            cursor = watch.cursor

    def close(self) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.close()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)
        with self._lock:
            self._core.state = StreamState.CLOSED
        self._live.clear()

    def check_access(
        self,
        customer_id: str | None = None,
        feature: str | None = None,
        *,
        customer_ref: str | None = None,
        timeout: float | None = None,
    ) -> CheckAccessResult:
        """As `SyncEntitlementsClient.check_access`, answered from memory when the cache may."""
        key = _key(customer_id, customer_ref, feature)
        core = self._core
        with self._lock:
            cached = core.lookup(key)
            if cached is not None:
                return cached
            token = core.begin_fill()
        result: CheckAccessResult | None = None
        try:
            if key[0] == "id":
                result = self._client.check_access(key[1], key[2], timeout=timeout)
            else:
                result = self._client.check_access(customer_ref=key[1], feature=key[2], timeout=timeout)
            return result
        finally:
            with self._lock:
                core.end_fill(token, key, result)
