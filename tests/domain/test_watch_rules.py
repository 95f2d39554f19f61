"""The watch log's pure rules: which events a change makes, when time alone changes a decision, cursors, and the
catalog's low-balance threshold."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

import pytest

from service.domain.catalog import CatalogError, LowBalanceThreshold, parse_catalog
from service.domain.errors import InvalidField
from service.domain.values import SubscriptionState
from service.domain.watch_rules import (
    Cursor,
    WatchKind,
    check_customer_ids,
    credit_kinds,
    next_instant,
    parse_cursor,
    subscription_kinds,
    time_changes,
)
from tests.support import utc

NOW = utc("2026-09-10T00:00:00Z")
SUB = SubscriptionState(
    subscription_id="sub_1",
    customer_id="cus_1",
    product_id="pdt_x",
    status="active",
    quantity=1,
    created_at=NOW - timedelta(days=10),
    next_billing_date=NOW + timedelta(days=20),
    last_event_at=NOW,
)
K = WatchKind


def test_a_new_subscription_that_grants_access_is_changed_and_access_changed() -> None:
    assert subscription_kinds(None, SUB, 3, NOW) == [K.SUBSCRIPTION_CHANGED, K.ACCESS_CHANGED]
    assert subscription_kinds(None, replace(SUB, status="expired"), 3, NOW) == [K.SUBSCRIPTION_CHANGED]


def test_bookkeeping_alone_makes_no_event() -> None:
    later = replace(SUB, last_event_at=NOW + timedelta(hours=1), updated_at=NOW + timedelta(hours=1))
    assert subscription_kinds(SUB, later, 3, NOW) == []


def test_a_change_that_keeps_the_decision_is_only_subscription_changed() -> None:
    assert subscription_kinds(SUB, replace(SUB, quantity=2), 3, NOW) == [K.SUBSCRIPTION_CHANGED]


def test_a_hold_with_grace_changes_the_reason_and_without_grace_the_access() -> None:
    held = replace(SUB, status="on_hold", on_hold_since=NOW)
    assert subscription_kinds(SUB, held, 3, NOW) == [K.SUBSCRIPTION_CHANGED, K.ACCESS_CHANGED]  # ACTIVE -> GRACE
    assert subscription_kinds(SUB, held, 0, NOW) == [K.SUBSCRIPTION_CHANGED, K.ACCESS_CHANGED]  # -> inactive


def test_time_changes_at_trial_end_period_end_and_grace_end() -> None:
    trial = replace(SUB, trial_period_days=14)  # created 10 days ago: ends in 4
    assert time_changes(trial, 3, NOW, NOW + timedelta(days=5)) == [NOW + timedelta(days=4)]
    assert time_changes(trial, 3, NOW + timedelta(days=4), NOW + timedelta(days=5)) == []  # (after, through]
    cancelling = replace(SUB, cancel_at_next_billing_date=True)
    assert time_changes(cancelling, 3, NOW, NOW + timedelta(days=30)) == [NOW + timedelta(days=20)]
    held = replace(SUB, status="on_hold", on_hold_since=NOW)
    assert time_changes(held, 3, NOW, NOW + timedelta(days=30)) == [NOW + timedelta(days=3)]
    assert time_changes(held, 0, NOW, NOW + timedelta(days=30)) == []
    past_due = replace(SUB, status="past_due", past_due_ends_at=NOW + timedelta(hours=5))
    assert time_changes(past_due, 3, NOW, NOW + timedelta(days=30)) == [NOW + timedelta(hours=5)]
    # A renewal date of a subscription that keeps renewing changes nothing.
    assert time_changes(SUB, 3, NOW, NOW + timedelta(days=30)) == []


def test_next_instant_is_the_earliest_after_the_given_one() -> None:
    trial = replace(SUB, trial_period_days=14)
    held = replace(SUB, subscription_id="sub_2", status="on_hold", on_hold_since=NOW, product_id="pdt_y")
    assert next_instant([trial, held], {"pdt_y": 1}, 3, NOW) == NOW + timedelta(days=1)
    assert next_instant([trial, held], {"pdt_y": 1}, 3, NOW + timedelta(days=1)) == NOW + timedelta(days=4)
    assert next_instant([SUB], {}, 3, NOW) is None


@pytest.mark.parametrize(
    ("old", "new", "kinds"),
    [
        ("2000", "1500", [K.CREDITS_CHANGED]),
        ("1500", "1000", [K.CREDITS_CHANGED, K.CREDITS_LOW]),  # at the threshold counts as low
        ("1000", "900", [K.CREDITS_CHANGED]),  # already low: no second event
        ("900", "1200", [K.CREDITS_CHANGED]),  # back above
        ("1200", "0", [K.CREDITS_CHANGED, K.CREDITS_LOW, K.CREDITS_EXHAUSTED]),
        ("0", "-5", [K.CREDITS_CHANGED]),
        ("5", "5", []),
        (None, "10", [K.CREDITS_CHANGED]),
    ],
)
def test_credit_crossings(old: str | None, new: str, kinds: list[WatchKind]) -> None:
    old_balance = None if old is None else Decimal(old)
    assert credit_kinds(old_balance, Decimal(new), threshold=Decimal(1000), overage_limit=Decimal(0)) == kinds


def test_exhausted_counts_the_overage_headroom() -> None:
    assert credit_kinds(Decimal(5), Decimal(-50), threshold=None, overage_limit=Decimal(100)) == [K.CREDITS_CHANGED]
    assert credit_kinds(Decimal(-50), Decimal(-100), threshold=None, overage_limit=Decimal(100)) == [
        K.CREDITS_CHANGED,
        K.CREDITS_EXHAUSTED,
    ]


def test_cursors_round_trip_and_anything_else_is_refused() -> None:
    cursor = Cursor("0123456789ab", 42)
    assert parse_cursor(cursor.text()) == cursor
    for text in ("", "42", "w1.0123456789ab", "w2.0123456789ab.1", "w1.0123456789AB.1", "w1.0123456789ab.-1"):
        with pytest.raises(InvalidField) as raised:
            parse_cursor(text)
        assert raised.value.field == "after_cursor"
    with pytest.raises(InvalidField):
        parse_cursor("w1.0123456789ab.9999999999999999999")  # past a bigint


def test_customer_filter() -> None:
    assert check_customer_ids([]) is None
    assert check_customer_ids(["a", "b", "a"]) == frozenset({"a", "b"})
    with pytest.raises(InvalidField):
        check_customer_ids(["x"] * 1001)


def test_low_balance_thresholds_in_the_catalog() -> None:
    catalog = parse_catalog(
        {"credits": {"a": {"low_balance_threshold": "10%"}, "b": {"low_balance_threshold": "500"}, "c": {}}}
    )
    a, b, c = (catalog.credits[k].low_balance for k in "abc")
    assert a == LowBalanceThreshold(Decimal(10), percent_of_last_grant=True)
    assert a is not None
    assert a.resolve(Decimal(2500)) == Decimal(250)
    assert a.resolve(None) is None  # no grant yet: no threshold
    assert b is not None
    assert b.resolve(None) == Decimal(500)
    assert c is None
    for bad in ("0%", "101%", "-1", "lots", True):
        with pytest.raises(CatalogError, match="low_balance_threshold"):
            parse_catalog({"credits": {"a": {"low_balance_threshold": bad}}})
