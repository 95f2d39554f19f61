"""All SQL about credit balances, the ledger and per-period plan grants. Takes and returns domain values."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from service.domain.values import Account, Grant
from service.domain.values import LedgerEntry as Entry
from storage.engine import Connection

# Balances, grants, ledger rows and the change-feed rows in one statement (one round trip per write).
_SAVE = """
WITH account AS (
    UPDATE credit_balances AS b
    SET balance = v.balance, grants = v.grants::jsonb, updated_at = now()
    FROM unnest($1::text[], $2::text[], $3::numeric[], $4::text[]) AS v(customer_id, credit, balance, grants)
    WHERE b.customer_id = v.customer_id AND b.credit = v.credit
    RETURNING 1
), changed AS (
    INSERT INTO entitlement_changes (customer_id, scope) SELECT DISTINCT unnest($1::text[]), 'credits' RETURNING 1
), ledger AS (
    INSERT INTO credit_ledger (
        entry_id, customer_id, credit, amount, balance_after, kind, source, idempotency_key, fingerprint,
        dodo_entry_id, description, metadata
    )
    SELECT e.entry_id, e.customer_id, e.credit, e.amount, e.balance_after, e.kind, e.source, e.idempotency_key,
           e.fingerprint, e.dodo_entry_id, e.description, e.metadata::jsonb
    FROM unnest($5::text[], $6::text[], $7::text[], $8::numeric[], $9::numeric[], $10::text[], $11::text[],
                $12::text[], $13::text[], $14::text[], $15::text[], $16::text[])
         AS e(entry_id, customer_id, credit, amount, balance_after, kind, source, idempotency_key, fingerprint,
              dodo_entry_id, description, metadata)
    RETURNING created_at
){mirror}
SELECT (SELECT count(*) FROM account), (SELECT max(created_at) FROM ledger), (SELECT count(*) FROM changed)
"""
_MIRROR = """, mirror AS (
    -- Consumptions of Dodo-linked credits join the open mirror batch of their account (service/app/credit_mirror.py),
    -- in this same transaction: a committed consumption is always on its way to Dodo, a rolled-back one never.
    INSERT INTO credit_mirror_batches AS m (batch_id, customer_id, credit, credit_entitlement_id, amount)
    SELECT * FROM unnest($17::text[], $18::text[], $19::text[], $20::text[], $21::numeric[])
    ON CONFLICT (customer_id, credit) WHERE status = 'open' DO UPDATE SET amount = m.amount + EXCLUDED.amount
    RETURNING 1
)"""
# Without mirror amounts (most saves) the statement leaves that CTE out: each execution is planned anew (custom
# plans, for the arrays' lengths), and planning is a good part of its cost.
_SAVE_MIRRORED = _SAVE.format(mirror=_MIRROR).replace(
    "(SELECT count(*) FROM changed)", "(SELECT count(*) FROM changed), (SELECT count(*) FROM mirror)"
)
_SAVE_PLAIN = _SAVE.format(mirror="")

_SELECT_FOR_UPDATE = """
SELECT b.customer_id, b.credit, b.balance, b.grants
FROM credit_balances AS b
JOIN unnest($1::text[], $2::text[]) AS k(customer_id, credit)
  ON b.customer_id = k.customer_id AND b.credit = k.credit
ORDER BY b.customer_id, b.credit
FOR UPDATE OF b
"""
_SELECT_SKIP_LOCKED = _SELECT_FOR_UPDATE.replace("FOR UPDATE OF b", "FOR UPDATE OF b SKIP LOCKED")

_ENTRY_COLUMNS = ", ".join(
    f"l.{name}"
    for name in (
        "id",
        "entry_id",
        "customer_id",
        "credit",
        "amount",
        "balance_after",
        "kind",
        "source",
        "idempotency_key",
        "fingerprint",
        "dodo_entry_id",
        "description",
        "metadata",
        "created_at",
    )
)


def period_claims(first: int, *, subscription: str, customer: str, when: str = "true") -> str:
    """Two CTEs, `claim` and `claimed_account`: claim the plan grants of (subscription, credit, period) given as
    three arrays from parameter `first` on (credit text[], period_start timestamptz[], amount numeric[]; see
    `claim_args`), each at most once ever, and lock the accounts of those claimed (created empty on first use),
    returning their latest committed balance and grants. `subscription` and `customer` are SQL expressions; the
    claims are made only `when` that holds. Embedded in another write so that the claim costs no round trip."""
    return f"""
    claim AS (
        INSERT INTO credit_period_grants (subscription_id, credit, period_start, customer_id, amount)
        SELECT ({subscription})::text, c.credit, c.period_start, ({customer})::text, c.amount
        FROM unnest(${first}::text[], ${first + 1}::timestamptz[], ${first + 2}::numeric[])
             AS c(credit, period_start, amount)
        WHERE {when}
        ON CONFLICT DO NOTHING
        RETURNING customer_id, credit
    ), claimed_account AS (
        INSERT INTO credit_balances AS b (customer_id, credit)
        SELECT customer_id, credit FROM claim
        -- A no-op update: it takes the row lock and returns the latest committed balance and grants.
        ON CONFLICT (customer_id, credit) DO UPDATE SET updated_at = b.updated_at
        RETURNING b.customer_id, b.credit, b.balance, b.grants
    )"""


@dataclass(frozen=True, slots=True)
class PeriodClaim:
    """A plan grant to claim: once per (subscription, credit, period_start)."""

    credit: str
    period_start: datetime
    amount: Decimal


def claim_args(claims: Sequence[PeriodClaim]) -> tuple[list[str], list[datetime], list[Decimal]]:
    return [c.credit for c in claims], [c.period_start for c in claims], [c.amount for c in claims]


def account_of(row: Any) -> Account:
    """An account from a row with customer_id, credit, balance and grants."""
    return _account(row)


@dataclass(frozen=True, slots=True)
class MirrorAdd:
    """An amount consumed from a Dodo-linked credit, to be added to its account's open mirror batch."""

    customer_id: str
    credit: str
    credit_entitlement_id: str
    amount: Decimal


@dataclass(frozen=True, slots=True)
class StoredEntry:
    id: int
    entry: Entry


# The accounts free to lock now and the ledger rows of the given idempotency keys, in one round trip (the shared
# batch's read: it never waits for a lock, so nothing commits between its snapshot and its locks that it waited
# for). Account rows are marked `is_account`; ledger rows leave the account columns NULL.
_LOCK_WITH_REPLAYS = f"""
WITH locked AS ({_SELECT_SKIP_LOCKED})
SELECT true AS is_account, customer_id, credit, balance, grants,
       NULL::bigint AS id, NULL::text AS entry_id, NULL::numeric AS amount, NULL::numeric AS balance_after,
       NULL::text AS kind, NULL::text AS source, NULL::text AS idempotency_key, NULL::text AS fingerprint,
       NULL::text AS dodo_entry_id, NULL::text AS description, NULL::jsonb AS metadata,
       NULL::timestamptz AS created_at
FROM locked
UNION ALL
SELECT false, l.customer_id, l.credit, NULL, NULL, l.id, l.entry_id, l.amount, l.balance_after, l.kind, l.source,
       l.idempotency_key, l.fingerprint, l.dodo_entry_id, l.description, l.metadata, l.created_at
FROM credit_ledger AS l
JOIN unnest($3::text[], $4::text[]) AS k(customer_id, idempotency_key)
  ON l.customer_id = k.customer_id AND l.idempotency_key = k.idempotency_key
"""


class CreditRepository:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def lock(self, customer_id: str, credit: str) -> Account:
        """The account under a row lock held to the end of the transaction (created empty on first use)."""
        return (await self.lock_many([(customer_id, credit)]))[(customer_id, credit)]

    async def lock_many(
        self, keys: Sequence[tuple[str, str]], *, skip_locked: bool = False
    ) -> dict[tuple[str, str], Account]:
        """Lock several accounts in one round trip, always in key order so concurrent lockers cannot deadlock.

        With `skip_locked`, accounts another transaction holds right now are left out of the answer instead of
        waited for: the caller decides what to do with them (ConsumeCredits moves them to a lane of their own, so
        one stuck row cannot stall everyone else's batch)."""
        ordered = sorted(set(keys))
        customers = [k[0] for k in ordered]
        credits = [k[1] for k in ordered]
        found = await self._select_for_update(customers, credits, skip_locked=skip_locked)
        missing = [k for k in ordered if k not in found]
        if missing:
            # Rows that exist but are locked elsewhere conflict with a committed row here: DO NOTHING, no wait.
            await self.connection.execute(
                """
                INSERT INTO credit_balances (customer_id, credit)
                SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING
                """,
                [k[0] for k in missing],
                [k[1] for k in missing],
            )
            found.update(
                await self._select_for_update([k[0] for k in missing], [k[1] for k in missing], skip_locked=skip_locked)
            )
        return found

    async def lock_free_with_replays(
        self, keys: Sequence[tuple[str, str]], customer_keys: Sequence[tuple[str, str]]
    ) -> tuple[dict[tuple[str, str], Account], dict[tuple[str, str], Entry]]:
        """`lock_many(keys, skip_locked=True)` and `by_idempotency_keys(customer_keys)` in one round trip when every
        account exists (the usual case); accounts not stored yet are created and locked as `lock_many` does."""
        ordered = sorted(set(keys))
        rows = await self.connection.fetch(
            _LOCK_WITH_REPLAYS,
            [k[0] for k in ordered],
            [k[1] for k in ordered],
            [k[0] for k in customer_keys],
            [k[1] for k in customer_keys],
        )
        accounts: dict[tuple[str, str], Account] = {}
        seen: dict[tuple[str, str], Entry] = {}
        for row in rows:
            if row["is_account"]:
                accounts[(row["customer_id"], row["credit"])] = _account(row)
            else:
                seen[(row["customer_id"], row["idempotency_key"])] = _entry(row)
        missing = [k for k in ordered if k not in accounts]
        if missing:
            accounts.update(await self.lock_many(missing, skip_locked=True))
        return accounts, seen

    async def _select_for_update(
        self, customers: list[str], credits: list[str], *, skip_locked: bool
    ) -> dict[tuple[str, str], Account]:
        rows = await self.connection.fetch(
            _SELECT_SKIP_LOCKED if skip_locked else _SELECT_FOR_UPDATE, customers, credits
        )
        return {(r["customer_id"], r["credit"]): _account(r) for r in rows}

    async def accounts(self, customer_id: str) -> dict[str, Account]:
        rows = await self.connection.fetch(
            "SELECT customer_id, credit, balance, grants FROM credit_balances WHERE customer_id = $1", customer_id
        )
        return {r["credit"]: _account(r) for r in rows}

    async def save(
        self, accounts: Sequence[Account], entries: Sequence[Entry], mirror: Sequence[MirrorAdd] = ()
    ) -> None:
        """Write accounts and ledger rows, and add `mirror` amounts to their open mirror batches, in one statement.

        `mirror` holds at most one item per account (one statement may not update the same batch row twice)."""
        mirror = sorted(mirror, key=lambda m: (m.customer_id, m.credit))
        mirrored = (
            (
                # A fresh id per item: used only when the account has no open batch (else the amount joins it).
                [new_batch_id() for _ in mirror],
                [m.customer_id for m in mirror],
                [m.credit for m in mirror],
                [m.credit_entitlement_id for m in mirror],
                [m.amount for m in mirror],
            )
            if mirror
            else ()
        )
        await self.connection.execute(
            _SAVE_MIRRORED if mirror else _SAVE_PLAIN,
            [a.customer_id for a in accounts],
            [a.credit for a in accounts],
            [a.balance for a in accounts],
            [grants_json(a.grants) for a in accounts],
            [e.entry_id for e in entries],
            [e.customer_id for e in entries],
            [e.credit for e in entries],
            [e.amount for e in entries],
            [e.balance_after for e in entries],
            [e.kind for e in entries],
            [e.source for e in entries],
            [e.idempotency_key for e in entries],
            [e.fingerprint for e in entries],
            [e.dodo_entry_id for e in entries],
            [e.description for e in entries],
            [_json_text(dict(e.metadata)) for e in entries],
            *mirrored,
        )

    async def by_idempotency_keys(self, customer_keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Entry]:
        if not customer_keys:
            return {}
        rows = await self.connection.fetch(
            f"""
            SELECT {_ENTRY_COLUMNS} FROM credit_ledger AS l
            JOIN unnest($1::text[], $2::text[]) AS k(customer_id, idempotency_key)
              ON l.customer_id = k.customer_id AND l.idempotency_key = k.idempotency_key
            """,
            [k[0] for k in customer_keys],
            [k[1] for k in customer_keys],
        )
        return {(r["customer_id"], r["idempotency_key"]): _entry(r) for r in rows}

    async def has_dodo_entry(self, dodo_entry_id: str) -> bool:
        found = await self.connection.fetchval("SELECT 1 FROM credit_ledger WHERE dodo_entry_id = $1", dodo_entry_id)
        return found is not None

    async def page(self, customer_id: str, credit: str, *, before_id: int | None, limit: int) -> list[StoredEntry]:
        """Newest first; `before_id` is the keyset cursor (exclusive)."""
        rows = await self.connection.fetch(
            f"""
            SELECT {_ENTRY_COLUMNS} FROM credit_ledger AS l
            WHERE customer_id = $1 AND credit = $2 AND ($3::bigint IS NULL OR id < $3)
            ORDER BY id DESC LIMIT $4
            """,
            customer_id,
            credit,
            before_id,
            limit,
        )
        return [StoredEntry(r["id"], _entry(r)) for r in rows]


def new_batch_id() -> str:
    return f"cmb_{uuid.uuid4().hex}"


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def grants_json(grants: tuple[Grant, ...]) -> str:
    # Decimals as text: JSON numbers would pass through float somewhere along the way.
    return _json_text(
        [
            {
                "grant_id": g.grant_id,
                "remaining": format(g.remaining, "f"),
                "expires_at": None if g.expires_at is None else g.expires_at.isoformat(),
                "source": g.source,
            }
            for g in grants
        ]
    )


def account_from(
    customer_id: str, credit: str, balance: Decimal, grants: list[Any], *, expiring_only: bool = False
) -> Account:
    """An account from its stored row. `expiring_only` (the CheckAccess cache) keeps just what an effective balance
    needs: grants that never expire cannot change it, and grant ids and sources are not read by decisions."""
    kept: list[Grant] = []
    for item in grants:
        expires = item.get("expires_at")
        if expiring_only and expires is None:
            continue
        kept.append(
            Grant(
                grant_id="" if expiring_only else item["grant_id"],
                remaining=Decimal(item["remaining"]),
                expires_at=None if expires is None else datetime.fromisoformat(expires),
                source="" if expiring_only else item.get("source", ""),
            )
        )
    return Account(customer_id, sys.intern(credit), balance, tuple(kept))


def _account(row: Any) -> Account:
    return account_from(row["customer_id"], row["credit"], row["balance"], row["grants"])


def _entry(row: Any) -> Entry:
    return Entry(
        entry_id=row["entry_id"],
        customer_id=row["customer_id"],
        credit=row["credit"],
        amount=row["amount"],
        balance_after=row["balance_after"],
        kind=row["kind"],
        source=row["source"],
        idempotency_key=row["idempotency_key"],
        fingerprint=row["fingerprint"],
        dodo_entry_id=row["dodo_entry_id"],
        description=row["description"],
        metadata={str(k): str(v) for k, v in row["metadata"].items()},
        created_at=row["created_at"],
    )
