"""Typed failures: one exception class per gRPC status, each carrying the google.rpc.ErrorInfo the server attached.

    try:
        await client.consume_credits(customer, "ai_tokens", "25", idempotency_key=key)
    except InsufficientCredits as error:
        error.reason        # "INSUFFICIENT_CREDITS"
        error.metadata      # {"balance": "10"}
    except InvalidArgument as error:
        error.metadata.get("field")

The details travel in the `grpc-status-details-bin` trailer (a serialized google.rpc.Status), decoded here with
googleapis-common-protos only (no grpcio-status).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "CursorExpired",
    "DeadlineExceeded",
    "EntitlementsError",
    "FailedPrecondition",
    "InsufficientCredits",
    "Internal",
    "InvalidArgument",
    "InvalidCursor",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "SubscriberTooSlow",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
]

STATUS_DETAILS_TRAILER = "grpc-status-details-bin"

# Every standard detail type; an unknown one stays a google.protobuf.Any.
_DETAIL_TYPES: dict[str, type[Message]] = {
    kind.DESCRIPTOR.full_name: kind
    for kind in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.RetryInfo,
        error_details_pb2.DebugInfo,
        error_details_pb2.QuotaFailure,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.BadRequest,
        error_details_pb2.RequestInfo,
        error_details_pb2.ResourceInfo,
        error_details_pb2.Help,
        error_details_pb2.LocalizedMessage,
    )
}


class EntitlementsError(Exception):
    """A call that ended with a status other than OK.

    `code` is the gRPC status, `message` its text; `reason`, `domain` and `metadata` come from the ErrorInfo
    detail ("" and {} when there is none); `details` holds every decoded detail message.
    """

    status_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        details: Iterable[Message] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: Mapping[str, str] = MappingProxyType(dict(metadata or {}))
        self.details: tuple[Message, ...] = tuple(details)

    def __str__(self) -> str:
        """One line: `NOT_FOUND: subscription 'x' not found (reason=..., field=...)`."""
        text = " ".join(f"{self.code.name}: {self.message}".split())
        facts = [f"reason={self.reason}"] if self.reason else []
        facts += [f"{key}={value}" for key, value in sorted(self.metadata.items())]
        return f"{text} ({', '.join(' '.join(fact.split()) for fact in facts)})" if facts else text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r}, reason={self.reason!r})"


class Cancelled(EntitlementsError):
    status_code = grpc.StatusCode.CANCELLED


class InvalidArgument(EntitlementsError):
    """A field is empty, malformed or over its limit (reason FIELD_INVALID, metadata `field`), or an unknown key."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT

    @property
    def field(self) -> str | None:
        return self.metadata.get("field")


class InvalidCursor(InvalidArgument):
    """WatchEntitlements: `after_cursor` is not a cursor this service issued (reason FIELD_INVALID, field
    after_cursor). Never retried: start again without a cursor (from now) and re-read what you need."""


class DeadlineExceeded(EntitlementsError):
    status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(EntitlementsError):
    status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(EntitlementsError):
    status_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(EntitlementsError):
    """No access to the credit (reason: the AccessReason), or the caller lacks a scope (CALLER_SCOPE_MISSING)."""

    status_code = grpc.StatusCode.PERMISSION_DENIED


class InsufficientCredits(EntitlementsError):
    """RESOURCE_EXHAUSTED: not enough credits (reason INSUFFICIENT_CREDITS, metadata `balance`)."""

    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    @property
    def balance(self) -> Decimal | None:
        try:
            return Decimal(self.metadata["balance"])
        except (KeyError, InvalidOperation):
            return None


ResourceExhausted = InsufficientCredits


class SubscriberTooSlow(InsufficientCredits):
    """WatchEntitlements ended because this subscriber fell too far behind (reason WATCH_SUBSCRIBER_TOO_SLOW);
    metadata `cursor` is where to resume, and `watch()` does so by itself. A RESOURCE_EXHAUSTED like
    InsufficientCredits (which `ResourceExhausted` names), so `except ResourceExhausted` still catches it."""

    @property
    def cursor(self) -> str:
        return self.metadata.get("cursor", "")


class FailedPrecondition(EntitlementsError):
    """Not possible in the current state, or an idempotency key reused with other parameters."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


class CursorExpired(FailedPrecondition):
    """WatchEntitlements: `after_cursor` is older than the service keeps events (reason CURSOR_EXPIRED). Never
    retried: what happened since cannot be replayed, so re-read the state you keep and watch from now."""


class Aborted(EntitlementsError):
    status_code = grpc.StatusCode.ABORTED


class Unimplemented(EntitlementsError):
    """The server does not know the method (it is older than this client)."""

    status_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(EntitlementsError):
    status_code = grpc.StatusCode.INTERNAL


class Unavailable(EntitlementsError):
    """The server, Postgres or Dodo could not be reached, or a queue was full: safe to retry."""

    status_code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(EntitlementsError):
    """No or an unknown bearer token."""

    status_code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[EntitlementsError]] = {
    kind.status_code: kind
    for kind in (
        Cancelled,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        InsufficientCredits,
        FailedPrecondition,
        Aborted,
        Unimplemented,
        Internal,
        Unavailable,
        Unauthenticated,
    )
}


# Failures a caller handles differently from others of the same status: (status class, ErrorInfo reason) -> class.
_BY_REASON: dict[tuple[type[EntitlementsError], str], type[EntitlementsError]] = {
    (FailedPrecondition, "CURSOR_EXPIRED"): CursorExpired,
    (InsufficientCredits, "WATCH_SUBSCRIBER_TOO_SLOW"): SubscriberTooSlow,
}


def _refined(kind: type[EntitlementsError], info: error_details_pb2.ErrorInfo) -> type[EntitlementsError]:
    if kind is InvalidArgument and info.metadata.get("field") == "after_cursor":
        return InvalidCursor
    return _BY_REASON.get((kind, info.reason), kind)


def _decode_details(trailers: Any) -> list[Message]:
    for key, value in trailers or ():
        if key != STATUS_DETAILS_TRAILER or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return []
        decoded: list[Message] = []
        for packed in status.details:
            kind = _DETAIL_TYPES.get(packed.TypeName())
            if kind is None:
                kept = any_pb2.Any()
                kept.CopyFrom(packed)
                decoded.append(kept)
                continue
            detail = kind()
            if packed.Unpack(detail):
                decoded.append(detail)
        return decoded
    return []


def from_rpc_error(error: grpc.RpcError) -> EntitlementsError:
    """The typed exception for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    try:
        code = error.code()
        message = error.details() or ""
        trailers = error.trailing_metadata()
    except AttributeError:  # a bare RpcError carries no status
        code, message, trailers = grpc.StatusCode.UNKNOWN, str(error), ()
    details = _decode_details(trailers)
    info = next((detail for detail in details if isinstance(detail, error_details_pb2.ErrorInfo)), None)
    kind = _BY_CODE.get(code, EntitlementsError)
    if info is not None:
        kind = _refined(kind, info)
    return kind(
        code,
        message,
        reason=info.reason if info else "",
        domain=info.domain if info else "",
        metadata=dict(info.metadata) if info else None,
        details=details,
    )
