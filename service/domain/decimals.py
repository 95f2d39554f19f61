"""Exact decimal arithmetic and the one grammar for decimal text, from callers and from Dodo alike.

Credit amounts have up to 20 integer and 18 fractional digits; sums of many stay exact with 100 digits of
precision (the default context's 28 digits would round silently).
"""

from __future__ import annotations

import re
from decimal import Context, Decimal

from service.domain.errors import InvalidAmount

MATH = Context(prec=100)
ZERO = Decimal(0)
# ASCII digits only: \d would also match other scripts' digits, which Decimal() silently reads.
AMOUNT_GRAMMAR = re.compile(r"^([0-9]{1,20})(?:\.([0-9]{1,18}))?$")


def decimal_text(value: Decimal) -> str:
    """Plain notation, no exponent, no trailing zeros after the point: "1500", "0.25", "-3"."""
    return format(value.normalize(MATH), "f") if value != 0 else "0"


def parse_amount(text: str, field: str = "amount") -> Decimal:
    """A positive decimal in plain notation: "25", "0.25". Refuses "0", "-5", "1e3", "NaN", " 5"."""
    if not AMOUNT_GRAMMAR.fullmatch(text or ""):
        raise InvalidAmount(
            field,
            f"{field} must be a positive decimal string with at most 20 digits before the point and 18 after",
        )
    amount = Decimal(text)
    if amount <= 0:
        raise InvalidAmount(field, f"{field} must be greater than zero")
    return amount
