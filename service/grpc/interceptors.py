"""Cross-cutting gRPC concerns: bearer-token auth, and mapping domain/infra errors to status codes once."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.domain.errors import DomainError, StorageUnavailable
from storage.errors import is_database_unavailable

log = logging.getLogger("entitlements.grpc")

ERROR_DOMAIN = "entitlements.v1"
_PUBLIC_PREFIXES = ("/grpc.health.v1.Health/",)

Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]]"


def _same_kind(
    handler: grpc.RpcMethodHandler[Any, Any], behaviour: Callable[..., Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same streaming kind as `handler` whose body is `behaviour`."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(behaviour, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(behaviour, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(behaviour, **kwargs)
    return grpc.stream_stream_rpc_method_handler(behaviour, **kwargs)


_UNAUTHENTICATED = "missing or invalid bearer token"


async def _deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)


async def _deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
    # A streaming handler must be an async generator, or grpc.aio races its abort against the first write.
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
    yield  # type: ignore[unreachable]  # abort raises; the yield only makes this a generator


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Accepts `authorization: Bearer <token>` for one of ENTITLEMENTS_API_TOKENS; health checks stay open."""

    def __init__(self, tokens: frozenset[str]) -> None:
        self._tokens = tuple(token.encode() for token in tokens)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or not self._tokens or handler_call_details.method.startswith(_PUBLIC_PREFIXES):
            return handler
        if self._authorized(handler_call_details.invocation_metadata or ()):
            return handler

        if handler.unary_stream is not None or handler.stream_stream is not None:
            return _same_kind(handler, _deny_stream)
        return _same_kind(handler, _deny)

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata:
            if key != "authorization" or not isinstance(value, str):
                continue
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return False
            presented = token.strip().encode()
            # Compare against every token so timing does not reveal which prefix matched.
            return any([hmac.compare_digest(presented, known) for known in self._tokens])  # noqa: C419
        return False


def status_for(error: DomainError) -> grpc.Status:
    details = []
    if error.reason:
        info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
        packed = any_pb2.Any()
        packed.Pack(info)
        details.append(packed)
    status = status_pb2.Status(code=error.grpc_code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Domain errors become their status (with ErrorInfo); Postgres outages become UNAVAILABLE; the rest INTERNAL."""

    def __init__(self) -> None:
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        # Handlers are fixed per method: wrap each once, not on every call of the hot path.
        guarded = self._guarded.get(handler_call_details.method)
        if guarded is None or guarded[0] is not handler:
            guarded = (handler, self._guard(handler, handler_call_details.method))
            self._guarded[handler_call_details.method] = guarded
        return guarded[1]

    def _guard(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        inner = cast(Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]], handler.unary_unary)

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await inner(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except DomainError as error:
                status = status_for(error)
                await context.abort(status.code, status.details, status.trailing_metadata)
            except Exception as error:
                if is_database_unavailable(error):
                    log.warning("grpc.unavailable", extra={"method": method, "why": type(error).__name__})
                    status = status_for(StorageUnavailable())
                    await context.abort(status.code, status.details, status.trailing_metadata)
                log.exception("grpc.failed", extra={"method": method})
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")

        return _same_kind(handler, guarded)


assert code_pb2.OK == 0  # google.rpc codes equal grpc's numeric codes
