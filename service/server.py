"""Assembly and lifecycle: gRPC and the webhook HTTP app in one process and one event loop."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.catalog import Catalog, load_catalog
from service.clock import Clock, utc_now
from service.consumption import CreditService
from service.entitlements import EntitlementReader
from service.interceptors import AuthInterceptor, ErrorInterceptor
from service.servicer import EntitlementServicer
from service.settings import Settings
from storage.engine import Database
from webhooks.app import Lifecycle, create_app
from webhooks.verify import SignatureVerifier

log = logging.getLogger("entitlements.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EntitlementService"].full_name


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class Running:
    grpc_server: grpc.aio.Server
    grpc_port: int
    http_runner: web.AppRunner
    http_port: int
    db: Database
    health: health.aio.HealthServicer
    lifecycle: Lifecycle
    catalog: Catalog
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def stop(self, grace: float) -> None:
        """Health NOT_SERVING first, then let in-flight calls drain for up to `grace` seconds."""
        self.lifecycle.draining = True
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace)
        await self.http_runner.cleanup()
        await self.db.close()
        self.stopped.set()


async def start(
    settings: Settings,
    *,
    clock: Clock = utc_now,
    catalog: Catalog | None = None,
    db: Database | None = None,
) -> Running:
    catalog = catalog or load_catalog(settings.catalog_path)
    verifier = SignatureVerifier(settings.webhook_keys)
    db = db or Database.from_url(settings.require_database(), pool_size=settings.db_pool_size)
    reader = EntitlementReader(db, catalog, clock)

    server = grpc.aio.server(
        interceptors=[AuthInterceptor(settings.api_tokens), ErrorInterceptor()],
        options=[("grpc.so_reuseport", 0)],
    )
    credit_service = CreditService(db, catalog, clock)
    pb_grpc.add_EntitlementServiceServicer_to_server(EntitlementServicer(reader, credit_service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    grpc_port = server.add_insecure_port(settings.grpc_addr)
    if grpc_port == 0:
        raise SystemExit(f"cannot listen for gRPC on {settings.grpc_addr}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    lifecycle = Lifecycle()
    runner = web.AppRunner(create_app(db=db, catalog=catalog, verifier=verifier, lifecycle=lifecycle), access_log=None)
    await runner.setup()
    host, port = split_addr(settings.http_addr)
    site = web.TCPSite(runner, host, port)
    await site.start()
    http_port = runner.addresses[0][1]
    log.info("server.started", extra={"grpc_port": grpc_port, "http_port": http_port})
    return Running(server, grpc_port, runner, http_port, db, health_servicer, lifecycle, catalog)


async def serve(settings: Settings) -> None:
    running = await start(settings)
    print(
        f"entitlements: gRPC on {settings.grpc_addr.rsplit(':', 1)[0]}:{running.grpc_port}, "
        f"HTTP on {settings.http_addr.rsplit(':', 1)[0]}:{running.http_port}",
        flush=True,
    )
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await stop_requested.wait()
    log.info("server.draining")
    await running.stop(settings.shutdown_grace_seconds)
    log.info("server.stopped")
