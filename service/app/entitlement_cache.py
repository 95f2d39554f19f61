"""A bounded in-process cache of per-customer entitlement snapshots, invalidated across replicas by Postgres
LISTEN/NOTIFY.

Every write path records the changed customers in the change feed inside its transaction; after the commit the
writer's own process forgets them at once and the publisher (service/app/change_feed.py) sends the notice on
`entitlements_changed` that makes every other replica forget them. Snapshots hold raw state, never decisions:
expiry is a comparison made at check time, so a cached snapshot stays time-correct however long it lives.

Two races are closed here. A load that read the database before a change committed must not be cached after that
change's notice arrived: loads in flight for a customer are marked dirty by a notice and then not cached. And while
the listening connection is down, notices can be lost: the cache is bypassed until it is back, and cleared then.

What was cached when the channel went down is kept as the last-known state: if Postgres itself cannot be reached,
`lookup` answers from it for up to `stale_grace` seconds, marked stale (degraded mode, DESIGN §12). Memory is
bounded by count, and ids are at most 255 characters (DESIGN §12), so the count bounds the bytes too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from service.app.background import BackgroundTasks, wait_for_event
from service.domain.values import CustomerEntitlements
from storage.engine import Connection, Database
from storage.errors import is_database_unavailable
from storage.repositories.changes import CHANGES_CHANNEL, CREDITS_SCOPE, REF_SCOPE
from storage.repositories.customer_refs import CustomerRefRepository
from storage.repositories.customers import load_accounts, load_customer

log = logging.getLogger("entitlements.cache")

Loader = Callable[[Connection, str], Awaitable[CustomerEntitlements]]
DEFAULT_MAX_CUSTOMERS = 200_000
DEFAULT_MAX_UNKNOWN = 50_000
DEFAULT_STALE_GRACE_SECONDS = 300.0
# Refs and customer ids share the in-flight bookkeeping; refs are told apart by this prefix.
_REF = "\0ref:"


@dataclass(frozen=True, slots=True)
class Lookup:
    customer: CustomerEntitlements
    # Answered from the last-known snapshot because Postgres is unreachable (degraded mode).
    stale: bool = False


LISTENER_NAME = "entitlements-cache-listener"


class EntitlementCache:
    def __init__(
        self,
        db: Database,
        *,
        max_customers: int = DEFAULT_MAX_CUSTOMERS,
        max_unknown: int = DEFAULT_MAX_UNKNOWN,
        stale_grace: float = DEFAULT_STALE_GRACE_SECONDS,
        reconnect_delay: float = 1.0,
        ping_interval: float = 10.0,
        loader: Loader = load_customer,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.loader = loader
        self.ping_interval = ping_interval
        self.max_customers = max_customers
        self.max_unknown = max_unknown
        self.stale_grace = stale_grace
        self.reconnect_delay = reconnect_delay
        self._monotonic = monotonic
        self._entries: OrderedDict[str, CustomerEntitlements] = OrderedDict()
        # Ids nobody has subscribed with: kept apart and bounded on their own, so a flood of made-up ids can
        # neither grow memory past its bound nor push real customers out.
        self._unknown: OrderedDict[str, CustomerEntitlements] = OrderedDict()
        # customer_ref -> customer_id (None: not linked), so a CheckAccess by ref costs no round trip either.
        self._refs: OrderedDict[str, str | None] = OrderedDict()
        self._loading: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._listening = False
        # When the invalidation channel was lost: what is cached was right until then (degraded mode).
        self._lost_at: float | None = None
        self._listener: asyncpg.Connection | None = None
        self._stopping = False
        self._lost = asyncio.Event()
        self.hits = 0
        self.misses = 0

    @property
    def listening(self) -> bool:
        return self._listening

    def __len__(self) -> int:
        return len(self._entries) + len(self._unknown)

    def figures(self) -> dict[str, int]:
        """For /metrics: read when scraped, so the hot path counts nothing twice."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "customers": len(self._entries),
            "unknown": len(self._unknown),
        }

    async def get(self, customer_id: str, *, balances: bool = True) -> CustomerEntitlements:
        """The customer's snapshot; with `balances=False` its credit balances may be stale (ConsumeCredits reads
        them under lock anyway, and needs only the subscriptions from here)."""
        entry = self._cached(customer_id)
        if entry is not None and self._listening and (entry.accounts_loaded or not balances):
            self.hits += 1
            return entry
        self.misses += 1
        return await self._load(customer_id, entry if self._listening else None)

    def fresh(self, customer_id: str, *, balances: bool = True) -> Lookup | None:
        """The hot path's first try, without a coroutine: the cached snapshot when it answers as `get` would
        from memory (listening, balances loaded when asked for), else None and the caller awaits `lookup`."""
        if not self._listening:
            return None
        entry = self._cached(customer_id)
        if entry is None or (balances and not entry.accounts_loaded):
            return None
        self.hits += 1
        return Lookup(entry)

    async def lookup(self, customer_id: str, *, balances: bool = True) -> Lookup:
        """Like `get`, but when Postgres cannot be reached, the last-known snapshot (if it is at most
        `stale_grace` seconds past the moment it was last known right) answers, marked stale."""
        try:
            return Lookup(await self.get(customer_id, balances=balances))
        except Exception as error:
            if not is_database_unavailable(error):
                raise
            known = self._last_known(customer_id, balances=balances)
            if known is None:
                raise
            log.warning("cache.served_stale", extra={"customer_id": customer_id[:64]})
            return Lookup(known, stale=True)

    async def resolve_ref(self, customer_ref: str) -> str | None:
        """The Dodo customer a ref is linked to (None: not linked), cached like customers and invalidated by the
        change feed's `ref` notices. While Postgres is unreachable, the last-known link answers (degraded mode)."""
        if self._listening and customer_ref in self._refs:
            self._refs.move_to_end(customer_ref)
            self.hits += 1
            return self._refs[customer_ref]
        self.misses += 1
        loading = _REF + customer_ref
        self._loading[loading] = self._loading.get(loading, 0) + 1
        try:
            try:
                async with self.db.connection() as connection:
                    found = await CustomerRefRepository(connection).resolve(customer_ref)
            except Exception as error:
                if is_database_unavailable(error) and customer_ref in self._refs and self._within_grace():
                    return self._refs[customer_ref]
                raise
            if self._listening and loading not in self._dirty:
                self._refs[customer_ref] = found
                self._refs.move_to_end(customer_ref)
                while len(self._refs) > self.max_unknown:
                    self._refs.popitem(last=False)
            return found
        finally:
            left = self._loading[loading] - 1
            if left:
                self._loading[loading] = left
            else:
                del self._loading[loading]
                self._dirty.discard(loading)

    def invalidate_ref(self, customer_ref: str) -> None:
        self._refs.pop(customer_ref, None)
        if _REF + customer_ref in self._loading:
            self._dirty.add(_REF + customer_ref)

    def _within_grace(self) -> bool:
        return self._lost_at is None or self._monotonic() - self._lost_at <= self.stale_grace

    def _cached(self, customer_id: str) -> CustomerEntitlements | None:
        for store in (self._entries, self._unknown):
            entry = store.get(customer_id)
            if entry is not None:
                store.move_to_end(customer_id)
                return entry
        return None

    def _last_known(self, customer_id: str, *, balances: bool) -> CustomerEntitlements | None:
        entry = self._entries.get(customer_id) or self._unknown.get(customer_id)
        if entry is None or (balances and not entry.accounts_loaded) or not self._within_grace():
            return None
        return entry

    async def _load(self, customer_id: str, known: CustomerEntitlements | None) -> CustomerEntitlements:
        """Read the customer; `known` is a cached entry whose subscriptions hold (only its balances are read)."""
        self._loading[customer_id] = self._loading.get(customer_id, 0) + 1
        try:
            async with self.db.connection() as connection:
                if known is None:
                    entry = await self.loader(connection, customer_id)
                else:
                    accounts = await load_accounts(connection, customer_id)
                    entry = replace(known, accounts=accounts, accounts_loaded=True)
            if self._listening and customer_id not in self._dirty:
                self._store(customer_id, entry)
            return entry
        finally:
            left = self._loading[customer_id] - 1
            if left:
                self._loading[customer_id] = left
            else:
                del self._loading[customer_id]
                self._dirty.discard(customer_id)

    def _store(self, customer_id: str, entry: CustomerEntitlements) -> None:
        if entry.subscriptions or entry.accounts:
            self._unknown.pop(customer_id, None)
            store, bound = self._entries, self.max_customers
        else:
            self._entries.pop(customer_id, None)
            store, bound = self._unknown, self.max_unknown
        store[customer_id] = entry
        store.move_to_end(customer_id)
        while len(store) > bound:
            store.popitem(last=False)

    def invalidate(self, customer_id: str, *, balances_only: bool = False) -> None:
        """Forget the customer; with `balances_only`, keep its subscriptions and forget only its balances."""
        entry = self._entries.pop(customer_id, None)
        self._unknown.pop(customer_id, None)
        if balances_only and entry is not None:
            self._entries[customer_id] = replace(entry, accounts={}, accounts_loaded=False)
        if customer_id in self._loading:
            self._dirty.add(customer_id)

    def clear(self) -> None:
        self._entries.clear()
        self._unknown.clear()
        self._refs.clear()
        self._dirty.update(self._loading)

    def start(self, tasks: BackgroundTasks) -> None:
        """Listen in the background; until the first connection succeeds the cache is bypassed."""
        tasks.spawn("entitlement-cache-listener", self._listen_forever())

    async def _listen_forever(self) -> None:
        try:
            while True:
                try:
                    await self._listen_once()
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    log.warning("cache.listener_failed", extra={"why": type(error).__name__})
                self._set_listening(False)
                await self._close_listener()
                await asyncio.sleep(self.reconnect_delay)
        finally:
            # Stopping on purpose: not the lost channel that `cache.bypassed` warns about.
            self._stopping = True
            self._listening = False
            self.clear()
            await self._close_listener()

    async def _listen_once(self) -> None:
        self._lost.clear()
        connection = await asyncpg.connect(
            self.db.url, timeout=self.db.connect_timeout, server_settings={"application_name": LISTENER_NAME}
        )
        self._listener = connection
        connection.add_termination_listener(self._on_terminated)
        await connection.add_listener(CHANGES_CHANNEL, self._on_notice)
        # Anything cached before this point may have missed notices: start from empty.
        self.clear()
        self._set_listening(True)
        log.info("cache.listening")
        while not self._lost.is_set():
            if not await wait_for_event(self._lost, self.ping_interval):
                # A half-open TCP connection never reports termination: prove the channel is alive.
                await connection.fetchval("SELECT 1", timeout=self.db.connect_timeout)

    def _set_listening(self, value: bool) -> None:
        if not value and self._listening and not self._stopping:
            # Notices may be lost from here on: nothing cached is served as current any more (every read goes to
            # Postgres), but it stays as the last-known state should Postgres be unreachable too.
            log.warning("cache.bypassed", extra={"why": "invalidation channel lost", "serving_from": "postgres"})
            self._lost_at = self._monotonic()
        if value:
            self._lost_at = None
        self._listening = value

    def _on_notice(self, connection: Any, pid: int, channel: str, payload: object) -> None:
        scope, _, subject = str(payload).partition(":")
        if scope == REF_SCOPE:
            self.invalidate_ref(subject)
        else:
            self.invalidate(subject, balances_only=scope == CREDITS_SCOPE)

    def _on_terminated(self, connection: Any) -> None:
        self._set_listening(False)
        self._lost.set()

    async def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None and not listener.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), timeout=2)
