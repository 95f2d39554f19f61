"""What "the same parameters" means for an idempotency key: a hash of the request's canonical JSON."""

from __future__ import annotations

import hashlib

import orjson


def fingerprint(parameters: object) -> str:
    """SHA-256 of `parameters` as JSON with sorted keys (decimals must already be canonical text)."""
    return hashlib.sha256(orjson.dumps(parameters, option=orjson.OPT_SORT_KEYS)).hexdigest()
