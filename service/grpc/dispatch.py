"""The server's one generic handler: auth (`CallerGate`), error mapping and RPC metrics (`guard`) composed once per
method at registration, so a call costs grpc.aio one synchronous lookup.

grpc.aio with any server interceptor awaits a chain of coroutines per call just to find the method's handler
(tests/bench/results-issue14.md: ~10-30 µs a call); without interceptors it calls the generic handlers'
`service(handler_call_details)` directly. Our interceptors only ever picked one of a few handlers built once per
method, so the pick moves here: method -> route; the caller's token -> the handler built for that caller.

Servicers are registered through `registrar()`, which records what the generated `add_..._to_server` functions
hand it (their registered method handlers and their generic handlers) instead of giving it to the server: grpc.aio
looks registered method handlers up before the generic ones, so a handler registered on the server directly would
bypass the gate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

import grpc

from service.app.metrics import Metrics
from service.grpc.interceptors import CallerGate, guard, is_public

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


@dataclass(frozen=True, slots=True)
class _Route:
    """One method's handlers: `open` for every call (auth off, or health), else one per caller by its position in
    the gate, the unauthenticated one last."""

    open: Handler | None
    by_caller: tuple[Handler, ...]


class Dispatcher(grpc.GenericRpcHandler):
    """Serves every method registered through `registrar()`, each guarded (unary-unary methods: errors mapped,
    counted and timed) and, with a gate, authenticated: health open, reflection for any valid caller, every other
    method for callers with its scope (server streams such as WatchEntitlements included, unguarded as they map
    their own errors)."""

    def __init__(self, gate: CallerGate | None, metrics: Metrics | None) -> None:
        self._gate = gate
        self._metrics = metrics
        self._routes: dict[str, _Route] = {}
        self._generic: list[grpc.GenericRpcHandler] = []

    def registrar(self) -> grpc.aio.Server:
        """What to pass to `add_..._to_server` (and helpers that call them) in place of the server."""
        return _Registrar(self)

    def add(self, method: str, handler: Handler) -> None:
        """Serve `handler` as the full method name `method` (`/package.Service/Method`)."""
        self._routes[method] = self._route(method, handler)

    def add_generic(self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        """Serve the methods these generic handlers know and `add` was not given (each routed at its first call).
        The generated code registers each service both ways; its registered methods are routed already."""
        self._generic.extend(generic_rpc_handlers)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        route = self._routes.get(handler_call_details.method)
        if route is None:
            route = self._resolve(handler_call_details)
            if route is None:
                return None
        if route.open is not None:
            return route.open
        assert self._gate is not None  # only a gate builds per-caller routes
        return self._gate.select(route.by_caller, handler_call_details.invocation_metadata)

    def _route(self, method: str, handler: Handler) -> _Route:
        guarded = guard(handler, method, self._metrics)
        if self._gate is None or is_public(method):
            return _Route(guarded, ())
        return _Route(None, self._gate.handlers(method, guarded))

    def _resolve(self, handler_call_details: grpc.HandlerCallDetails) -> _Route | None:
        """A method only a recorded generic handler knows (one registered without its method map, e.g. reflection
        v1): routed at its first call, then like the others. Unknown methods are not remembered."""
        for generic in self._generic:
            handler = generic.service(handler_call_details)
            if handler is not None:
                self.add(handler_call_details.method, handler)
                return self._routes[handler_call_details.method]
        return None


class _Registrar(grpc.aio.Server):
    """Stands in for the server while servicers are added: what they register goes to the dispatcher. A
    `grpc.aio.Server` so that helpers choosing their asyncio servicer by type (grpc_reflection) still do."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    def add_registered_method_handlers(self, service_name: str, method_handlers: Mapping[str, Handler]) -> None:
        for name, handler in method_handlers.items():
            self._dispatcher.add(f"/{service_name}/{name}", handler)

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._dispatcher.add_generic(generic_rpc_handlers)

    def _not_a_server(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("this stands in for the server only to register servicers")

    add_insecure_port = add_secure_port = start = stop = wait_for_termination = _not_a_server
