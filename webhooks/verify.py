"""Standard Webhooks signature verification over the raw body, with several keys during rotation."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from service.domain.errors import ConfigurationError


class InvalidSignature(Exception):
    """Missing or malformed headers, no matching signature, or a timestamp outside the ±5 minute tolerance."""


class SignatureVerifier:
    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ConfigurationError("DODO_PAYMENTS_WEBHOOK_KEY is empty: refusing to accept unsigned webhooks")
        try:
            for secret in secrets:
                _check_base64(secret)
            self._hooks = [Webhook(secret) for secret in secrets]
        except Exception as exc:  # the library raises bare errors for bad base64
            raise ConfigurationError("DODO_PAYMENTS_WEBHOOK_KEY is not a valid whsec_ secret") from exc

    def verify(self, body: bytes, headers: Mapping[str, str]) -> datetime:
        """Check the signature and the ±5 minute window; returns the signed time (`webhook-timestamp`), the one
        time of a delivery that the sender vouches for."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            # The library signs text; a body that is not UTF-8 cannot carry a valid signature from Dodo.
            raise InvalidSignature("body is not UTF-8") from None
        wanted = {k: headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature") if k in headers}
        if "webhook-signature" in wanted:
            # The library gives up at the first entry it cannot parse; one garbled entry must not hide a good one.
            entries = [e for e in wanted["webhook-signature"].split(" ") if _well_formed(e)]
            wanted["webhook-signature"] = " ".join(entries) or "v1,"
        for hook in self._hooks:
            try:
                hook.verify(text, wanted, json_parse=False)
            except WebhookVerificationError as exc:
                error = str(exc)
                if "timestamp" in error.lower() or "headers" in error.lower():
                    raise InvalidSignature(error) from None
                continue
            except (ValueError, TypeError):  # e.g. a signature entry without "v1," or bad base64
                continue
            # Parsed as the library parsed it to check the window: the header may carry a fraction and still verify.
            return datetime.fromtimestamp(float(wanted["webhook-timestamp"]), tz=UTC)
        raise InvalidSignature("no matching signature")


def _well_formed(entry: str) -> bool:
    version, _, signature = entry.partition(",")
    if not version or not signature:
        return False
    try:
        base64.b64decode(signature, validate=True)
    except binascii.Error:
        return False
    return True


def _check_base64(secret: str) -> None:
    """The library decodes leniently, silently dropping characters outside the alphabet: a mistyped or truncated key
    would then start fine and reject every delivery. Padding stays optional, as the library allows."""
    encoded = secret.removeprefix("whsec_")
    if not base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True):
        raise binascii.Error("empty secret")
