"""All SQL about customers and subscriptions. Takes and returns domain values."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from service.domain.values import Account, Addon, CartCredit, ScheduledChange, SubscriptionState
from storage.engine import Connection
from storage.repositories.credits import PeriodClaim, account_of, claim_args, period_claims
from storage.repositories.inbox import InboxRow, inbox_insert

_COLUMNS = (
    "subscription_id, customer_id, product_id, status, quantity, currency, recurring_pre_tax_amount, "
    "payment_frequency_count, payment_frequency_interval, trial_period_days, dodo_created_at, "
    "previous_billing_date, next_billing_date, cancel_at_next_billing_date, cancelled_at, expires_at, "
    "past_due_ends_at, on_hold_since, hold_cleared_at, scheduled_change, credit_entitlement_cart, addons, "
    "last_event_at, "
    "updated_at, payload->'customer'->>'email' AS customer_email, payload->'customer'->>'name' AS customer_name"
)
SELECT_SUBSCRIPTIONS = f"SELECT {_COLUMNS} FROM subscriptions"
_LOCK = f"""
SELECT found.* FROM (SELECT pg_advisory_xact_lock(hashtextextended($1, 0)), 1 AS go) AS locked
LEFT JOIN LATERAL ({SELECT_SUBSCRIPTIONS} WHERE subscription_id = $2 AND locked.go = 1 FOR UPDATE) AS found ON true
"""

# One statement writes the customer, the subscription and the change-feed row for every replica's cache (and, for
# a webhook delivery, its inbox row).
_WRITE = """
WITH customer AS (
    INSERT INTO customers (customer_id, email, name) VALUES ($2, $24, $25)
    -- The conflicting row is locked either way; an unchanged customer is not rewritten (no new row version).
    ON CONFLICT (customer_id) DO UPDATE SET email = EXCLUDED.email, name = EXCLUDED.name, updated_at = now()
    WHERE (customers.email, customers.name) IS DISTINCT FROM (EXCLUDED.email, EXCLUDED.name)
), saved AS (
    INSERT INTO subscriptions (
        subscription_id, customer_id, product_id, status, quantity, currency, recurring_pre_tax_amount,
        payment_frequency_count, payment_frequency_interval, trial_period_days, dodo_created_at,
        previous_billing_date, next_billing_date, cancel_at_next_billing_date, cancelled_at, expires_at,
        past_due_ends_at, on_hold_since, scheduled_change, credit_entitlement_cart, addons, last_event_at,
        payload, refreshed_at, metadata, hold_cleared_at
    ) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22,
              $23, $26, coalesce($23::jsonb->'metadata', '{{}}'::jsonb), $28)
    ON CONFLICT (subscription_id) {on_conflict}
    RETURNING 1
), changed AS (
    INSERT INTO entitlement_changes (customer_id) SELECT DISTINCT unnest(ARRAY[$2, $27]::text[])
){inbox}{claims}
SELECT w.written, w.stored{account_columns}
FROM (SELECT (SELECT count(*) FROM saved) AS written, {stored} AS stored) AS w{account_join}
"""
_WRITTEN = "EXISTS (SELECT 1 FROM saved)"

_UPDATE_ON_CONFLICT = """DO UPDATE SET
        customer_id = EXCLUDED.customer_id, product_id = EXCLUDED.product_id, status = EXCLUDED.status,
        quantity = EXCLUDED.quantity, currency = EXCLUDED.currency,
        recurring_pre_tax_amount = EXCLUDED.recurring_pre_tax_amount,
        payment_frequency_count = EXCLUDED.payment_frequency_count,
        payment_frequency_interval = EXCLUDED.payment_frequency_interval,
        trial_period_days = EXCLUDED.trial_period_days, dodo_created_at = EXCLUDED.dodo_created_at,
        previous_billing_date = EXCLUDED.previous_billing_date, next_billing_date = EXCLUDED.next_billing_date,
        cancel_at_next_billing_date = EXCLUDED.cancel_at_next_billing_date, cancelled_at = EXCLUDED.cancelled_at,
        expires_at = EXCLUDED.expires_at, past_due_ends_at = EXCLUDED.past_due_ends_at,
        on_hold_since = EXCLUDED.on_hold_since, hold_cleared_at = EXCLUDED.hold_cleared_at,
        scheduled_change = EXCLUDED.scheduled_change,
        credit_entitlement_cart = EXCLUDED.credit_entitlement_cart, addons = EXCLUDED.addons,
        last_event_at = EXCLUDED.last_event_at, payload = EXCLUDED.payload, metadata = EXCLUDED.metadata,
        refreshed_at = coalesce(EXCLUDED.refreshed_at, subscriptions.refreshed_at), updated_at = now()"""


@functools.cache
def _write_statement(*, insert: bool, inbox: bool, claims: bool) -> str:
    """The write, with (numbered after the 28 of the snapshot) the delivery's inbox row and the plan grants to
    claim, both only when the subscription was written (an insert that lost the race writes nothing)."""
    claims_from = 29 + (7 if inbox else 0)
    return _WRITE.format(
        on_conflict="DO NOTHING" if insert else _UPDATE_ON_CONFLICT,
        inbox=f", inbox AS ({inbox_insert(29, when=_WRITTEN)})" if inbox else "",
        claims=f", {period_claims(claims_from, subscription='$1', customer='$2', when=_WRITTEN)}" if claims else "",
        stored="(SELECT count(*) FROM inbox)" if inbox else "NULL::bigint",
        account_columns=", a.customer_id, a.credit, a.balance, a.grants" if claims else "",
        account_join=" LEFT JOIN claimed_account AS a ON true" if claims else "",
    )


_STALE = """
SELECT subscription_id FROM subscriptions
WHERE (
        (status = 'active' AND next_billing_date < $1::timestamptz - $2::interval)
     OR status IN ('on_hold', 'past_due')
     OR (cancel_at_next_billing_date AND next_billing_date < $1 AND status = 'active')
     OR last_event_at < $1::timestamptz - $3::interval
  )
  -- Asked Dodo recently and it still says so: no point asking again on every pass.
  AND (refreshed_at IS NULL OR refreshed_at < $1::timestamptz - $4::interval)
ORDER BY subscription_id
"""


@dataclass(frozen=True, slots=True)
class Saved:
    """`written`: the subscription was stored (False only for an insert that found the row taken). `inbox_stored`:
    None when no inbox row was given or nothing was written; else whether the row went in (False: this webhook-id
    is already stored, and the caller rolls back)."""

    written: bool
    inbox_stored: bool | None = None
    # The accounts of the plan grants claimed with the write, locked: the caller credits them.
    claimed: tuple[Account, ...] = ()


class SubscriptionRepository:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def lock(self, subscription_id: str) -> SubscriptionState | None:
        """The stored subscription (None if not stored yet), its writers serialized until the transaction ends.

        One round trip: an advisory lock of the id, then the row read FOR UPDATE. A subscription not stored yet has
        no row to lock, and two first deliveries must not deadlock inside their write statements (each writes the
        subscription and its customer, in an order Postgres does not promise); the advisory lock orders them.
        A row inserted by the writer we waited for is not in this statement's snapshot: the insert that follows
        then finds it taken (`save(..., insert=True)` is False) and the caller locks again."""
        row = await self.connection.fetchrow(_LOCK, f"subscription:{subscription_id}", subscription_id)
        return None if row is None or row["subscription_id"] is None else to_state(row)

    async def get(self, subscription_id: str) -> SubscriptionState | None:
        row = await self.connection.fetchrow(f"{SELECT_SUBSCRIPTIONS} WHERE subscription_id = $1", subscription_id)
        return None if row is None else to_state(row)

    async def for_customer(self, customer_id: str) -> list[SubscriptionState]:
        rows = await self.connection.fetch(
            f"{SELECT_SUBSCRIPTIONS} WHERE customer_id = $1 ORDER BY dodo_created_at DESC", customer_id
        )
        return [to_state(row) for row in rows]

    async def for_customers(self, customer_ids: Sequence[str]) -> dict[str, list[SubscriptionState]]:
        """`for_customer` for several customers in one round trip (every id is a key, [] when it has none)."""
        found: dict[str, list[SubscriptionState]] = {customer_id: [] for customer_id in customer_ids}
        rows = await self.connection.fetch(
            f"{SELECT_SUBSCRIPTIONS} WHERE customer_id = ANY($1::text[]) ORDER BY dodo_created_at DESC",
            list(found),
        )
        for row in rows:
            found[row["customer_id"]].append(to_state(row))
        return found

    async def save(
        self,
        state: SubscriptionState,
        payload: dict[str, Any],
        *,
        refreshed_at: datetime | None = None,
        previous_customer_id: str | None = None,
        insert: bool = False,
        inbox: InboxRow | None = None,
        claims: Sequence[PeriodClaim] = (),
    ) -> Saved:
        """Write the snapshot and its customer, and record the change of both customers involved for every
        replica's cache; with `inbox`, the webhook delivery's inbox row in the same statement. With `insert`, only
        a brand-new row is written: not `written` means a concurrent first delivery inserted it meanwhile (the
        caller locks that row and merges again). `claims` are the plan grants this snapshot calls for: each is
        claimed once ever, and the accounts of those claimed now come back locked (`claimed`)."""
        rows = await self.connection.fetch(
            _write_statement(insert=insert, inbox=inbox is not None, claims=bool(claims)),
            state.subscription_id,
            state.customer_id,
            state.product_id,
            state.status,
            state.quantity,
            state.currency,
            state.recurring_pre_tax_amount,
            state.payment_frequency_count,
            state.payment_frequency_interval,
            state.trial_period_days,
            state.created_at,
            state.previous_billing_date,
            state.next_billing_date,
            state.cancel_at_next_billing_date,
            state.cancelled_at,
            state.expires_at,
            state.past_due_ends_at,
            state.on_hold_since,
            _scheduled_json(state.scheduled_change),
            [_cart_json(c) for c in state.credit_cart],
            [asdict(a) for a in state.addons],
            state.last_event_at,
            payload,
            state.customer_email,
            state.customer_name,
            refreshed_at,
            previous_customer_id or state.customer_id,
            state.hold_cleared_at,
            *(() if inbox is None else inbox.args()),
            *(claim_args(claims) if claims else ()),
        )
        row = rows[0]
        written = bool(row["written"])
        claimed = tuple(account_of(r) for r in rows if claims and r["customer_id"] is not None)
        return Saved(written, None if inbox is None or not written else bool(row["stored"]), claimed)

    async def stale_ids(
        self, now: datetime, *, renewal_margin: timedelta, silent_for: timedelta, recheck_after: timedelta
    ) -> list[str]:
        """Subscriptions whose local state may be out of date: active well past the period end without a renewal;
        in payment trouble (Dodo moves these on and we must not miss it); a scheduled cancellation past its end
        that never arrived; or nothing heard, from webhooks or from Dodo itself, for `silent_for`. Those fetched
        from Dodo within `recheck_after` are left out."""
        rows = await self.connection.fetch(_STALE, now, renewal_margin, silent_for, recheck_after)
        return [row["subscription_id"] for row in rows]

    async def all_ids(self) -> list[str]:
        rows = await self.connection.fetch("SELECT subscription_id FROM subscriptions ORDER BY subscription_id")
        return [row["subscription_id"] for row in rows]

    async def move_hold_start(self, subscription_id: str, customer_id: str, since: datetime) -> None:
        """Only the grace start moves (to an earlier event of the same episode); nothing else regresses."""
        await self.connection.execute(
            """
            WITH moved AS (
                UPDATE subscriptions SET on_hold_since = $2, updated_at = now() WHERE subscription_id = $1
            )
            INSERT INTO entitlement_changes (customer_id) VALUES ($3)
            """,
            subscription_id,
            since,
            customer_id,
        )


def _cart_json(item: CartCredit) -> dict[str, Any]:
    return {**asdict(item), "overage_limit": None if item.overage_limit is None else str(item.overage_limit)}


def _scheduled_json(change: ScheduledChange | None) -> dict[str, Any] | None:
    if change is None:
        return None
    return {
        "product_id": change.product_id,
        "quantity": change.quantity,
        "effective_at": None if change.effective_at is None else change.effective_at.isoformat(),
    }


def to_state(row: Any) -> SubscriptionState:
    scheduled = row["scheduled_change"]
    return SubscriptionState(
        subscription_id=row["subscription_id"],
        customer_id=row["customer_id"],
        product_id=row["product_id"],
        status=row["status"],
        quantity=row["quantity"],
        created_at=row["dodo_created_at"],
        trial_period_days=row["trial_period_days"],
        previous_billing_date=row["previous_billing_date"],
        next_billing_date=row["next_billing_date"],
        cancel_at_next_billing_date=row["cancel_at_next_billing_date"],
        cancelled_at=row["cancelled_at"],
        expires_at=row["expires_at"],
        past_due_ends_at=row["past_due_ends_at"],
        on_hold_since=row["on_hold_since"],
        hold_cleared_at=row["hold_cleared_at"],
        customer_email=row["customer_email"] or "",
        customer_name=row["customer_name"] or "",
        currency=row["currency"],
        recurring_pre_tax_amount=row["recurring_pre_tax_amount"],
        payment_frequency_count=row["payment_frequency_count"],
        payment_frequency_interval=row["payment_frequency_interval"],
        scheduled_change=None
        if scheduled is None
        else ScheduledChange(
            product_id=scheduled["product_id"],
            quantity=None if scheduled.get("quantity") is None else int(scheduled["quantity"]),
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
            for c in row["credit_entitlement_cart"]
        ),
        addons=tuple(Addon(a["addon_id"], int(a["quantity"])) for a in row["addons"]),
        last_event_at=row["last_event_at"],
        updated_at=row["updated_at"],
    )
