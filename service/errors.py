"""Domain errors. Each names a condition and carries its gRPC and HTTP status; one interceptor and one aiohttp
middleware map them, so expected outcomes never surface as UNKNOWN, INTERNAL or 500."""

from __future__ import annotations

from collections.abc import Mapping

import grpc


class DomainError(Exception):
    grpc_code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION
    http_status: int = 409
    # google.rpc.ErrorInfo reason, for callers that must branch on the condition.
    reason: str = ""

    def __init__(self, message: str, *, reason: str = "", metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(DomainError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class MalformedPayload(InvalidArgument):
    """A signed webhook whose body is not what Dodo sends (not JSON, no type/data, unreadable snapshot)."""


class NotFound(DomainError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class FailedPrecondition(DomainError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409


class IdempotencyKeyReused(FailedPrecondition):
    reason = "IDEMPOTENCY_KEY_REUSED"


class InsufficientCredits(DomainError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 402
    reason = "INSUFFICIENT_CREDITS"


class PermissionDenied(DomainError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class Unavailable(DomainError):
    """A dependency (Postgres, Dodo) is unreachable: safe to retry."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class Internal(DomainError):
    """Our own misconfiguration (e.g. Dodo refusing our API key): generic to the caller, loud in the logs."""

    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500
