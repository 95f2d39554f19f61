"""ConsumeCredits and the ledger read: synchronous, durable, atomic and replay-safe on Postgres.

The balance change, its ledger row and the idempotency record (the ledger row's unique key) commit in one
transaction or not at all. Writers of one account serialize on its row lock, so there is no overspend whatever
the concurrency; the unique (customer, idempotency_key) index is the final word on replays.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal

import asyncpg

from service.app.background import BackgroundTasks
from service.app.change_feed import ChangeFeed
from service.app.customers import Customers, named_customer
from service.app.entitlement_cache import EntitlementCache
from service.app.metrics import Metrics
from service.domain import access_rules as access
from service.domain import credit_rules as credits
from service.domain import decimals, limits
from service.domain.catalog import Catalog
from service.domain.clock import Clock
from service.domain.errors import (
    AccountBusy,
    ConsumeQueueFull,
    CreditAccessDenied,
    DomainError,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidPageToken,
    MissingField,
    Unavailable,
    UnknownCredit,
)
from service.domain.values import AccessReason, Account, FeatureKind, LedgerEntry
from storage.engine import Budget, Database
from storage.errors import is_outage
from storage.repositories.credits import CreditRepository, MirrorAdd, StoredEntry
from storage.repositories.usage import NewUsageEvent, UsageRepository

log = logging.getLogger("entitlements.credits")

_RETRIES_ON_KEY_RACE = 3


@dataclass(frozen=True, slots=True)
class ConsumeRequest:
    customer_id: str
    credit: str
    amount: str
    idempotency_key: str
    description: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    # Instead of customer_id: the company's own id for the customer (resolved before anything else).
    customer_ref: str = ""


@dataclass(frozen=True, slots=True)
class ConsumeResult:
    entry_id: str
    balance_after: Decimal
    replayed: bool

    @property
    def overage_after(self) -> Decimal:
        return max(decimals.MATH.minus(self.balance_after), decimals.ZERO)


@dataclass(frozen=True, slots=True)
class LedgerPage:
    entries: list[LedgerEntry]
    next_page_token: str


@dataclass(eq=False)
class _Pending:
    request: ConsumeRequest
    amount: Decimal
    fingerprint: str
    overage_limit: Decimal
    # Why access is denied (decided from the cached snapshot before queueing); a replay still wins over it.
    denied: AccessReason | None
    future: asyncio.Future[ConsumeResult]

    @property
    def account_key(self) -> tuple[str, str]:
        return (self.request.customer_id, self.request.credit)

    @property
    def idempotency(self) -> tuple[str, str]:
        return (self.request.customer_id, self.request.idempotency_key)


@dataclass(frozen=True, slots=True)
class _Spent:
    entry: LedgerEntry
    result: ConsumeResult


@dataclass(eq=False)
class _Lane:
    """A queue of consumptions and the writer task that drains it."""

    queue: list[_Pending] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, pending: _Pending) -> None:
        self.queue.append(pending)
        self.wake.set()


class CreditService:
    """ConsumeCredits with group commit: requests that arrive while a transaction is in flight are decided
    together in the next one. Each request still gets its own answer and its own ledger row; the batch commits as
    a whole, so atomicity per request holds, and a hot customer is not capped by one commit per consumption.

    Customers map to a fixed writer, so one customer's consumptions are decided in arrival order. One writer per
    process is the default: measured here, larger batches beat parallel smaller ones (fewer commits, fewer round
    trips per request); replicas add parallelism. ENTITLEMENTS_CREDIT_WRITERS raises it.

    Isolation (DESIGN §12): a request is fully validated before it can join a batch; the queue is bounded
    (UNAVAILABLE past it); a request whose caller has gone is dropped before its transaction; a batch that fails is
    split until the failing request fails alone; and an account locked by another transaction (another replica,
    an operator's session) is never waited for in the shared batch: its requests move to the contended lane,
    which waits for that lock at most `lock_timeout` per attempt.
    """

    def __init__(
        self,
        db: Database,
        catalog: Catalog,
        clock: Clock,
        cache: EntitlementCache,
        changes: ChangeFeed | None = None,
        *,
        shards: int = 1,
        max_batch: int = 256,
        max_queued: int = 1024,
        metrics: Metrics | None = None,
        customers: Customers | None = None,
    ) -> None:
        self.db = db
        self.catalog = catalog
        self.clock = clock
        self.cache = cache
        self.changes = changes or ChangeFeed(db, cache)
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.metrics = metrics
        self.customers = customers or Customers(db, cache, self.changes)
        self._shards = [_Lane() for _ in range(shards)]
        self._contended = _Lane()
        # Accounts with requests in the contended lane: newer requests for them queue behind, in order.
        self._contended_accounts: Counter[tuple[str, str]] = Counter()

    def _credit_key(self, credit: str) -> str:
        if not credit:
            raise MissingField("credit")
        limits.check_id("credit", credit)
        if self.catalog.kind_of(credit) is not FeatureKind.CREDIT:
            raise UnknownCredit(credit)
        return credit

    @property
    def queued(self) -> int:
        return sum(len(lane.queue) for lane in self._shards) + len(self._contended.queue)

    async def consume(self, request: ConsumeRequest) -> ConsumeResult:
        named_customer(request.customer_id, request.customer_ref)
        self._credit_key(request.credit)
        amount = decimals.parse_amount(request.amount)
        limits.check_id("idempotency_key", request.idempotency_key)
        limits.check_text("description", request.description, max_length=limits.MAX_DESCRIPTION)
        limits.check_metadata("metadata", request.metadata)
        if self.queued >= self.max_queued:
            raise ConsumeQueueFull(self.max_queued)
        if request.customer_ref:
            resolved = await self.customers.resolve("", request.customer_ref)
            if resolved is None:
                raise CreditAccessDenied(
                    f"customer has no access to credit {request.credit!r} (no_subscription)",
                    reason=AccessReason.NO_SUBSCRIPTION.code,
                )
            request = replace(request, customer_id=resolved, customer_ref="")
        customer = await self.cache.get(request.customer_id, balances=False)
        now = self.clock()
        decision = access.feature_access(customer.subscriptions, self.catalog, request.credit, now)
        pending = _Pending(
            request=request,
            amount=amount,
            fingerprint=credits.fingerprint(request.credit, amount, request.description, request.metadata),
            overage_limit=credits.overage_limit(
                self.catalog.credits[request.credit], customer.subscriptions, self.catalog, now
            ),
            denied=None if decision.allowed else decision.reason,
            future=asyncio.get_running_loop().create_future(),
        )
        if pending.account_key in self._contended_accounts:
            self._to_contended(pending)
        else:
            self._shards[zlib.crc32(request.customer_id.encode()) % len(self._shards)].push(pending)
        # A caller that goes away cancels only its own future; the batch runs in the writer's task and skips it.
        return await pending.future

    def start(self, tasks: BackgroundTasks) -> None:
        """One writer task per shard and one for the contended lane, for as long as the process serves."""
        for number, lane in enumerate(self._shards):
            tasks.spawn(f"credit-writer-{number}", self._write(lane, contended=False))
        tasks.spawn("credit-writer-contended", self._write(self._contended, contended=True))

    def _to_contended(self, pending: _Pending) -> None:
        self._contended_accounts[pending.account_key] += 1
        pending.future.add_done_callback(lambda _: self._left_contended(pending.account_key))
        self._contended.push(pending)

    def _left_contended(self, key: tuple[str, str]) -> None:
        self._contended_accounts[key] -= 1
        if self._contended_accounts[key] <= 0:
            del self._contended_accounts[key]

    async def _write(self, lane: _Lane, *, contended: bool) -> None:
        try:
            while True:
                await lane.wake.wait()
                lane.wake.clear()
                while lane.queue:
                    taken = lane.queue[: self.max_batch]
                    del lane.queue[: self.max_batch]
                    # Callers that have gone (deadline, cancel) are not executed at all.
                    live = [p for p in taken if not p.future.done()]
                    if not contended:
                        if self.metrics is not None and live:
                            self.metrics.credit_batch_size.observe(len(live))
                        await self._commit(live, wait_for_locks=False)
                        continue
                    # One account per transaction here: a lock that times out fails only that account's requests.
                    for group in _by_account(live):
                        await self._commit(group, wait_for_locks=True)
        finally:
            # Stopping: whatever is still queued was never executed, so the caller may safely retry it.
            _fail(lane.queue, Unavailable("the service is shutting down; retry"))
            lane.queue.clear()

    async def _commit(self, batch: list[_Pending], *, wait_for_locks: bool) -> None:
        if not batch:
            return
        try:
            decided, deferred = await self._run(batch, wait_for_locks=wait_for_locks)
        except asyncpg.LockNotAvailableError:
            if not wait_for_locks:
                # A lock wait in the shared batch ran out (a concurrent first insert of an account): let the
                # contended lane retry these one account at a time.
                for pending in batch:
                    self._to_contended(pending)
                return
            _fail(batch, AccountBusy())
            return
        except Exception as error:
            if len(batch) > 1 and not is_outage(error):
                # Something in this batch fails that other requests need not share: split it until the failing
                # request is alone, so it gets its own error and everyone else their answer.
                log.warning("credits.batch_split", extra={"size": len(batch), "why": type(error).__name__})
                middle = len(batch) // 2
                await self._commit(batch[:middle], wait_for_locks=wait_for_locks)
                await self._commit(batch[middle:], wait_for_locks=wait_for_locks)
                return
            _fail(batch, error)
            return
        except BaseException:
            _fail(batch, asyncio.CancelledError())
            raise
        if decided:
            self.changes.committed(*{p.request.customer_id for p, _ in decided}, balances_only=True)
        for pending, outcome in decided:
            if pending.future.done():
                continue
            if isinstance(outcome, DomainError):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)
        for pending in deferred:
            self._to_contended(pending)

    async def _run(
        self, batch: list[_Pending], *, wait_for_locks: bool
    ) -> tuple[list[tuple[_Pending, ConsumeResult | DomainError]], list[_Pending]]:
        for attempt in range(_RETRIES_ON_KEY_RACE):
            try:
                async with self.db.tx(Budget.CREDIT) as connection:
                    return await self._decide(CreditRepository(connection), batch, wait_for_locks=wait_for_locks)
            except asyncpg.UniqueViolationError as error:
                # The same key raced in from another replica; the retry reads its row and replays it.
                if error.constraint_name != "uq_credit_ledger_idempotency" or attempt == _RETRIES_ON_KEY_RACE - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover  # the loop returns or raises

    async def _decide(
        self, repository: CreditRepository, batch: list[_Pending], *, wait_for_locks: bool
    ) -> tuple[list[tuple[_Pending, ConsumeResult | DomainError]], list[_Pending]]:
        """Decide what can be decided now: (each decided request with its outcome, the requests whose account is
        locked elsewhere and must wait in the contended lane)."""
        now = self.clock()
        wanted = [p.account_key for p in batch if p.denied is None]
        keys = list({p.idempotency for p in batch})
        if wait_for_locks:
            accounts = await repository.lock_many(wanted) if wanted else {}
            # After the locks: anything committed by a writer we waited for is visible to this read.
            seen = await repository.by_idempotency_keys(keys)
        else:
            # Locks that are not waited for, and the replays, in one round trip: a key committed elsewhere after
            # this read fails the batch's insert on the unique index, and the whole batch is retried (`_run`).
            accounts, seen = await repository.lock_free_with_replays(wanted, keys)
        deferred = [p for p in batch if p.denied is None and p.account_key not in accounts]
        batch = [p for p in batch if p.denied is not None or p.account_key in accounts]
        entries: list[LedgerEntry] = []
        touched: dict[tuple[str, str], Account] = {}
        # Expiry is decided now but written only with a consumption of the same account: a refused request
        # leaves the account exactly as it was (its effective balance already excludes expired grants).
        expiries: dict[tuple[str, str], list[LedgerEntry]] = {}
        for key, account in accounts.items():
            accounts[key], expiries[key] = credits.expire(account, now)
        decided: list[tuple[_Pending, ConsumeResult | DomainError]] = []
        # What this batch consumed from Dodo-linked credits, per account: it joins the account's open mirror batch
        # in the same statement as the ledger rows (refused and replayed requests consumed nothing).
        mirrored: dict[tuple[str, str], Decimal] = {}
        for pending in batch:
            outcome = self._one(pending, seen, accounts)
            if isinstance(outcome, _Spent):
                touched[pending.account_key] = accounts[pending.account_key]
                entries.extend(expiries.pop(pending.account_key, ()))
                entries.append(outcome.entry)
                if self.catalog.credits[pending.request.credit].dodo_credit_entitlement_id:
                    key = pending.account_key
                    mirrored[key] = decimals.MATH.add(mirrored.get(key, decimals.ZERO), pending.amount)
                outcome = outcome.result
            decided.append((pending, outcome))
        if touched:
            await repository.save(list(touched.values()), entries, self._mirror_adds(mirrored))
            await self._record_metered(repository, entries, now)
        return decided, deferred

    async def _record_metered(self, repository: CreditRepository, entries: list[LedgerEntry], now: datetime) -> None:
        """Consumptions of a credit that names `dodo_meter_event` are also usage events (same transaction): the
        usage sender ships them to Dodo's meter, the ledger entry id as event id (unique, retried safely)."""
        metered: dict[str, list[NewUsageEvent]] = {}
        for entry in entries:
            meter = self.catalog.credits[entry.credit].dodo_meter_event if entry.kind == "consumption" else None
            if meter is None:
                continue
            spent = decimals.MATH.minus(entry.amount)
            amount: int | float = int(spent) if spent == spent.to_integral_value() else float(spent)
            metered.setdefault(entry.customer_id, []).append(
                NewUsageEvent(entry.entry_id, meter, now, {"amount": amount, "credit": entry.credit})
            )
        for customer_id, events in metered.items():
            await UsageRepository(repository.connection).insert(customer_id, events)

    def _mirror_adds(self, mirrored: dict[tuple[str, str], Decimal]) -> list[MirrorAdd]:
        adds: list[MirrorAdd] = []
        for (customer_id, credit), amount in mirrored.items():
            entitlement = self.catalog.credits[credit].dodo_credit_entitlement_id
            assert entitlement is not None  # only linked credits are collected
            adds.append(MirrorAdd(customer_id, credit, entitlement, amount))
        return adds

    def _one(
        self, pending: _Pending, seen: dict[tuple[str, str], LedgerEntry], accounts: dict[tuple[str, str], Account]
    ) -> ConsumeResult | DomainError | _Spent:
        """One request of a batch, in arrival order; `seen` and `accounts` carry the batch's effects forward."""
        request = pending.request
        prior = seen.get(pending.idempotency)
        if prior is not None:
            if prior.fingerprint != pending.fingerprint:
                return IdempotencyKeyReused(
                    "idempotency_key was already used with different parameters", metadata={"entry_id": prior.entry_id}
                )
            return ConsumeResult(prior.entry_id, prior.balance_after, replayed=True)
        if pending.denied is not None:
            return CreditAccessDenied(
                f"customer has no access to credit {request.credit!r} ({pending.denied.value.lower()})",
                reason=pending.denied.code,
            )
        account = accounts[pending.account_key]
        try:
            account, balance = credits.consume(account, pending.amount, pending.overage_limit)
        except credits.Insufficient as short:
            available = decimals.decimal_text(short.available)
            ceiling = decimals.decimal_text(pending.overage_limit)
            return InsufficientCredits(
                f"not enough {request.credit}: balance {available}, overage limit {ceiling}, "
                f"requested {decimals.decimal_text(pending.amount)}",
                metadata={"balance": available, "overage_limit": ceiling},
            )
        entry = LedgerEntry(
            entry_id=credits.new_entry_id(),
            customer_id=request.customer_id,
            credit=request.credit,
            amount=decimals.MATH.minus(pending.amount),
            balance_after=balance,
            kind="consumption",
            source=request.idempotency_key,
            idempotency_key=request.idempotency_key,
            fingerprint=pending.fingerprint,
            description=request.description,
            metadata=dict(request.metadata),
        )
        accounts[pending.account_key] = account
        seen[pending.idempotency] = entry
        return _Spent(entry, ConsumeResult(entry.entry_id, balance, replayed=False))

    async def ledger(
        self, customer_id: str, credit: str, page_size: int, page_token: str, customer_ref: str = ""
    ) -> LedgerPage:
        named_customer(customer_id, customer_ref)
        self._credit_key(credit)
        size = limits.page_size(page_size)
        before = _decode_token(page_token) if page_token else None
        customer_id = await self.customers.resolve(customer_id, customer_ref) or ""
        if not customer_id:  # an unlinked ref: a customer with no ledger yet
            return LedgerPage([], "")
        if before is None:
            await self._write_down_expiries(customer_id, credit)
        async with self.db.connection() as connection:
            rows = await CreditRepository(connection).page(customer_id, credit, before_id=before, limit=size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return LedgerPage([row.entry for row in rows], _encode_token(rows[-1]) if more else "")

    async def _write_down_expiries(self, customer_id: str, credit: str) -> None:
        """Before the first page of a ledger: write down grants whose expiry has passed, so the ledger a caller
        reads ends at the balance a caller reads (balances already leave expired grants out; until something
        consumed from the account, its ledger did not say so)."""
        now = self.clock()
        async with self.db.connection() as connection:
            account = (await CreditRepository(connection).accounts(customer_id)).get(credit)
        if account is None or not credits.has_expired_grants(account, now):
            return
        try:
            async with self.db.tx(Budget.CREDIT) as connection:
                repository = CreditRepository(connection)
                account, entries = credits.expire(await repository.lock(customer_id, credit), now)
                if entries:
                    await repository.save([account], entries)
        except asyncpg.LockNotAvailableError:
            # The account is busy elsewhere: the page is still right up to what is written; the next read writes it.
            log.info("credits.expiry_deferred", extra={"customer_id": customer_id, "credit": credit})
            return
        if entries:
            self.changes.committed(customer_id, balances_only=True)


def _by_account(batch: list[_Pending]) -> list[list[_Pending]]:
    groups: dict[tuple[str, str], list[_Pending]] = {}
    for pending in batch:
        groups.setdefault(pending.account_key, []).append(pending)
    return list(groups.values())


def _fail(batch: list[_Pending], error: BaseException) -> None:
    for pending in batch:
        if pending.future.done():
            continue
        if isinstance(error, Exception):
            pending.future.set_exception(error)
        else:
            pending.future.cancel()


def _encode_token(row: StoredEntry) -> str:
    return base64.urlsafe_b64encode(f"v1:{row.id}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> int:
    if len(token) > limits.MAX_ID:
        raise InvalidPageToken()
    try:
        version, _, value = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode().partition(":")
        cursor = int(value)
        if version != "v1" or not 0 < cursor < 2**63:
            raise ValueError(token)
        return cursor
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidPageToken() from None
