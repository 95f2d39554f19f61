"""All SQL about customers and subscriptions. Takes and returns domain values."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.domain import Addon, CartCredit, ScheduledChange, SubscriptionState
from storage.models import Customer, Subscription

CHANGES_CHANNEL = "entitlements_changed"


class SubscriptionRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def lock(self, subscription_id: str) -> SubscriptionState | None:
        """Serialize writers of one subscription (even its very first insert) until the transaction ends."""
        await self.session.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
            {"key": f"subscription:{subscription_id}"},
        )
        return await self.get(subscription_id)

    async def get(self, subscription_id: str) -> SubscriptionState | None:
        row = await self.session.scalar(select(Subscription).where(Subscription.subscription_id == subscription_id))
        return None if row is None else to_state(row)

    async def for_customer(self, customer_id: str) -> list[SubscriptionState]:
        rows = await self.session.scalars(
            select(Subscription)
            .where(Subscription.customer_id == customer_id)
            .order_by(Subscription.dodo_created_at.desc())
        )
        return [to_state(row) for row in rows]

    async def save(
        self, state: SubscriptionState, payload: dict[str, Any], *, refreshed_at: datetime | None = None
    ) -> None:
        await self._save_customer(state)
        values = _row_values(state)
        values["payload"] = payload
        if refreshed_at is not None:
            values["refreshed_at"] = refreshed_at
        statement = insert(Subscription).values(**values)
        update: dict[str, Any] = {key: statement.excluded[key] for key in values if key != "subscription_id"}
        update["updated_at"] = func.now()
        await self.session.execute(
            statement.on_conflict_do_update(index_elements=[Subscription.subscription_id], set_=update)
        )

    async def _save_customer(self, state: SubscriptionState) -> None:
        statement = insert(Customer).values(
            customer_id=state.customer_id, email=state.customer_email, name=state.customer_name
        )
        await self.session.execute(
            statement.on_conflict_do_update(
                index_elements=[Customer.customer_id],
                set_={
                    "email": statement.excluded.email,
                    "name": statement.excluded.name,
                    "updated_at": func.now(),
                },
            )
        )

    async def notify_changed(self, customer_id: str) -> None:
        """Tell every replica's cache, at commit, that this customer's entitlements changed."""
        await self.session.execute(
            text("SELECT pg_notify(:channel, :customer)"),
            {"channel": CHANGES_CHANNEL, "customer": customer_id},
        )


def _row_values(state: SubscriptionState) -> dict[str, Any]:
    return {
        "subscription_id": state.subscription_id,
        "customer_id": state.customer_id,
        "product_id": state.product_id,
        "status": state.status,
        "quantity": state.quantity,
        "currency": state.currency,
        "recurring_pre_tax_amount": state.recurring_pre_tax_amount,
        "payment_frequency_count": state.payment_frequency_count,
        "payment_frequency_interval": state.payment_frequency_interval,
        "trial_period_days": state.trial_period_days,
        "dodo_created_at": state.created_at,
        "previous_billing_date": state.previous_billing_date,
        "next_billing_date": state.next_billing_date,
        "cancel_at_next_billing_date": state.cancel_at_next_billing_date,
        "cancelled_at": state.cancelled_at,
        "expires_at": state.expires_at,
        "past_due_ends_at": state.past_due_ends_at,
        "on_hold_since": state.on_hold_since,
        "scheduled_change": _scheduled_json(state.scheduled_change),
        "credit_entitlement_cart": [
            {**asdict(c), "overage_limit": None if c.overage_limit is None else str(c.overage_limit)}
            for c in state.credit_cart
        ],
        "addons": [asdict(a) for a in state.addons],
        "last_event_at": state.last_event_at,
    }


def _scheduled_json(change: ScheduledChange | None) -> dict[str, Any] | None:
    if change is None:
        return None
    return {
        "product_id": change.product_id,
        "quantity": change.quantity,
        "effective_at": None if change.effective_at is None else change.effective_at.isoformat(),
    }


def to_state(row: Subscription) -> SubscriptionState:
    scheduled = row.scheduled_change
    return SubscriptionState(
        subscription_id=row.subscription_id,
        customer_id=row.customer_id,
        product_id=row.product_id,
        status=row.status,
        quantity=row.quantity,
        created_at=row.dodo_created_at,
        trial_period_days=row.trial_period_days,
        previous_billing_date=row.previous_billing_date,
        next_billing_date=row.next_billing_date,
        cancel_at_next_billing_date=row.cancel_at_next_billing_date,
        cancelled_at=row.cancelled_at,
        expires_at=row.expires_at,
        past_due_ends_at=row.past_due_ends_at,
        on_hold_since=row.on_hold_since,
        customer_email=str((row.payload.get("customer") or {}).get("email") or ""),
        customer_name=str((row.payload.get("customer") or {}).get("name") or ""),
        currency=row.currency,
        recurring_pre_tax_amount=row.recurring_pre_tax_amount,
        payment_frequency_count=row.payment_frequency_count,
        payment_frequency_interval=row.payment_frequency_interval,
        scheduled_change=None
        if scheduled is None
        else ScheduledChange(
            product_id=scheduled["product_id"],
            quantity=int(scheduled["quantity"]),
            effective_at=None
            if scheduled.get("effective_at") is None
            else datetime.fromisoformat(scheduled["effective_at"]),
        ),
        credit_cart=tuple(
            CartCredit(
                credit_entitlement_id=c["credit_entitlement_id"],
                overage_enabled=bool(c["overage_enabled"]),
                overage_limit=None if c.get("overage_limit") is None else Decimal(c["overage_limit"]),
            )
            for c in row.credit_entitlement_cart
        ),
        addons=tuple(Addon(a["addon_id"], int(a["quantity"])) for a in row.addons),
        last_event_at=row.last_event_at,
        updated_at=row.updated_at,
    )
