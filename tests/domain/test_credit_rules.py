"""Unit tests for the credit rules of DESIGN §6 (service/credits.py): amounts, burn order, expiry, overage,
idempotency fingerprints. Pure functions of data and an instant: no I/O, no clock."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain import credit_rules as credits
from service.domain import decimals
from service.domain.catalog import Catalog, CreditDef, parse_catalog
from service.domain.errors import InvalidArgument
from service.domain.values import Account, CartCredit, Grant, LedgerEntry, SubscriptionState

NOW = datetime(2026, 9, 10, tzinfo=UTC)
DAY = timedelta(days=1)
CUSTOMER = "cus_rules"
LINKED = "cent_linked"


def catalog_with_plan() -> Catalog:
    return parse_catalog(
        {
            "credits": {
                "ai_tokens": {"overage_limit": "0"},
                "bonus": {"rollover": True},
                "unused": {},
                "api_calls": {"dodo_credit_entitlement_id": LINKED, "overage_limit": "100"},
            },
            "plans": {
                "pdt_pro": {
                    "name": "Pro",
                    "credits": {"ai_tokens": "10000", "bonus": "50", "unused": "0"},
                    "trial_credits": {"ai_tokens": "1000"},
                },
                "pdt_starter": {"name": "Starter", "features": ["dashboard"]},
            },
        }
    )


def grant(grant_id: str, remaining: str, expires_at: datetime | None) -> Grant:
    return Grant(grant_id, Decimal(remaining), expires_at, source=f"src-{grant_id}")


def account(balance: str, *grants: Grant) -> Account:
    return Account(CUSTOMER, "ai_tokens", Decimal(balance), tuple(grants))


def sub(
    product_id: str = "pdt_pro",
    *,
    previous: datetime | None = NOW - DAY,
    next_: datetime | None = NOW + 29 * DAY,
    cart: tuple[CartCredit, ...] = (),
) -> SubscriptionState:
    return SubscriptionState(
        subscription_id="sub_rules",
        customer_id=CUSTOMER,
        product_id=product_id,
        status="active",
        quantity=1,
        created_at=NOW - 40 * DAY,
        previous_billing_date=previous,
        next_billing_date=next_,
        credit_cart=cart,
    )


# --- parse_amount ---------------------------------------------------------------------------------------------------

ACCEPTED = [
    ("25", "25"),
    ("0.25", "0.25"),
    ("1.50", "1.5"),
    ("007", "7"),
    ("0.000000000000000001", "0.000000000000000001"),
    ("12345678901234567890", "12345678901234567890"),
    ("12345678901234567890.123456789012345678", "12345678901234567890.123456789012345678"),
    ("99999999999999999999.999999999999999999", "99999999999999999999.999999999999999999"),
]

REFUSED = [
    "0",
    "0.0",
    "0.000000000000000000",
    "-5",
    "-0.5",
    "abc",
    "NaN",
    "nan",
    "sNaN",
    "Infinity",
    "inf",
    "1e400",
    "1e3",
    "1E3",
    "",
    " 5",
    "5 ",
    "5\n",
    "+5",
    ".5",
    "5.",
    "1,5",
    "1_000",
    "0x10",
    "123456789012345678901",  # 21 digits before the point
    "0.0000000000000000001",  # 19 after it
    "00000000000000000000001",  # small, but 23 digits before the point
    "\uff15",  # FULLWIDTH DIGIT FIVE: Decimal() reads it as 5, but it is not plain notation
    "\u0661\u0662",  # ARABIC-INDIC "12"
]


@pytest.mark.parametrize(("text", "normalized"), ACCEPTED)
def test_parse_amount_accepts_positive_plain_decimals_exactly(text: str, normalized: str) -> None:
    amount = decimals.parse_amount(text)
    assert amount == Decimal(normalized)
    assert decimals.decimal_text(amount) == normalized


@pytest.mark.parametrize("text", REFUSED)
def test_parse_amount_refuses_what_is_not_a_positive_plain_decimal(text: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        decimals.parse_amount(text)
    assert refused.value.grpc_code is grpc.StatusCode.INVALID_ARGUMENT
    assert "amount" in refused.value.message


# --- burn order -----------------------------------------------------------------------------------------------------


def test_burn_takes_the_soonest_expiring_grant_first() -> None:
    late = grant("late", "100", NOW + 20 * DAY)
    soon = grant("soon", "100", NOW + 2 * DAY)
    never = grant("never", "100", None)
    kept = credits.burn([late, never, soon], Decimal(150))
    assert {g.grant_id: g.remaining for g in kept} == {"late": Decimal(50), "never": Decimal(100)}


def test_burn_takes_never_expiring_grants_last() -> None:
    never = grant("never", "100", None)
    far = grant("far", "100", NOW + 3650 * DAY)
    kept = credits.burn([never, far], Decimal(100))
    assert [g.grant_id for g in kept] == ["never"]
    assert credits.burn([never, far], Decimal(150)) == (grant("never", "50", None),)


def test_burn_takes_the_older_grant_first_among_equal_expiries() -> None:
    first = grant("first", "10", NOW + DAY)
    second = grant("second", "10", NOW + DAY)
    assert [g.grant_id for g in credits.burn([first, second], Decimal(4))] == ["first", "second"]
    assert credits.burn([first, second], Decimal(14)) == (grant("second", "6", NOW + DAY),)


def test_burn_drops_spent_grants_and_leaves_none_in_overage() -> None:
    grants = [grant("a", "10", NOW + DAY), grant("b", "5", None)]
    assert credits.burn(grants, Decimal(10)) == (grant("b", "5", None),)
    assert credits.burn(grants, Decimal(15)) == ()
    assert credits.burn(grants, Decimal(40)) == ()


# --- expiry ---------------------------------------------------------------------------------------------------------


def test_expire_writes_down_each_grant_whose_expiry_has_come_and_keeps_the_rest() -> None:
    at_now = grant("at-now", "30", NOW)  # expiry is inclusive: a grant expiring at `now` no longer counts
    past = grant("past", "20", NOW - DAY)
    future = grant("future", "40", NOW + timedelta(microseconds=1))
    never = grant("never", "10", None)
    before = account("100", at_now, past, future, never)

    after, entries = credits.expire(before, NOW)

    assert after.balance == Decimal(50)
    assert after.grants == (future, never)
    assert [(e.amount, e.balance_after, e.kind, e.source) for e in entries] == [
        (Decimal(-30), Decimal(70), "grant_expiry", "src-at-now"),
        (Decimal(-20), Decimal(50), "grant_expiry", "src-past"),
    ]
    assert len({e.entry_id for e in entries}) == 2
    assert credits.effective_balance(before, NOW) == after.balance


def test_expire_changes_nothing_when_no_grant_has_expired() -> None:
    before = account("70", grant("future", "40", NOW + DAY), grant("never", "30", None))
    assert credits.expire(before, NOW) == (before, [])
    assert credits.effective_balance(before, NOW) == Decimal(70)


def test_effective_balance_is_exact_for_38_digit_grants() -> None:
    big = "12345678901234567890.123456789012345678"
    before = account("37037036703703703670.370370367037037034", *(grant(str(i), big, NOW - DAY) for i in range(3)))
    assert credits.effective_balance(before, NOW) == Decimal(0)
    expired, entries = credits.expire(before, NOW)
    assert expired.balance == Decimal(0)
    assert [e.amount for e in entries] == [Decimal(f"-{big}")] * 3


# --- credit / debit / consume ---------------------------------------------------------------------------------------


def test_credit_on_a_positive_balance_becomes_a_burnable_grant() -> None:
    after, entry = credits.credit(
        account("10", grant("old", "10", None)),
        Decimal(100),
        grant_id="new",
        expires_at=NOW + DAY,
        source="dodo-1",
        kind="dodo_credit_added",
    )
    assert after.balance == Decimal(110)
    assert after.grants == (grant("old", "10", None), Grant("new", Decimal(100), NOW + DAY, "dodo-1"))
    assert (entry.amount, entry.balance_after, entry.kind, entry.source) == (
        Decimal(100),
        Decimal(110),
        "dodo_credit_added",
        "dodo-1",
    )


def test_credit_pays_back_overage_first_and_grants_only_the_rest() -> None:
    after, entry = credits.credit(
        account("-30"), Decimal(100), grant_id="g", expires_at=None, source="s", kind="plan_grant"
    )
    assert (after.balance, entry.amount, entry.balance_after) == (Decimal(70), Decimal(100), Decimal(70))
    assert after.grants == (Grant("g", Decimal(70), None, "s"),)


def test_credit_smaller_than_the_overage_only_reduces_it() -> None:
    after, _ = credits.credit(account("-30"), Decimal(20), grant_id="g", expires_at=None, source="s", kind="k")
    assert (after.balance, after.grants) == (Decimal(-10), ())
    exact, _ = credits.credit(account("-30"), Decimal(30), grant_id="g", expires_at=None, source="s", kind="k")
    assert (exact.balance, exact.grants) == (Decimal(0), ())


def test_debit_burns_grants_and_may_go_below_zero() -> None:
    before = account("15", grant("soon", "5", NOW + DAY), grant("never", "10", None))
    after, entry = credits.debit(before, Decimal(8), source="dodo-2", kind="dodo_credit_deducted")
    assert (after.balance, after.grants) == (Decimal(7), (grant("never", "7", None),))
    assert (entry.amount, entry.balance_after) == (Decimal(-8), Decimal(7))
    deep, _ = credits.debit(before, Decimal(500), source="dodo-3", kind="dodo_credit_deducted")
    assert (deep.balance, deep.grants) == (Decimal(-485), ())


def test_consume_spends_from_the_balance_soonest_expiring_first() -> None:
    before = account("300", grant("never", "100", None), grant("late", "100", NOW + 9 * DAY), grant("soon", "100", NOW))
    after, balance = credits.consume(before, Decimal(150), Decimal(0))
    assert balance == after.balance == Decimal(150)
    assert {g.grant_id: g.remaining for g in after.grants} == {"late": Decimal(50), "never": Decimal(100)}


def test_consume_without_overage_allows_exactly_the_balance_and_nothing_more() -> None:
    before = account("10", grant("g", "10", None))
    after, balance = credits.consume(before, Decimal(10), Decimal(0))
    assert (balance, after.grants) == (Decimal(0), ())
    with pytest.raises(credits.Insufficient) as short:
        credits.consume(before, Decimal("10.000000000000000001"), Decimal(0))
    assert short.value.available == Decimal(10)


def test_consume_may_go_into_overage_down_to_minus_the_limit() -> None:
    before = account("50", grant("g", "50", None))
    after, balance = credits.consume(before, Decimal(150), Decimal(100))
    assert (balance, after.grants) == (Decimal(-100), ())
    with pytest.raises(credits.Insufficient) as short:
        credits.consume(after, Decimal("0.000000000000000001"), Decimal(100))
    assert short.value.available == Decimal(-100)
    with pytest.raises(credits.Insufficient):
        credits.consume(before, Decimal("150.000000000000000001"), Decimal(100))


# --- decimal_text / fingerprint -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal(1500), "1500"),
        (Decimal("1.500"), "1.5"),
        (Decimal("0E-18"), "0"),
        (Decimal("-0"), "0"),
        (Decimal("-3.0"), "-3"),
        (Decimal("1E+3"), "1000"),
        (Decimal("1E-18"), "0.000000000000000001"),
        (Decimal("-12345678901234567890.123456789012345678"), "-12345678901234567890.123456789012345678"),
    ],
)
def test_decimal_text_is_plain_notation_without_trailing_zeros(value: Decimal, text: str) -> None:
    assert decimals.decimal_text(value) == text


def test_fingerprint_is_the_same_for_the_same_parameters_in_another_spelling() -> None:
    one = credits.fingerprint("ai_tokens", Decimal("1.50"), "chat", {"a": "1", "b": "2"})
    assert one == credits.fingerprint("ai_tokens", Decimal("1.5"), "chat", {"b": "2", "a": "1"})


@pytest.mark.parametrize(
    ("credit", "amount", "description", "metadata"),
    [
        ("api_calls", "1.5", "chat", {"a": "1"}),
        ("ai_tokens", "1.51", "chat", {"a": "1"}),
        ("ai_tokens", "1.5", "other", {"a": "1"}),
        ("ai_tokens", "1.5", "chat", {"a": "2"}),
        ("ai_tokens", "1.5", "chat", {"b": "1"}),
        ("ai_tokens", "1.5", "chat", {}),
    ],
)
def test_fingerprint_differs_when_any_parameter_differs(
    credit: str, amount: str, description: str, metadata: dict[str, str]
) -> None:
    base = credits.fingerprint("ai_tokens", Decimal("1.5"), "chat", {"a": "1"})
    assert credits.fingerprint(credit, Decimal(amount), description, metadata) != base


def test_fingerprint_tells_apart_38_digit_amounts_that_differ_in_the_last_digit() -> None:
    one = credits.fingerprint("ai_tokens", Decimal("12345678901234567890.123456789012345678"), "", {})
    other = credits.fingerprint("ai_tokens", Decimal("12345678901234567890.123456789012345679"), "", {})
    assert one != other


# --- overage limit, plan grants, which credits a subscription carries ---------------------------------------------


def test_overage_limit_of_a_plan_credit_is_the_catalogs() -> None:
    catalog = catalog_with_plan()
    cart = (CartCredit(LINKED, True, Decimal(900)),)
    assert credits.overage_limit(catalog.credits["ai_tokens"], [sub(cart=cart)], catalog, NOW) == Decimal(0)


@pytest.mark.parametrize(
    ("cart", "limit"),
    [
        ((), "100"),
        ((CartCredit(LINKED, True, Decimal(500)),), "500"),
        ((CartCredit(LINKED, False, Decimal(500)),), "100"),
        ((CartCredit(LINKED, True, None),), "100"),
        ((CartCredit(LINKED, True, Decimal(20)),), "100"),
        ((CartCredit("cent_other", True, Decimal(500)),), "100"),
    ],
)
def test_overage_limit_of_a_dodo_credit_is_raised_by_an_enabled_cart_limit(
    cart: tuple[CartCredit, ...], limit: str
) -> None:
    definition = CreditDef("api_calls", LINKED, Decimal(100))
    assert credits.overage_limit(definition, [sub(cart=cart)], catalog_with_plan(), NOW) == Decimal(limit)


def test_overage_limit_ignores_the_cart_of_a_subscription_that_no_longer_grants_access() -> None:
    definition = CreditDef("api_calls", LINKED, Decimal(100))
    cancelled = replace(sub(cart=(CartCredit(LINKED, True, Decimal(500)),)), status="cancelled")
    assert credits.overage_limit(definition, [cancelled], catalog_with_plan(), NOW) == Decimal(100)


def test_plan_grants_give_the_plan_credits_for_the_period_expiring_at_its_end_unless_rollover() -> None:
    state = sub()
    grants = credits.plan_grants(state, catalog_with_plan(), trialing=False)
    assert grants == [
        credits.PlanGrant("ai_tokens", Decimal(10000), NOW - DAY, NOW + 29 * DAY),
        credits.PlanGrant("bonus", Decimal(50), NOW - DAY, None),
    ]


def test_plan_grants_give_trial_credits_while_trialing() -> None:
    grants = credits.plan_grants(sub(), catalog_with_plan(), trialing=True)
    assert grants == [credits.PlanGrant("ai_tokens", Decimal(1000), NOW - DAY, NOW + 29 * DAY)]


def test_plan_grants_period_starts_at_creation_without_a_previous_billing_date() -> None:
    state = sub(previous=None)
    assert {g.period_start for g in credits.plan_grants(state, catalog_with_plan(), trialing=False)} == {
        state.created_at
    }


def test_plan_grants_of_an_unknown_product_or_a_plan_without_credits_are_empty() -> None:
    assert credits.plan_grants(sub("pdt_unknown"), catalog_with_plan(), trialing=False) == []
    assert credits.plan_grants(sub("pdt_starter"), catalog_with_plan(), trialing=False) == []


def test_credits_of_a_subscription_are_its_plans_and_the_dodo_credits_in_its_cart() -> None:
    catalog = catalog_with_plan()
    cart = (CartCredit(LINKED, False, None), CartCredit("cent_not_mirrored", False, None))
    assert credits.credits_of(sub(), catalog) == ["ai_tokens", "bonus", "unused"]
    assert credits.credits_of(sub("pdt_starter", cart=cart), catalog) == ["api_calls"]
    assert credits.credits_of(sub("pdt_unknown"), catalog) == []


# --- the account invariant under any sequence of operations ------------------------------------------------------

AMOUNTS = st.decimals(min_value=Decimal("0.01"), max_value=Decimal(500), places=2)
OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["grant", "debit", "consume", "expire"]),
        AMOUNTS,
        st.one_of(st.none(), st.integers(min_value=-3, max_value=5)),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(operations=OPERATIONS, limit=st.sampled_from([Decimal(0), Decimal(100)]))
def test_balance_is_the_sum_of_entries_and_grants_add_up_to_the_positive_balance(
    operations: list[tuple[str, Decimal, int | None]], limit: Decimal
) -> None:
    state = Account(CUSTOMER, "ai_tokens")
    total = Decimal(0)
    clock = NOW
    for step, (operation, amount, days) in enumerate(operations):
        clock += timedelta(hours=12)
        entries: list[LedgerEntry] = []
        if operation == "grant":
            expires_at = None if days is None else clock + days * DAY
            state, entry = credits.credit(
                state, amount, grant_id=f"g{step}", expires_at=expires_at, source="s", kind="k"
            )
            entries.append(entry)
        elif operation == "debit":
            state, entry = credits.debit(state, amount, source="s", kind="k")
            entries.append(entry)
        elif operation == "consume":
            state, expired = credits.expire(state, clock)
            entries.extend(expired)
            if state.balance - amount < -limit:
                with pytest.raises(credits.Insufficient):
                    credits.consume(state, amount, limit)
            else:
                state, _ = credits.consume(state, amount, limit)
                entries.append(LedgerEntry("e", CUSTOMER, "ai_tokens", -amount, state.balance, "k", "s"))
        else:
            state, expired = credits.expire(state, clock)
            entries.extend(expired)
        total = decimals.MATH.add(total, sum((e.amount for e in entries), Decimal(0)))
        assert state.balance == total
        assert sum((g.remaining for g in state.grants), Decimal(0)) == max(state.balance, Decimal(0))
        assert all(g.remaining > 0 for g in state.grants)
