"""Cross-cutting gRPC concerns: callers and their scopes (bearer tokens, `CallerGate`), and mapping domain/infra
errors to status codes once (`guard`). service/grpc/dispatch.py composes them per method at registration (the
production path); `AuthInterceptor` and `ErrorInterceptor` are the same as server interceptors."""

from __future__ import annotations

import asyncio
import contextvars
import enum
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast

import grpc
from entitlements.v1 import entitlements_pb2 as pb
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.app.metrics import Metrics
from service.domain.errors import ConfigurationError, DomainError, PermissionDenied, StorageUnavailable
from storage.errors import is_database_unavailable

log = logging.getLogger("entitlements.grpc")

ERROR_DOMAIN = "entitlements.v1"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EntitlementService"].full_name
_PUBLIC_PREFIXES = ("/grpc.health.v1.Health/",)

Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]]"


def _same_kind(
    handler: grpc.RpcMethodHandler[Any, Any],
    behaviour: Callable[..., Any],
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same streaming kind as `handler` whose body is `behaviour` (and, if given, whose request
    deserializer is `request_deserializer`)."""
    kwargs = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(behaviour, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(behaviour, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(behaviour, **kwargs)
    return grpc.stream_stream_rpc_method_handler(behaviour, **kwargs)


_UNAUTHENTICATED_STATUS = rpc_status.to_status(
    status_pb2.Status(code=code_pb2.UNAUTHENTICATED, message="missing or invalid bearer token")
)


class Scope(enum.StrEnum):
    """What a caller may do (DESIGN §14). Every RPC needs exactly one."""

    CHECK = "check"  # read entitlements: CheckAccess, GetSubscription, ListCreditLedger
    CONSUME = "consume"  # spend credits: ConsumeCredits
    BILLING = "billing"  # move money: ChangePlan (and every method this map does not name: deny by default)


_METHOD_SCOPES = {
    "CheckAccess": Scope.CHECK,
    "GetSubscription": Scope.CHECK,
    "ListCreditLedger": Scope.CHECK,
    "ListPlans": Scope.CHECK,
    "GetUsage": Scope.CHECK,
    "WatchEntitlements": Scope.CHECK,
    "ConsumeCredits": Scope.CONSUME,
    "RecordUsage": Scope.CONSUME,
    "CreateCharge": Scope.BILLING,
    "GetCharge": Scope.BILLING,
    "ChangePlan": Scope.BILLING,
    "CreateCheckout": Scope.BILLING,
    "CreatePortalSession": Scope.BILLING,
    "CancelSubscription": Scope.BILLING,
    "ResumeSubscription": Scope.BILLING,
    "LinkCustomer": Scope.BILLING,
}
# Any valid caller may ask reflection what the API looks like; health is for load balancers, who carry no token.
_AUTHENTICATED_ONLY = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
_SCOPE_VALUES = frozenset(scope.value for scope in Scope)
_SCOPE_NAMES = ", ".join(sorted(_SCOPE_VALUES))
_CALLER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The name ENTITLEMENTS_API_TOKENS' callers share: one calling service rotating its token keeps its idempotency keys.
LEGACY_CALLER = "default"

_caller: contextvars.ContextVar[str] = contextvars.ContextVar("entitlements_caller", default="")


def current_caller() -> str:
    """The authenticated caller's name inside a handler; empty when auth is off (development)."""
    return _caller.get()


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    token: bytes = field(repr=False)
    scopes: frozenset[Scope]


def required_scope(method: str) -> Scope | None:
    """The scope a full method name (`/package.Service/Method`) needs; None: any valid caller will do."""
    if method.startswith(_AUTHENTICATED_ONLY):
        return None
    service, _, name = method.lstrip("/").partition("/")
    if service == SERVICE_NAME:
        return _METHOD_SCOPES.get(name, Scope.BILLING)
    return Scope.BILLING


def parse_callers(callers: str, api_tokens: Iterable[str] = ()) -> tuple[Caller, ...]:
    """ENTITLEMENTS_CALLERS (`name:token:scope+scope,…`) plus the old ENTITLEMENTS_API_TOKENS (every scope, all
    named `default`). Raises ConfigurationError on a malformed entry; messages never quote a token."""
    parsed = [_parse_caller(position, entry) for position, entry in _entries(callers)]
    names = [caller.name for caller in parsed]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        raise ConfigurationError(f"ENTITLEMENTS_CALLERS: caller name {repeated!r} is used twice")
    legacy = sorted(api_tokens)
    if legacy and LEGACY_CALLER in names:
        raise ConfigurationError(
            f"ENTITLEMENTS_CALLERS: the name {LEGACY_CALLER!r} is taken by the callers of ENTITLEMENTS_API_TOKENS"
        )
    # The old tokens share one name on purpose: a caller rotating its token keeps its idempotency keys.
    parsed.extend(Caller(LEGACY_CALLER, token.encode(), frozenset(Scope)) for token in legacy)
    owners: dict[bytes, str] = {}
    for caller in parsed:
        if caller.token in owners:
            owner = owners[caller.token]
            raise ConfigurationError(f"callers {owner!r} and {caller.name!r} have the same token: each needs its own")
        owners[caller.token] = caller.name
    return tuple(parsed)


def _entries(callers: str) -> Iterator[tuple[int, str]]:
    for position, entry in enumerate(callers.split(","), start=1):
        if entry.strip():
            yield position, entry.strip()


def _parse_caller(position: int, entry: str) -> Caller:
    where = f"ENTITLEMENTS_CALLERS entry {position}"
    # A token may contain ':' itself; a name and the scopes cannot.
    name, _, rest = entry.partition(":")
    token, _, scopes = rest.rpartition(":")
    if not name or not token or not scopes:
        raise ConfigurationError(f"{where}: expected name:token:scope+scope (scopes: {_SCOPE_NAMES})")
    if not _CALLER_NAME.fullmatch(name):
        raise ConfigurationError(f"{where}: caller name {name[:64]!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if any(character.isspace() for character in token):
        raise ConfigurationError(f"{where} ({name!r}): the token must not contain whitespace")
    wanted = scopes.split("+")
    unknown = next((scope for scope in wanted if scope not in _SCOPE_VALUES), None)
    if unknown is not None:
        raise ConfigurationError(f"{where} ({name!r}): unknown scope {unknown[:64]!r} (scopes: {_SCOPE_NAMES})")
    return Caller(name, token.encode(), frozenset(Scope(scope) for scope in wanted))


def _aborting(
    handler: grpc.RpcMethodHandler[Any, Any], status: grpc.Status, denied: dict[str, str] | None = None
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of `handler`'s kind that only answers `status` (logging `denied`, the facts of a refusal)."""

    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if denied is not None:
            log.warning("grpc.scope_missing", extra=denied)
        await context.abort(status.code, status.details, status.trailing_metadata)

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        # A streaming handler must be an async generator, or grpc.aio races its abort against the first write.
        if denied is not None:
            log.warning("grpc.scope_missing", extra=denied)
        await context.abort(status.code, status.details, status.trailing_metadata)
        yield  # type: ignore[unreachable]  # abort raises; the yield only makes this a generator

    if handler.unary_stream is not None or handler.stream_stream is not None:
        return _same_kind(handler, abort_stream)
    return _same_kind(handler, abort)


def _scope_missing(caller: str, method: str, scope: Scope) -> grpc.Status:
    name = method.rpartition("/")[2]
    return status_for(
        PermissionDenied(
            f"caller {caller!r} may not call {name}: it needs the {scope.value!r} scope",
            reason="CALLER_SCOPE_MISSING",
            metadata={"scope": scope.value},
        )
    )


def is_public(method: str) -> bool:
    """Whether a full method name is open to every call, token or not (health checks: load balancers carry none)."""
    return method.startswith(_PUBLIC_PREFIXES)


class CallerGate:
    """`authorization: Bearer <token>` names a caller; the caller needs the scope of the method it calls.

    A missing or unknown token is UNAUTHENTICATED; a known one without the scope is PERMISSION_DENIED with
    ErrorInfo CALLER_SCOPE_MISSING. Reflection takes any valid caller (health is never gated: `is_public`). Per
    method, `handlers` builds the handler to run for each caller once; per call, `select` does one metadata scan,
    one constant-time comparison per configured token, one tuple index and one context variable set.

    The caller's name is set by `select`, not by a wrapper around the handler: grpc.aio looks the handler up (the
    interceptors, then the generic handlers) and runs it in the same task (one per RPC, with its own copy of the
    context), so what is set there is what the handler reads, and it ends with the RPC. A wrapper would cost every
    call another coroutine.
    """

    def __init__(self, callers: Sequence[Caller]) -> None:
        self.callers = tuple(callers)
        self._tokens = tuple(caller.token for caller in self.callers)
        self._names = tuple(caller.name for caller in self.callers)

    @classmethod
    def configured(cls, callers: str, api_tokens: Iterable[str]) -> CallerGate | None:
        """The gate for these settings, or None: without callers (development) auth is off, and checking would only
        cost time on every call. Raises ConfigurationError on a malformed entry."""
        parsed = parse_callers(callers, api_tokens)
        if not parsed:
            return None
        log.info(
            "grpc.auth_enabled",
            extra={"callers": ",".join(sorted({caller.name for caller in parsed})), "tokens": len(parsed)},
        )
        return cls(parsed)

    def handlers(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> tuple[grpc.RpcMethodHandler[Any, Any], ...]:
        """The handler to run for each caller, by the caller's position, with the unauthenticated one last. A caller
        with the scope gets `handler` itself: nothing is wrapped around the calls that are let through."""
        scope = required_scope(method)
        named: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        by_caller = []
        for caller in self.callers:
            if caller.name not in named:
                named[caller.name] = (
                    handler
                    if scope is None or scope in caller.scopes
                    else _aborting(
                        handler,
                        _scope_missing(caller.name, method, scope),
                        {"caller": caller.name, "method": method, "scope": scope.value},
                    )
                )
            by_caller.append(named[caller.name])
        by_caller.append(_aborting(handler, _UNAUTHENTICATED_STATUS))
        return tuple(by_caller)

    def select(
        self, by_caller: tuple[grpc.RpcMethodHandler[Any, Any], ...], metadata: Any
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler of `by_caller` (from `handlers`) for the caller these metadata name; sets `current_caller()`."""
        index = self._caller_index(metadata or ())
        if index >= 0:
            _caller.set(self._names[index])
        # -1 (no valid token) picks the last handler: the unauthenticated one.
        return by_caller[index]

    def _caller_index(self, metadata: Any) -> int:
        """The position of the caller whose token the call presents; -1 for none."""
        for key, value in metadata:
            if key != "authorization" or not isinstance(value, str):
                continue
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return -1
            presented = token.strip().encode()
            found = -1
            # Compare against every token, never stopping at a match, so timing does not tell which one matched.
            for index, known in enumerate(self._tokens):
                if hmac.compare_digest(presented, known):
                    found = index
            return found
        return -1


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """The `CallerGate` as a server interceptor (the production server uses it as a generic handler instead,
    service/grpc/dispatch.py; this adapter serves the benches that measure the interceptor path)."""

    def __init__(self, callers: Sequence[Caller]) -> None:
        self._gate = CallerGate(callers)
        self._routes: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], tuple[grpc.RpcMethodHandler[Any, Any], ...]]
        ] = {}

    @classmethod
    def configured(cls, callers: str, api_tokens: Iterable[str]) -> tuple[AuthInterceptor, ...]:
        """The interceptor for these settings, or none at all (auth off: see `CallerGate.configured`)."""
        gate = CallerGate.configured(callers, api_tokens)
        return () if gate is None else (cls(gate.callers),)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_public(method):
            return handler
        route = self._routes.get(method)
        if route is None or route[0] is not handler:
            route = (handler, self._gate.handlers(method, handler))
            self._routes[method] = route
        return self._gate.select(route[1], handler_call_details.invocation_metadata)


def status_for(error: DomainError) -> grpc.Status:
    details = []
    if error.reason:
        info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
        packed = any_pb2.Any()
        packed.Pack(info)
        details.append(packed)
    status = status_pb2.Status(code=error.grpc_code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


def guard(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, metrics: Metrics | None
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with errors mapped and, with `metrics`, counted and timed by method and final code: domain errors
    become their status (with ErrorInfo); Postgres outages become UNAVAILABLE; undecodable request bytes
    INVALID_ARGUMENT; the rest INTERNAL. Counting and mapping share one wrapper, so the hot path pays for one.
    Only unary-unary handlers are guarded; streams (WatchEntitlements, reflection, health's Watch) come back as they
    are: their errors surface while they are iterated (service/grpc/watch_stream.py maps its own)."""
    if handler.unary_unary is None:
        return handler
    inner = cast(Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]], handler.unary_unary)
    name = method.rpartition("/")[2]
    # Bound once per method: a call that ends OK pays one perf_counter pair and a few integer increments.
    recorder = metrics.rpc.method(name) if metrics is not None else None
    clock = time.perf_counter

    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = clock()
        code = "INTERNAL"
        try:
            if request is _UNDECODABLE:
                code = "INVALID_ARGUMENT"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _UNDECODABLE_MESSAGE)
            response = await inner(request, context)
            code = "OK"
            return response
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except grpc.aio.AbortError:
            raise
        except DomainError as error:
            code = error.grpc_code.name
            status = status_for(error)
            await context.abort(status.code, status.details, status.trailing_metadata)
        except Exception as error:
            if is_database_unavailable(error):
                code = "UNAVAILABLE"
                log.warning("grpc.unavailable", extra={"method": method, "why": type(error).__name__})
                status = status_for(StorageUnavailable())
                await context.abort(status.code, status.details, status.trailing_metadata)
            log.exception("grpc.failed", extra={"method": method})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            if recorder is not None:
                (recorder.ok if code == "OK" else recorder.code(code)).observe(clock() - started)

    return _same_kind(handler, guarded, request_deserializer=_tolerant(handler.request_deserializer))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """`guard` as a server interceptor (the production server composes it at registration instead,
    service/grpc/dispatch.py; this adapter serves the benches that measure the interceptor path)."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        # Handlers are fixed per method: wrap each once, not on every call of the hot path.
        guarded = self._guarded.get(handler_call_details.method)
        if guarded is None or guarded[0] is not handler:
            guarded = (handler, guard(handler, handler_call_details.method, self._metrics))
            self._guarded[handler_call_details.method] = guarded
        return guarded[1]


class _Undecodable:
    """Stands in for a request whose bytes are not the method's message."""


_UNDECODABLE = _Undecodable()
_UNDECODABLE_MESSAGE = "the request could not be decoded as this method's message"


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's deserializer, answering a stand-in instead of raising: grpc.aio turns a deserializer's
    exception into UNKNOWN with the decoder's class name in the message; the guard answers INVALID_ARGUMENT."""
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return _UNDECODABLE

    return decode


assert code_pb2.OK == 0  # google.rpc codes equal grpc's numeric codes
