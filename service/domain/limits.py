"""Input limits of DESIGN §12, for every RPC field and every webhook field we store: pure checks that raise
`InvalidField` (INVALID_ARGUMENT with ErrorInfo FIELD_INVALID and the field's name) or, for webhooks, whatever
error the caller maps them to. Messages quote at most 64 characters of what the caller sent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from service.domain.errors import QUOTE_LIMIT, InvalidField, quote

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_DESCRIPTION",
    "MAX_ID",
    "MAX_METADATA_KEY",
    "MAX_METADATA_PAIRS",
    "MAX_METADATA_VALUE",
    "MAX_PAGE_SIZE",
    "QUOTE_LIMIT",
    "check_id",
    "check_metadata",
    "check_text",
    "page_size",
    "quote",
]

MAX_ID = 255
MAX_DESCRIPTION = 1_000
MAX_METADATA_PAIRS = 50
MAX_METADATA_KEY = 40
MAX_METADATA_VALUE = 500
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

# Ids: printable, so no C0/C1 control characters (NUL included), no line or paragraph separators.
_NOT_ID = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Free text: tab and newline are allowed, every other control character is not.
_NOT_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Lone surrogates cannot be encoded as UTF-8 (a Python str may carry them, Postgres and protobuf cannot).
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def check_id(field: str, value: str, *, required: bool = True) -> str:
    """An id, key or event id: 1–255 characters of printable UTF-8. Empty is refused when `required`."""
    if not value:
        if required:
            raise InvalidField(field, f"{field} is required")
        return value
    if len(value) > MAX_ID:
        raise InvalidField(field, f"{field} is longer than {MAX_ID} characters ({len(value)})")
    if _NOT_ID.search(value) or _SURROGATE.search(value):
        raise InvalidField(field, f"{field} must be printable text without control characters")
    if value in (".", ".."):
        # Ids end up in Dodo's URL paths, where these are dot-segments (the SDK refuses to build such a path).
        raise InvalidField(field, f"{field} must not be {value!r}")
    return value


def check_text(field: str, value: str, *, max_length: int) -> str:
    """Free text: UTF-8 without NUL or control characters other than tab and newline, at most `max_length`."""
    if len(value) > max_length:
        raise InvalidField(field, f"{field} is longer than {max_length} characters ({len(value)})")
    if _NOT_TEXT.search(value) or _SURROGATE.search(value):
        raise InvalidField(field, f"{field} must not contain NUL or control characters other than tab and newline")
    return value


def check_metadata(field: str, pairs: Mapping[str, str]) -> dict[str, str]:
    """`metadata` / `properties`: at most 50 pairs, keys 1–40 characters, values at most 500, free-text rules."""
    if len(pairs) > MAX_METADATA_PAIRS:
        raise InvalidField(field, f"{field} has more than {MAX_METADATA_PAIRS} entries ({len(pairs)})")
    for key, value in pairs.items():
        if not key:
            raise InvalidField(field, f"{field} keys must not be empty")
        check_text(field, key, max_length=MAX_METADATA_KEY)
        check_text(field, value, max_length=MAX_METADATA_VALUE)
    return dict(pairs)


def page_size(value: int) -> int:
    """0 means the default (50); 1–500 as asked; anything else is refused, not silently capped."""
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if not 0 < value <= MAX_PAGE_SIZE:
        raise InvalidField("page_size", f"page_size must be between 0 and {MAX_PAGE_SIZE}, got {value}")
    return value
