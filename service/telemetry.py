"""OpenTelemetry traces (DESIGN §14): off unless OTEL_EXPORTER_OTLP_ENDPOINT is set (or a test hands in an
exporter). When on, every gRPC call, every HTTP request (webhooks, probes, metrics) and every asyncpg statement
becomes a span, exported over OTLP/gRPC in batches."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from opentelemetry import propagate
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from service.settings import Settings


@dataclass
class Tracing:
    provider: TracerProvider
    _asyncpg: AsyncPGInstrumentor

    def grpc_interceptor(self) -> grpc.aio.ServerInterceptor:
        interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider
        )
        return interceptor

    def aiohttp_middleware(self) -> Any:
        """A server span per HTTP request, continuing a caller's trace (W3C traceparent). Ours rather than the
        aiohttp-server instrumentation's, whose middleware only works after it has patched aiohttp globally."""
        tracer = self.provider.get_tracer("entitlements.http")

        @web.middleware
        async def trace_request(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            route = request.match_info.route.resource
            path = route.canonical if route is not None else request.path
            with tracer.start_as_current_span(
                f"{request.method} {path}",
                context=propagate.extract(request.headers),
                kind=SpanKind.SERVER,
                attributes={"http.request.method": request.method, "url.path": request.path},
            ) as span:
                response = await handler(request)
                span.set_attribute("http.response.status_code", response.status)
                if response.status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                return response

        return trace_request

    def close(self) -> None:
        # asyncpg is instrumented by patching the driver process-wide: undo it, then flush what is buffered.
        self._asyncpg.uninstrument()
        self.provider.shutdown()


def start_tracing(settings: Settings, *, exporter: SpanExporter | None = None) -> Tracing | None:
    """Tracing for this process, or None when it is off. `exporter` (tests) replaces the OTLP one and is flushed
    span by span, so a test reads its spans right after the call that made them."""
    if exporter is None and not settings.otel_exporter_otlp_endpoint:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": settings.otel_service_name}))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otel_exporter_otlp_endpoint)))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    instrumentor.instrument(tracer_provider=provider)
    return Tracing(provider, instrumentor)
