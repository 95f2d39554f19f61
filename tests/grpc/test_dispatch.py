"""The production server serves auth, error mapping and RPC metrics from one generic handler (the dispatcher), not
grpc interceptors: with tracing off it has no interceptors on the hot path, nothing registered past the dispatcher,
and the dispatcher's per-call lookup is synchronous and hands out handlers built once per method."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.app.metrics import Metrics
from service.domain.catalog import Catalog
from service.grpc import reflection
from service.grpc.dispatch import Dispatcher
from service.grpc.interceptors import CallerGate, current_caller, parse_callers
from service.server import start
from storage.engine import Database
from tests.support import API_TOKEN, FakeClock, make_settings

CHECK_ACCESS = "/entitlements.v1.EntitlementService/CheckAccess"
CHANGE_PLAN = "/entitlements.v1.EntitlementService/ChangePlan"
WATCH = "/entitlements.v1.EntitlementService/WatchEntitlements"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
REFLECTION_V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


Metadata = tuple[tuple[str, str | bytes], ...]


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str, invocation_metadata: Metadata = ()) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


def _bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


class _Servicer(pb_grpc.EntitlementServiceServicer):
    async def CheckAccess(self, request: pb.CheckAccessRequest, context: Any) -> pb.CheckAccessResponse:
        return pb.CheckAccessResponse(allowed=current_caller() == "dashboard")


def _dispatcher(callers: str = "dashboard:tok-d:check,shop:tok-s:billing") -> Dispatcher:
    dispatcher = Dispatcher(CallerGate(parse_callers(callers)) if callers else None, Metrics())
    registrar = dispatcher.registrar()
    pb_grpc.add_EntitlementServiceServicer_to_server(_Servicer(), registrar)  # type: ignore[abstract]
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), registrar)
    reflection.enable(registrar, ("entitlements.v1.EntitlementService",))
    return dispatcher


def test_the_lookup_is_synchronous_and_hands_out_the_handlers_built_at_registration() -> None:
    dispatcher = _dispatcher()

    authorized = dispatcher.service(_Details(CHECK_ACCESS, _bearer("tok-d")))
    denied = dispatcher.service(_Details(CHECK_ACCESS, _bearer("tok-s")))
    anonymous = dispatcher.service(_Details(CHECK_ACCESS))

    assert not inspect.iscoroutinefunction(dispatcher.service)
    assert authorized is not None
    assert denied is not None
    assert anonymous is not None
    assert len({id(authorized), id(denied), id(anonymous)}) == 3
    assert dispatcher.service(_Details(CHECK_ACCESS, _bearer("tok-d"))) is authorized
    assert dispatcher.service(_Details(CHECK_ACCESS, _bearer("tok-s"))) is denied
    assert dispatcher.service(_Details(CHECK_ACCESS, _bearer("tok-x"))) is anonymous
    # Health is open and the same handler for everyone; the v1 reflection name (a generic handler only) is gated.
    assert dispatcher.service(_Details(HEALTH_CHECK)) is dispatcher.service(_Details(HEALTH_CHECK, _bearer("tok-d")))
    assert dispatcher.service(_Details(REFLECTION_V1)) is not dispatcher.service(
        _Details(REFLECTION_V1, _bearer("tok-s"))
    )
    assert dispatcher.service(_Details("/entitlements.v1.EntitlementService/Nope")) is None
    assert dispatcher.service(_Details("/no.Such/Method")) is None


def test_server_streams_are_authenticated_but_not_wrapped_and_unary_methods_are_guarded() -> None:
    dispatcher = _dispatcher()

    watch = dispatcher.service(_Details(WATCH, _bearer("tok-d")))
    check = dispatcher.service(_Details(CHECK_ACCESS, _bearer("tok-d")))

    assert watch is not None
    assert watch.unary_stream is not None
    # The servicer's own method: no wrapper (the stream maps its own errors, service/grpc/watch_stream.py).
    assert getattr(watch.unary_stream, "__self__", None).__class__ is _Servicer
    assert watch.unary_stream.__name__ == "WatchEntitlements"
    assert dispatcher.service(_Details(WATCH, _bearer("tok-s"))) is not watch  # no `check` scope: refused
    assert check is not None
    assert check.unary_unary is not None
    assert check.unary_unary.__name__ == "guarded"


def test_without_callers_every_method_is_open_and_still_guarded() -> None:
    dispatcher = _dispatcher(callers="")

    handler = dispatcher.service(_Details(CHANGE_PLAN))

    assert handler is not None
    assert handler.unary_unary is not None
    assert handler.unary_unary.__name__ == "guarded"
    assert dispatcher.service(_Details(REFLECTION_V1ALPHA)) is not None


@dataclass
class _Spy:
    """What start() asks of grpc.aio: the interceptors it creates the server with, what it registers."""

    interceptors: list[Any] = field(default_factory=list)
    generic: list[grpc.GenericRpcHandler] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> _Spy:
    seen = _Spy()
    create = grpc.aio.server

    def server(*args: Any, **kwargs: Any) -> grpc.aio.Server:
        seen.interceptors = list(kwargs.get("interceptors") or ())
        created = create(*args, **kwargs)
        add_generic, add_registered = created.add_generic_rpc_handlers, created.add_registered_method_handlers

        def generic(handlers: Iterable[grpc.GenericRpcHandler]) -> None:
            seen.generic.extend(handlers)
            add_generic(handlers)

        def registered(name: str, handlers: Mapping[str, Any]) -> None:
            seen.registered.append(name)
            add_registered(name, handlers)

        monkeypatch.setattr(created, "add_generic_rpc_handlers", generic)
        monkeypatch.setattr(created, "add_registered_method_handlers", registered)
        return created

    monkeypatch.setattr(grpc.aio, "server", server)
    return seen


@pytest.fixture
async def production(
    spy: _Spy, database_url: str, db: Database, clock: FakeClock, catalog: Catalog
) -> AsyncIterator[int]:
    running = await start(make_settings(database_url), clock=clock, catalog=catalog, db=Database.from_url(database_url))
    try:
        yield running.grpc_port
    finally:
        await running.stop(0)


async def test_with_tracing_off_the_server_has_no_interceptors_and_only_the_dispatcher_serves(
    spy: _Spy, production: int
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{production}") as channel:
        stub = pb_grpc.EntitlementServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await stub.ListPlans(pb.ListPlansRequest())
        plans = await stub.ListPlans(pb.ListPlansRequest(), metadata=_bearer(API_TOKEN))
        check = channel.unary_unary(
            HEALTH_CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        reflect = channel.stream_stream(
            REFLECTION_V1,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        healthy = await check(health_pb2.HealthCheckRequest())
        listing = [reflection_pb2.ServerReflectionRequest(list_services="")]
        (listed,) = [response async for response in reflect(iter(listing), metadata=_bearer(API_TOKEN))]
        with pytest.raises(grpc.aio.AioRpcError) as unreflected:
            _ = [response async for response in reflect(iter(listing))]

    assert spy.interceptors == []
    assert spy.registered == []  # registered handlers would be looked up before the dispatcher, past the auth
    assert len(spy.generic) == 1
    assert isinstance(spy.generic[0], Dispatcher)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert plans.plans
    assert healthy.status == health_pb2.HealthCheckResponse.SERVING
    assert "entitlements.v1.EntitlementService" in {service.name for service in listed.list_services_response.service}
    assert unreflected.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_with_tracing_on_only_the_tracing_interceptor_remains(
    spy: _Spy, database_url: str, db: Database, clock: FakeClock, catalog: Catalog
) -> None:
    running = await start(
        make_settings(database_url),
        clock=clock,
        catalog=catalog,
        db=Database.from_url(database_url),
        span_exporter=InMemorySpanExporter(),
    )
    await running.stop(0)

    assert len(spy.interceptors) == 1
    assert type(spy.interceptors[0]).__module__.startswith("opentelemetry.")
    assert spy.registered == []
    assert len(spy.generic) == 1
