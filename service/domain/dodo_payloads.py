"""Reading Dodo's JSON (webhook `data`, API responses) into domain values.

Dodo adds fields over time and has sent numbers where the spec says decimal strings, so reading is tolerant of
extra and loosely typed fields and strict only about what the rules cannot do without, and about what we store:
ids, decimals and dates follow DESIGN §12, so a value Python or Postgres cannot hold is refused here, as
`MalformedPayload` naming the field (a 400), never discovered later as a failed insert or an overflow (a 500).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from service.domain.decimals import AMOUNT_GRAMMAR
from service.domain.errors import QUOTE_LIMIT, InvalidField, MalformedPayload, quote
from service.domain.limits import MAX_DESCRIPTION, check_id, check_metadata, check_text
from service.domain.values import Addon, CartCredit, ScheduledChange, SubscriptionState

# Dodo's objects nest a handful of levels. The bound keeps json.loads clear of its recursion limit (a RecursionError
# near 1,000 levels) and stored payloads clear of orjson's 255-level limit when they are written as JSONB.
MAX_JSON_DEPTH = 64
# Dates Python and Postgres both hold with room to add a trial (up to 100,000 days) or a grace period.
EARLIEST_YEAR = 1970
LATEST_YEAR = 2200
# The same digit bounds as RPC amounts (service/domain/decimals.py): 20 before the point, 18 after.
MAX_INTEGER_DIGITS = 20
MAX_FRACTION_DIGITS = 18
# orjson (the JSONB codec) writes integers in this range natively; beyond it a number stays a Decimal.
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
# Text Postgres refuses in text and JSONB: NUL, and surrogates without a pair (not encodable as UTF-8).
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
# The only JSON spellings of those: \u0000 and \uD800–\uDFFF (a valid pair is joined by json.loads, and passes).
_RISKY_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


# --- the JSON itself ---------------------------------------------------------------------------------------------


def loads(text: str) -> Any:
    """Dodo's JSON read exactly: numbers with a fraction or exponent as Decimal (never through float), integers
    beyond 64 bits as Decimal, NaN and Infinity refused (not JSON, RFC 8259), nesting bounded, and no string that
    Postgres cannot store."""
    try:
        value = json.loads(text, parse_float=Decimal, parse_int=_json_int, parse_constant=_not_json)
    except RecursionError:
        raise MalformedPayload(f"body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:
        raise MalformedPayload("body is not JSON") from None
    # The walk is skipped for ordinary bodies: deep nesting needs that many brackets, and NUL or a surrogate can
    # only come from its \u escape (json.loads refuses raw control characters; UTF-8 text holds no surrogates).
    deep = text.count("{") + text.count("[") > MAX_JSON_DEPTH
    escaped = _RISKY_ESCAPE.search(text) is not None
    if deep or escaped:
        _check_tree(value, depth=deep, strings=escaped)
    return value


def _json_int(digits: str) -> int | Decimal:
    if len(digits) < 19:  # always within 64 bits: the common case, without a Decimal
        return int(digits)
    exact = Decimal(digits)  # never int(): Python refuses to convert more than 4,300 digits
    return int(exact) if _INT64_MIN <= exact <= _UINT64_MAX else exact


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _check_tree(value: Any, *, depth: bool, strings: bool) -> None:
    """Nesting depth and storable strings over the whole document (unknown fields are stored too), iteratively:
    recursion is what fails on deep input."""
    pending: list[tuple[Any, int, str]] = [(value, 1, "")]
    while pending:
        node, level, path = pending.pop()
        if isinstance(node, str):
            if strings:
                _check_storable(node, path or "body")
            continue
        if not isinstance(node, dict | list):
            continue
        if depth and level > MAX_JSON_DEPTH:
            raise MalformedPayload(f"body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            for key, child in node.items():
                if strings:
                    _check_storable(key, f"a key in {path or 'the body'}")
                # Paths only matter for naming a bad string; a depth-only walk skips building them.
                pending.append((child, level + 1, (f"{path}.{key}" if path else key) if strings else ""))
        else:
            pending.extend(
                (child, level + 1, f"{path}[{index}]" if strings else "") for index, child in enumerate(node)
            )


def _check_storable(text: str, where: str) -> None:
    if _UNSTORABLE.search(text):
        # The path is made of the document's keys (already checked): shown, but at most 64 characters of it.
        shown = where if len(where) <= QUOTE_LIMIT else f"{where[:QUOTE_LIMIT]}…"
        raise MalformedPayload(f"{shown} holds NUL or an unpaired surrogate, which cannot be stored")


# --- fields ------------------------------------------------------------------------------------------------------


@contextmanager
def _field_limits() -> Iterator[None]:
    """The §12 checks raise `InvalidField` (INVALID_ARGUMENT for RPCs); in Dodo's JSON the same failure makes the
    delivery malformed, with the check's message (it names the field and quotes at most 64 characters)."""
    try:
        yield
    except InvalidField as error:
        raise MalformedPayload(error.message, metadata={"field": error.field}) from None


def read_id(value: Any, field: str, *, required: bool = True) -> str:
    """An id we store or index: 1–255 printable characters (§12). Absent (or not text) is "" unless `required`."""
    if not isinstance(value, str) or not value:
        if required:
            raise MalformedPayload(f"{field} is required", metadata={"field": field})
        return ""
    with _field_limits():
        return check_id(field, value)


def parse_time(value: Any, field: str) -> datetime:
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise MalformedPayload(f"{field} must be an ISO-8601 timestamp, got {quote(value)}") from None
    else:
        raise MalformedPayload(f"{field} must be an ISO-8601 timestamp")
    # Checked on the year as written, before any arithmetic: converting 9999-12-31T23:59-05:00 to UTC overflows.
    if not EARLIEST_YEAR <= parsed.year <= LATEST_YEAR:
        raise MalformedPayload(f"{field} must be between the years {EARLIEST_YEAR} and {LATEST_YEAR}")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def optional_time(value: Any, field: str) -> datetime | None:
    return None if value is None else parse_time(value, field)


def parse_decimal(value: Any, field: str, *, signed: bool = False) -> Decimal:
    """A decimal string in plain notation with the grammar of RPC amounts ("25", "0.25"; a leading "-" only when
    `signed`), or a JSON number (int, or Decimal as `loads` reads it) within the same digit bounds.

    Refused: exponents in strings ("1e400"), spaces, "+", digits of other scripts (Decimal() would read them),
    NaN/Infinity, booleans, and floats (a float has already lost digits: read the JSON with `loads`)."""
    amount = _exact_decimal(value, signed=signed)
    if amount is not None:
        return amount
    sign = "an optionally negative" if signed else "a non-negative"
    got = f", got {quote(value)}" if isinstance(value, str) else ""
    raise MalformedPayload(
        f"{field} must be {sign} decimal with at most {MAX_INTEGER_DIGITS} digits before the point and "
        f"{MAX_FRACTION_DIGITS} after, in plain notation{got}",
        metadata={"field": field},
    )


def _exact_decimal(value: Any, *, signed: bool) -> Decimal | None:
    if isinstance(value, str):
        digits = value.removeprefix("-") if signed else value
        return Decimal(value) if AMOUNT_GRAMMAR.fullmatch(digits) else None
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        return None
    amount = Decimal(value)
    if amount.is_signed() and not signed:
        return None
    return amount if _within_digit_bounds(amount) else None


def _within_digit_bounds(value: Decimal) -> bool:
    """Read off the digits and exponent, never computed with: 1E+999999999 is a valid Decimal."""
    _, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):  # NaN, Infinity
        return False
    fraction = max(0, -exponent)
    integer = len(digits) + exponent if exponent >= 0 else max(0, len(digits) - fraction)
    return integer <= MAX_INTEGER_DIGITS and fraction <= MAX_FRACTION_DIGITS


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    return value if isinstance(value, str) else ""


def _int(data: Mapping[str, Any], key: str, default: int = 0, *, limit: int = 2**31 - 1, where: str = "data") -> int:
    value = data.get(key)
    if _integer_beyond(value, limit):
        # An integer beyond 64 bits (`loads` keeps those as Decimal): out of range, as a smaller one would be.
        raise MalformedPayload(f"{where}.{key} is out of range")
    if isinstance(value, bool) or not isinstance(value, int):
        return default
    if not -limit <= value <= limit:
        raise MalformedPayload(f"{where}.{key} is out of range")
    return value


def _integer_beyond(value: Any, limit: int) -> bool:
    if not isinstance(value, Decimal):
        return False
    exponent = value.as_tuple().exponent
    return isinstance(exponent, int) and exponent >= 0 and abs(value) > limit


def _cart(items: Any) -> tuple[CartCredit, ...]:
    cart: list[CartCredit] = []
    for index, item in enumerate(items if isinstance(items, list) else []):
        if not isinstance(item, Mapping) or not isinstance(item.get("credit_entitlement_id"), str):
            continue
        where = f"data.credit_entitlement_cart[{index}]"
        limit = item.get("overage_limit")
        cart.append(
            CartCredit(
                credit_entitlement_id=read_id(item["credit_entitlement_id"], f"{where}.credit_entitlement_id"),
                overage_enabled=item.get("overage_enabled") is True,
                overage_limit=None if limit is None else parse_decimal(limit, f"{where}.overage_limit"),
            )
        )
    return tuple(cart)


def _addons(items: Any) -> tuple[Addon, ...]:
    return tuple(
        Addon(
            read_id(str(item["addon_id"]), f"data.addons[{index}].addon_id"),
            _int(item, "quantity", 1, where=f"data.addons[{index}]"),
        )
        for index, item in enumerate(items if isinstance(items, list) else [])
        if isinstance(item, Mapping) and item.get("addon_id")
    )


def _scheduled(value: Any) -> ScheduledChange | None:
    if not isinstance(value, Mapping) or not value.get("product_id"):
        return None
    return ScheduledChange(
        product_id=read_id(str(value["product_id"]), "data.scheduled_change.product_id"),
        quantity=_int(value, "quantity", where="data.scheduled_change")
        if isinstance(value.get("quantity"), int)
        else None,
        effective_at=optional_time(value.get("effective_at"), "data.scheduled_change.effective_at"),
    )


def _metadata(value: Any, field: str) -> None:
    """Stored beside the snapshot: Dodo's own limits (50 pairs, keys 40, values 500), so mirrored data fits."""
    if value is None:
        return
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        raise MalformedPayload(f"{field} must be an object of text values", metadata={"field": field})
    with _field_limits():
        check_metadata(field, value)


# --- subscriptions -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DodoSubscription:
    """A Dodo Subscription object read once: the snapshot the rules use, and the raw JSON stored beside it."""

    state: SubscriptionState
    payload: dict[str, Any]


def read_subscription(data: dict[str, Any]) -> DodoSubscription:
    return DodoSubscription(parse_subscription(data), data)


def parse_subscription(data: Mapping[str, Any]) -> SubscriptionState:
    """A Dodo Subscription object (webhook `data` or GET /subscriptions/{id}) as a domain snapshot."""
    customer = data.get("customer")
    if not isinstance(customer, Mapping):
        raise MalformedPayload("data.customer is required")
    _metadata(data.get("metadata"), "data.metadata")
    return SubscriptionState(
        subscription_id=read_id(data.get("subscription_id"), "data.subscription_id"),
        customer_id=read_id(customer.get("customer_id"), "data.customer.customer_id"),
        product_id=read_id(data.get("product_id"), "data.product_id"),
        # Not an id, but indexed with next_billing_date: the same bound keeps it within a btree entry.
        status=read_id(data.get("status"), "data.status"),
        quantity=_int(data, "quantity", 1),
        created_at=parse_time(data.get("created_at"), "data.created_at"),
        # Bounded so that created_at + trial stays a representable date.
        trial_period_days=_int(data, "trial_period_days", limit=100_000),
        previous_billing_date=optional_time(data.get("previous_billing_date"), "data.previous_billing_date"),
        next_billing_date=optional_time(data.get("next_billing_date"), "data.next_billing_date"),
        cancel_at_next_billing_date=data.get("cancel_at_next_billing_date") is True,
        cancelled_at=optional_time(data.get("cancelled_at"), "data.cancelled_at"),
        expires_at=optional_time(data.get("expires_at"), "data.expires_at"),
        past_due_ends_at=optional_time(data.get("past_due_ends_at"), "data.past_due_ends_at"),
        customer_email=_str(customer, "email"),
        customer_name=_str(customer, "name"),
        currency=read_id(data.get("currency"), "data.currency", required=False),
        recurring_pre_tax_amount=_int(data, "recurring_pre_tax_amount", limit=2**63 - 1),
        payment_frequency_count=_int(data, "payment_frequency_count"),
        payment_frequency_interval=read_id(
            data.get("payment_frequency_interval"), "data.payment_frequency_interval", required=False
        ),
        scheduled_change=_scheduled(data.get("scheduled_change")),
        credit_cart=_cart(data.get("credit_entitlement_cart")),
        addons=_addons(data.get("addons")),
    )


# --- credit ledger entries, payments, other events we only keep ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class DodoLedgerEntry:
    """One Dodo credit ledger entry (`credit.*` ledger webhooks): a signed delta of `amount`, once per `entry_id`."""

    entry_id: str
    customer_id: str
    credit_entitlement_id: str
    is_credit: bool
    amount: Decimal
    transaction_type: str
    description: str
    created_at: datetime


def read_ledger_entry(data: Mapping[str, Any]) -> DodoLedgerEntry:
    entry_id = read_id(data.get("id"), "data.id")
    customer_id = read_id(data.get("customer_id"), "data.customer_id")
    entitlement = read_id(data.get("credit_entitlement_id"), "data.credit_entitlement_id")
    # Unsigned: the sign comes from is_credit.
    amount = parse_decimal(data.get("amount"), "data.amount")
    is_credit = data.get("is_credit")
    if not isinstance(is_credit, bool):
        raise MalformedPayload("data.is_credit must be true or false")
    # Dodo's running balances are not mirrored (ours is the ledger's sum), but an entry whose numbers do not read
    # is refused whole rather than half-trusted. Balances go below zero in overage.
    for key in ("balance_before", "balance_after", "overage_before", "overage_after"):
        if data.get(key) is not None:
            parse_decimal(data[key], f"data.{key}", signed=True)
    description = data.get("description")
    if isinstance(description, str):
        with _field_limits():
            check_text("data.description", description, max_length=MAX_DESCRIPTION)
    return DodoLedgerEntry(
        entry_id=entry_id,
        customer_id=customer_id,
        credit_entitlement_id=entitlement,
        is_credit=is_credit,
        amount=amount,
        transaction_type=read_id(data.get("transaction_type"), "data.transaction_type", required=False),
        description=description if isinstance(description, str) else "",
        created_at=parse_time(data.get("created_at"), "data.created_at"),
    )


def read_payment(data: Mapping[str, Any]) -> str:
    """A payment is only kept in the inbox, under its payment_id (indexed there): the ids it carries are checked,
    none is required. Returns the payment_id, "" when absent."""
    customer = data.get("customer")
    if isinstance(customer, Mapping):
        read_id(customer.get("customer_id"), "data.customer.customer_id", required=False)
    read_id(data.get("subscription_id"), "data.subscription_id", required=False)
    return read_id(data.get("payment_id"), "data.payment_id", required=False)


def read_credit_notice(data: Mapping[str, Any]) -> str:
    """A `credit.*` event that is not a ledger entry (`credit.balance_low`, types Dodo adds): kept in the inbox
    under its credit_entitlement_id. Returns that id, "" when absent."""
    read_id(data.get("customer_id"), "data.customer_id", required=False)
    read_id(data.get("subscription_id"), "data.subscription_id", required=False)
    return read_id(data.get("credit_entitlement_id"), "data.credit_entitlement_id", required=False)


def customer_ref_in(data: Mapping[str, Any], key: str) -> tuple[str, str] | None:
    """(customer_id, customer_ref) when a subscription's or payment's `metadata` (or its customer's) carries the
    company's own id under `key`; None when it does not, or when what it carries is not a valid id (§12): the
    metadata is the merchant's, so a bad ref is skipped rather than the event refused."""
    customer = data.get("customer")
    if not isinstance(customer, Mapping) or not isinstance(customer.get("customer_id"), str):
        return None
    for metadata in (data.get("metadata"), customer.get("metadata")):
        ref = metadata.get(key) if isinstance(metadata, Mapping) else None
        if isinstance(ref, str) and ref:
            try:
                return check_id("customer.customer_id", customer["customer_id"]), check_id(key, ref)
            except InvalidField:
                return None
    return None
