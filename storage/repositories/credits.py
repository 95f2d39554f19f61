"""All SQL about credit balances, the ledger and per-period plan grants. Takes and returns domain values."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.credits import Account, Entry, Grant
from storage.models import CreditBalance, CreditLedgerEntry, CreditPeriodGrant


@dataclass(frozen=True, slots=True)
class StoredEntry:
    id: int
    entry: Entry


class CreditRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def lock(self, customer_id: str, credit: str) -> Account:
        """The account under a row lock held to the end of the transaction (created empty on first use)."""
        account = await self._select_for_update(customer_id, credit)
        if account is not None:
            return account
        await self.session.execute(
            insert(CreditBalance).values(customer_id=customer_id, credit=credit).on_conflict_do_nothing()
        )
        account = await self._select_for_update(customer_id, credit)
        assert account is not None
        return account

    async def _select_for_update(self, customer_id: str, credit: str) -> Account | None:
        row = (
            await self.session.execute(
                select(CreditBalance.balance, CreditBalance.grants)
                .where(CreditBalance.customer_id == customer_id, CreditBalance.credit == credit)
                .with_for_update()
            )
        ).first()
        if row is None:
            return None
        return Account(customer_id, credit, row.balance, _grants_from_json(row.grants))

    async def accounts(self, customer_id: str) -> dict[str, Account]:
        rows = await self.session.execute(
            select(CreditBalance.credit, CreditBalance.balance, CreditBalance.grants).where(
                CreditBalance.customer_id == customer_id
            )
        )
        return {r.credit: Account(customer_id, r.credit, r.balance, _grants_from_json(r.grants)) for r in rows}

    async def save(self, account: Account, entries: list[Entry]) -> None:
        await self.session.execute(
            update(CreditBalance)
            .where(CreditBalance.customer_id == account.customer_id, CreditBalance.credit == account.credit)
            .values(balance=account.balance, grants=_grants_to_json(account.grants), updated_at=func.now())
        )
        if entries:
            await self.session.execute(insert(CreditLedgerEntry), [_entry_row(e) for e in entries])

    async def by_idempotency_key(self, customer_id: str, key: str) -> Entry | None:
        row = await self.session.scalar(
            select(CreditLedgerEntry).where(
                CreditLedgerEntry.customer_id == customer_id, CreditLedgerEntry.idempotency_key == key
            )
        )
        return None if row is None else _entry(row)

    async def has_dodo_entry(self, dodo_entry_id: str) -> bool:
        found = await self.session.scalar(
            select(CreditLedgerEntry.id).where(CreditLedgerEntry.dodo_entry_id == dodo_entry_id)
        )
        return found is not None

    async def claim_period_grant(
        self, *, subscription_id: str, credit: str, period_start: datetime, customer_id: str, amount: Decimal
    ) -> bool:
        claimed = await self.session.scalar(
            insert(CreditPeriodGrant)
            .values(
                subscription_id=subscription_id,
                credit=credit,
                period_start=period_start,
                customer_id=customer_id,
                amount=amount,
            )
            .on_conflict_do_nothing()
            .returning(CreditPeriodGrant.subscription_id)
        )
        return claimed is not None

    async def page(self, customer_id: str, credit: str, *, before_id: int | None, limit: int) -> list[StoredEntry]:
        """Newest first; `before_id` is the keyset cursor (exclusive)."""
        condition = and_(CreditLedgerEntry.customer_id == customer_id, CreditLedgerEntry.credit == credit)
        if before_id is not None:
            condition = and_(condition, CreditLedgerEntry.id < before_id)
        rows = await self.session.scalars(
            select(CreditLedgerEntry).where(condition).order_by(CreditLedgerEntry.id.desc()).limit(limit)
        )
        return [StoredEntry(row.id, _entry(row)) for row in rows]

    async def ledger_sum(self, customer_id: str, credit: str) -> Decimal:
        total = await self.session.scalar(
            text("SELECT coalesce(sum(amount), 0) FROM credit_ledger WHERE customer_id = :c AND credit = :k"),
            {"c": customer_id, "k": credit},
        )
        return Decimal(total)


def _grants_from_json(items: list[Any]) -> tuple[Grant, ...]:
    return tuple(
        Grant(
            grant_id=item["grant_id"],
            remaining=Decimal(item["remaining"]),
            expires_at=None if item.get("expires_at") is None else datetime.fromisoformat(item["expires_at"]),
            source=item.get("source", ""),
        )
        for item in items
    )


def _grants_to_json(grants: tuple[Grant, ...]) -> list[dict[str, Any]]:
    return [
        {
            "grant_id": g.grant_id,
            # Decimal as text: JSON numbers would go through float somewhere along the way.
            "remaining": format(g.remaining, "f"),
            "expires_at": None if g.expires_at is None else g.expires_at.isoformat(),
            "source": g.source,
        }
        for g in grants
    ]


def _entry_row(entry: Entry) -> dict[str, Any]:
    return {
        "entry_id": entry.entry_id,
        "customer_id": entry.customer_id,
        "credit": entry.credit,
        "amount": entry.amount,
        "balance_after": entry.balance_after,
        "kind": entry.kind,
        "source": entry.source,
        "idempotency_key": entry.idempotency_key,
        "fingerprint": entry.fingerprint,
        "dodo_entry_id": entry.dodo_entry_id,
        "description": entry.description,
        "metadata_": dict(entry.metadata),
    }


def _entry(row: CreditLedgerEntry) -> Entry:
    return Entry(
        entry_id=row.entry_id,
        customer_id=row.customer_id,
        credit=row.credit,
        amount=row.amount,
        balance_after=row.balance_after,
        kind=row.kind,
        source=row.source,
        idempotency_key=row.idempotency_key,
        fingerprint=row.fingerprint,
        dodo_entry_id=row.dodo_entry_id,
        description=row.description,
        metadata={str(k): str(v) for k, v in row.metadata_.items()},
        created_at=row.created_at,
    )
