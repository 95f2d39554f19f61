"""ConsumeCredits and the ledger read: synchronous, durable, atomic and replay-safe on Postgres.

The balance change, its ledger row and the idempotency record (the ledger row's unique key) commit in one
transaction or not at all. Writers of one account serialize on its row lock, so there is no overspend whatever
the concurrency; the unique (customer, idempotency_key) index is the final word on replays.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from sqlalchemy.exc import IntegrityError

from service import access, credits
from service.catalog import Catalog
from service.clock import Clock
from service.domain import FeatureKind
from service.errors import IdempotencyKeyReused, InsufficientCredits, InvalidArgument, PermissionDenied
from storage.engine import Database
from storage.repositories.credits import CreditRepository, StoredEntry
from storage.repositories.subscriptions import SubscriptionRepository

log = logging.getLogger("entitlements.credits")

MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50
_RETRIES_ON_KEY_RACE = 3


@dataclass(frozen=True, slots=True)
class ConsumeRequest:
    customer_id: str
    credit: str
    amount: str
    idempotency_key: str
    description: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConsumeResult:
    entry_id: str
    balance_after: Decimal
    replayed: bool

    @property
    def overage_after(self) -> Decimal:
        return max(-self.balance_after, credits.ZERO)


@dataclass(frozen=True, slots=True)
class LedgerPage:
    entries: list[credits.Entry]
    next_page_token: str


class CreditService:
    def __init__(self, db: Database, catalog: Catalog, clock: Clock) -> None:
        self.db = db
        self.catalog = catalog
        self.clock = clock

    def _credit_key(self, credit: str) -> str:
        if not credit:
            raise InvalidArgument("credit is required")
        if self.catalog.kind_of(credit) is not FeatureKind.CREDIT:
            raise InvalidArgument(f"unknown credit {credit!r}: not a credit of the catalog")
        return credit

    async def consume(self, request: ConsumeRequest) -> ConsumeResult:
        if not request.customer_id:
            raise InvalidArgument("customer_id is required")
        self._credit_key(request.credit)
        amount = credits.parse_amount(request.amount)
        if not request.idempotency_key:
            raise InvalidArgument("idempotency_key is required")
        fingerprint = credits.fingerprint(request.credit, amount, request.description, request.metadata)
        for attempt in range(_RETRIES_ON_KEY_RACE):
            try:
                return await self._consume_once(request, amount, fingerprint)
            except IntegrityError as error:
                # The same key raced in on another account of this customer; the retry sees its row and replays.
                if "uq_credit_ledger_idempotency" not in str(error.orig) or attempt == _RETRIES_ON_KEY_RACE - 1:
                    raise
        raise AssertionError("unreachable")

    async def _consume_once(self, request: ConsumeRequest, amount: Decimal, fingerprint: str) -> ConsumeResult:
        async with self.db.transaction() as session:
            repository = CreditRepository(session)
            replay = await self._replay(repository, request, fingerprint)
            if replay is not None:
                return replay
            now = self.clock()
            subs = await SubscriptionRepository(session).for_customer(request.customer_id)
            decision = access.feature_access(subs, self.catalog, request.credit, now)
            if not decision.allowed:
                raise PermissionDenied(
                    f"customer has no access to credit {request.credit!r} ({decision.reason.value.lower()})",
                    reason=decision.reason.code,
                )
            account = await repository.lock(request.customer_id, request.credit)
            # Another writer of this account may have committed the same key while we waited for the lock.
            replay = await self._replay(repository, request, fingerprint)
            if replay is not None:
                return replay
            account, expired = credits.expire(account, now)
            limit = credits.overage_limit(self.catalog.credits[request.credit], subs)
            try:
                account, balance = credits.consume(account, amount, limit)
            except credits.Insufficient as short:
                raise InsufficientCredits(
                    f"not enough {request.credit}: balance {credits.decimal_text(short.available)}, "
                    f"overage limit {credits.decimal_text(limit)}, requested {credits.decimal_text(amount)}",
                    metadata={
                        "balance": credits.decimal_text(short.available),
                        "overage_limit": credits.decimal_text(limit),
                    },
                ) from None
            entry = credits.Entry(
                entry_id=credits.new_entry_id(),
                customer_id=request.customer_id,
                credit=request.credit,
                amount=-amount,
                balance_after=balance,
                kind="consumption",
                source=request.idempotency_key,
                idempotency_key=request.idempotency_key,
                fingerprint=fingerprint,
                description=request.description,
                metadata=dict(request.metadata),
            )
            await repository.save(account, [*expired, entry])
            await SubscriptionRepository(session).notify_changed(request.customer_id)
        log.info("credits.consumed", extra={"customer_id": request.customer_id, "credit": request.credit})
        return ConsumeResult(entry.entry_id, balance, replayed=False)

    async def _replay(
        self, repository: CreditRepository, request: ConsumeRequest, fingerprint: str
    ) -> ConsumeResult | None:
        seen = await repository.by_idempotency_key(request.customer_id, request.idempotency_key)
        if seen is None:
            return None
        if seen.fingerprint != fingerprint:
            raise IdempotencyKeyReused(
                "idempotency_key was already used with different parameters",
                metadata={"entry_id": seen.entry_id},
            )
        return ConsumeResult(seen.entry_id, seen.balance_after, replayed=True)

    async def ledger(self, customer_id: str, credit: str, page_size: int, page_token: str) -> LedgerPage:
        if not customer_id:
            raise InvalidArgument("customer_id is required")
        self._credit_key(credit)
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        before = _decode_token(page_token) if page_token else None
        async with self.db.transaction() as session:
            rows = await CreditRepository(session).page(customer_id, credit, before_id=before, limit=size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return LedgerPage([row.entry for row in rows], _encode_token(rows[-1]) if more else "")


def _encode_token(row: StoredEntry) -> str:
    return base64.urlsafe_b64encode(f"v1:{row.id}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> int:
    try:
        version, _, value = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode().partition(":")
        if version != "v1":
            raise ValueError(version)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument("page_token is not one this service issued") from None
