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

from service.app.change_feed import ChangeFeed
from service.app.credit_service import CreditService
from service.app.dodo_gateway import DodoGateway
from service.app.entitlement_cache import EntitlementCache
from service.app.entitlement_reader import EntitlementReader
from service.app.plan_changer import PlanChanger
from service.app.reconciler import RateLimiter, reconcile_forever
from service.domain.catalog import Catalog, load_catalog
from service.domain.clock import Clock, utc_now
from service.grpc.interceptors import AuthInterceptor, ErrorInterceptor
from service.grpc.servicer import EntitlementServicer
from service.reconcile_cli import stale_policy
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
    cache: EntitlementCache
    changes: ChangeFeed
    dodo: DodoGateway
    health: health.aio.HealthServicer
    lifecycle: Lifecycle
    catalog: Catalog
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    background: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self, grace: float) -> None:
        """Health NOT_SERVING first, then let in-flight calls drain for up to `grace` seconds."""
        self.lifecycle.draining = True
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace)
        await self.http_runner.cleanup()
        await self.changes.stop()
        await self.cache.stop()
        await self.dodo.close()
        await self.db.close()
        self.stopped.set()


async def start(
    settings: Settings,
    *,
    clock: Clock = utc_now,
    catalog: Catalog | None = None,
    db: Database | None = None,
    dodo: DodoGateway | None = None,
) -> Running:
    catalog = catalog or load_catalog(settings.catalog_path)
    verifier = SignatureVerifier(settings.webhook_keys)
    db = db or Database.from_url(settings.require_database(), pool_size=settings.db_pool_size)
    cache = EntitlementCache(db, max_customers=settings.cache_max_customers)
    await cache.start()
    changes = ChangeFeed(db, cache)
    await changes.start()
    reader = EntitlementReader(db, catalog, clock, cache)

    server = grpc.aio.server(
        # Without tokens (development) the auth interceptor would only cost time on every call.
        interceptors=[*([AuthInterceptor(settings.api_tokens)] if settings.api_tokens else []), ErrorInterceptor()],
        options=[("grpc.so_reuseport", 0)],
    )
    credit_service = CreditService(db, catalog, clock, cache, changes, shards=settings.credit_writers)
    dodo = dodo or DodoGateway(
        settings.dodo_payments_api_key, settings.dodo_payments_base_url, settings.dodo_timeout_seconds
    )
    plans = PlanChanger(db, catalog, clock, dodo, reader, changes)
    pb_grpc.add_EntitlementServiceServicer_to_server(EntitlementServicer(reader, credit_service, plans), server)
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
    runner = web.AppRunner(
        create_app(db=db, catalog=catalog, verifier=verifier, lifecycle=lifecycle, on_change=changes.committed),
        access_log=None,
    )
    await runner.setup()
    host, port = split_addr(settings.http_addr)
    site = web.TCPSite(runner, host, port)
    await site.start()
    http_port = runner.addresses[0][1]
    log.info("server.started", extra={"grpc_port": grpc_port, "http_port": http_port})
    running = Running(
        server, grpc_port, runner, http_port, db, cache, changes, dodo, health_servicer, lifecycle, catalog
    )
    if settings.reconcile_interval_seconds > 0:
        loop = reconcile_forever(
            interval=settings.reconcile_interval_seconds,
            db=db,
            dodo=dodo,
            catalog=catalog,
            clock=clock,
            limiter=RateLimiter(settings.reconcile_rate_per_minute),
            policy=stale_policy(settings),
            on_change=changes.committed,
        )
        running.background.append(asyncio.create_task(loop, name="reconcile"))
    return running


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
