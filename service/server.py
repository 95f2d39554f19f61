"""Assembly and lifecycle: gRPC and the webhook HTTP app in one process and one event loop.

`start()` registers the way to stop each part right after that part started, on one exit stack: `stop()` (or a
failure half-way through `start()`) stops exactly what was started, in reverse order. Background loops all go
through one `BackgroundTasks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from datetime import timedelta

import grpc
from aiohttp import web
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export import SpanExporter

from service.app.background import BackgroundTasks
from service.app.change_feed import ChangeFeed
from service.app.charges import Charges
from service.app.checkouts import Checkouts
from service.app.credit_mirror import CreditMirror
from service.app.credit_service import CreditService
from service.app.customers import Customers
from service.app.dodo_gateway import DodoGateway
from service.app.entitlement_cache import EntitlementCache
from service.app.entitlement_reader import EntitlementReader
from service.app.metrics import CacheCollector, Metrics, PoolCollector, WatchCollector
from service.app.plan_changer import PlanChanger
from service.app.plan_listing import PlanListing
from service.app.portal_sessions import PortalSessions
from service.app.readiness import Readiness
from service.app.reconciler import RateLimiter, reconcile_forever
from service.app.subscription_lifecycle import SubscriptionLifecycle
from service.app.subscription_mutations import SubscriptionMutations
from service.app.usage import Usage
from service.app.usage_sender import UsageSender
from service.app.watch_hub import WatchHub
from service.app.watch_log import WatchLog
from service.app.webhook_ingest import WebhookIngest
from service.domain.catalog import Catalog, load_catalog
from service.domain.clock import Clock, utc_now
from service.domain.errors import ConfigurationError
from service.grpc import reflection
from service.grpc.dispatch import Dispatcher
from service.grpc.interceptors import CallerGate
from service.grpc.servicer import EntitlementServicer, UseCases
from service.reconcile_cli import stale_policy
from service.settings import Settings
from service.telemetry import start_tracing
from storage.engine import Database
from storage.migrate import head_revision
from webhooks.app import Lifecycle, create_app
from webhooks.verify import SignatureVerifier

log = logging.getLogger("entitlements.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EntitlementService"].full_name


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class Running:
    grpc_port: int
    http_port: int
    db: Database
    cache: EntitlementCache
    changes: ChangeFeed
    dodo: DodoGateway
    catalog: Catalog
    tasks: BackgroundTasks
    credit_service: CreditService
    watch_log: WatchLog
    watch_hub: WatchHub
    _stack: contextlib.AsyncExitStack
    _grace: list[float]
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def stop(self, grace: float) -> None:
        """Health NOT_SERVING first, then let in-flight calls drain for up to `grace` seconds, then the rest."""
        self._grace[0] = grace
        await self._stack.aclose()
        self.stopped.set()


async def start(
    settings: Settings,
    *,
    clock: Clock = utc_now,
    catalog: Catalog | None = None,
    db: Database | None = None,
    dodo: DodoGateway | None = None,
    span_exporter: SpanExporter | None = None,
) -> Running:
    catalog = catalog or load_catalog(settings.catalog_path)
    verifier = SignatureVerifier(settings.webhook_keys)
    grace = [settings.shutdown_grace_seconds]
    async with contextlib.AsyncExitStack() as stack:
        db = db or Database.from_url(
            settings.require_database(), pool_size=settings.db_pool_size, lock_timeout_ms=settings.lock_timeout_ms
        )
        stack.push_async_callback(db.close)
        metrics = Metrics()
        metrics.watch(PoolCollector(db))
        tracing = start_tracing(settings, exporter=span_exporter)
        if tracing is not None:
            stack.callback(tracing.close)
        dodo = dodo or DodoGateway(
            settings.dodo_payments_api_key,
            settings.dodo_payments_base_url,
            settings.dodo_timeout_seconds,
            metrics=metrics,
        )
        if dodo.metrics is None:
            dodo.metrics = metrics
        stack.push_async_callback(dodo.close)
        tasks = BackgroundTasks()
        stack.push_async_callback(tasks.stop)
        readiness = Readiness(db, head_revision())
        await readiness.require_schema()

        cache = EntitlementCache(
            db,
            max_customers=settings.cache_max_customers,
            max_unknown=settings.cache_max_unknown,
            stale_grace=settings.stale_grace_seconds,
        )
        metrics.watch(CacheCollector(cache.figures))
        cache.start(tasks)
        changes = ChangeFeed(db, cache)
        changes.start(tasks)
        watch_hub = WatchHub(
            db,
            buffer=settings.watch_buffer_events,
            heartbeat=settings.watch_heartbeat_seconds,
            max_streams=settings.watch_max_streams,
        )
        watch_hub.start(tasks)
        metrics.watch(WatchCollector(watch_hub.figures))
        watch_log = WatchLog(
            db,
            catalog,
            clock,
            retention=timedelta(hours=settings.watch_retention_hours),
            on_appended=watch_hub.appended,
        )
        changes.after_commit(watch_log.wake)
        watch_log.start(tasks)
        customers = Customers(db, cache, changes)
        reader = EntitlementReader(db, catalog, clock, cache, customers)
        credit_service = CreditService(
            db,
            catalog,
            clock,
            cache,
            changes,
            shards=settings.credit_writers,
            max_queued=settings.consume_queue_max,
            metrics=metrics,
            customers=customers,
        )
        credit_service.start(tasks)
        mutations = SubscriptionMutations(db, catalog, clock, dodo, reader, changes)
        listing = PlanListing(catalog, dodo, refresh_interval=settings.plan_prices_refresh_seconds)
        listing.start(tasks)
        usage = Usage(db, catalog, clock, customers)
        UsageSender(
            db,
            dodo,
            clock,
            wake=usage.recorded,
            limiter=RateLimiter(settings.usage_rate_per_minute),
            metrics=metrics,
            poll_interval=settings.usage_poll_seconds,
            # Longer than any one request to Dodo can take, so a live sender's claim is never taken over.
            lease=timedelta(seconds=max(60.0, 3 * settings.dodo_timeout_seconds)),
        ).start(tasks)
        if settings.credit_mirror_poll_seconds > 0:
            CreditMirror(
                db,
                dodo,
                limiter=RateLimiter(settings.credit_mirror_rate_per_minute),
                close_after=settings.credit_mirror_close_seconds,
                poll_interval=settings.credit_mirror_poll_seconds,
                # Longer than any one request to Dodo can take, so a live sender's claim is never taken over.
                lease=max(60.0, 3 * settings.dodo_timeout_seconds),
            ).start(tasks)
        charges = Charges(
            db,
            dodo,
            lease=timedelta(seconds=settings.charge_lease_seconds),
            resolve_interval=settings.charge_resolve_interval_seconds,
        )
        charges.start(tasks)
        use = UseCases(
            reader=reader,
            credits=credit_service,
            plans=PlanChanger(catalog, mutations),
            customers=customers,
            checkouts=Checkouts(db, catalog, clock, dodo, cache, customers, customer_ref_key=settings.customer_ref_key),
            portal=PortalSessions(db, dodo, customers),
            lifecycle=SubscriptionLifecycle(mutations),
            listing=listing,
            usage=usage,
            charges=charges,
            watch=watch_hub,
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
            tasks.spawn("reconcile", loop)

        # HTTP before gRPC, so that on stop (reverse order) in-flight RPCs drain while /readyz still says 503.
        lifecycle = Lifecycle()
        runner = web.AppRunner(
            create_app(
                db=db,
                verifier=verifier,
                lifecycle=lifecycle,
                ingest=WebhookIngest(db, catalog, changes, metrics=metrics, customer_ref_key=settings.customer_ref_key),
                readiness=readiness.problem,
                observe=lambda kind, outcome: metrics.webhook_deliveries.labels(kind, outcome).inc(),
                render_metrics=metrics.render,
                middlewares=[tracing.aiohttp_middleware()] if tracing is not None else [],
            ),
            access_log=None,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        http_port = await _listen_http(runner, settings.http_addr)

        # Auth, error mapping and RPC metrics are composed per method in one generic handler, not interceptors:
        # with any interceptor grpc.aio awaits a coroutine chain per call to find the handler (issue 14). Only
        # tracing's interceptor remains, when tracing is on. No auth without callers (development); malformed
        # callers stop the start here.
        dispatcher = Dispatcher(CallerGate.configured(settings.callers_raw, settings.api_tokens), metrics)
        server = grpc.aio.server(
            interceptors=[tracing.grpc_interceptor()] if tracing is not None else None,
            options=[("grpc.so_reuseport", 0)],
        )
        # Servicers register with the dispatcher, never the server: grpc.aio would look their registered method
        # handlers up before any generic handler, past the auth.
        registrar = dispatcher.registrar()
        pb_grpc.add_EntitlementServiceServicer_to_server(EntitlementServicer(use), registrar)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)
        reflection.enable(registrar, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
        server.add_generic_rpc_handlers((dispatcher,))
        grpc_port = _listen_grpc(server, settings)
        await server.start()
        stack.push_async_callback(lambda: server.stop(grace[0]))
        # Before the server's stop waits for its calls: open watch streams end at once (UNAVAILABLE, resumable).
        stack.callback(watch_hub.stop)

        async def report(ready: bool) -> None:
            # gRPC health follows readiness: NOT_SERVING while Postgres is away or the schema is wrong.
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, status)

        await report(readiness.ready)
        readiness.start(tasks, report)

        async def drain() -> None:
            lifecycle.draining = True
            await health_servicer.enter_graceful_shutdown()

        # Last in, first out: on stop, load balancers are told first, before anything closes.
        stack.push_async_callback(drain)
        log.info("server.started", extra={"grpc_port": grpc_port, "http_port": http_port})
        return Running(
            grpc_port=grpc_port,
            http_port=http_port,
            db=db,
            cache=cache,
            changes=changes,
            dodo=dodo,
            catalog=catalog,
            tasks=tasks,
            credit_service=credit_service,
            watch_log=watch_log,
            watch_hub=watch_hub,
            _stack=stack.pop_all(),
            _grace=grace,
        )
    raise AssertionError("unreachable")  # pragma: no cover  # the block either returns or raises


def _listen_grpc(server: grpc.aio.Server, settings: Settings) -> int:
    """Plaintext; TLS when ENTITLEMENTS_TLS_CERT and _KEY are set; mutual TLS (client certificates required and
    verified against it) when ENTITLEMENTS_TLS_CLIENT_CA is set too."""
    addr = settings.grpc_addr
    cert, key, client_ca = (path.strip() for path in (settings.tls_cert, settings.tls_key, settings.tls_client_ca))
    if bool(cert) != bool(key):
        raise ConfigurationError("ENTITLEMENTS_TLS_CERT and ENTITLEMENTS_TLS_KEY must be set together (PEM file paths)")
    if client_ca and not cert:
        raise ConfigurationError("ENTITLEMENTS_TLS_CLIENT_CA needs ENTITLEMENTS_TLS_CERT and ENTITLEMENTS_TLS_KEY")

    def pem(variable: str, path: str) -> bytes:
        try:
            with open(path, "rb") as file:  # a blocking read, once, before anything is served
                data = file.read()
        except OSError as error:
            raise ConfigurationError(f"{variable}: cannot read {path}: {error.strerror or error}") from None
        if b"-----BEGIN " not in data:
            raise ConfigurationError(f"{variable}: {path} is not a PEM file")
        return data

    credentials = None
    if cert:
        credentials = grpc.ssl_server_credentials(
            [(pem("ENTITLEMENTS_TLS_KEY", key), pem("ENTITLEMENTS_TLS_CERT", cert))],
            root_certificates=pem("ENTITLEMENTS_TLS_CLIENT_CA", client_ca) if client_ca else None,
            require_client_auth=bool(client_ca),
        )
    # grpc raises on a taken port (older releases returned 0), and in the same way on a key that is not the
    # certificate's: say both.
    why = "address in use or not available"
    if credentials is not None:
        why += ", or ENTITLEMENTS_TLS_KEY is not the private key of ENTITLEMENTS_TLS_CERT"
    try:
        port = server.add_insecure_port(addr) if credentials is None else server.add_secure_port(addr, credentials)
    except RuntimeError as error:
        raise ConfigurationError(f"cannot listen for gRPC on {addr}: {why}") from error
    if port == 0:
        raise ConfigurationError(f"cannot listen for gRPC on {addr}: {why}")
    log.info("server.grpc_transport", extra={"tls": credentials is not None, "client_certificates": bool(client_ca)})
    return port


async def _listen_http(runner: web.AppRunner, addr: str) -> int:
    host, port = split_addr(addr)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as error:
        raise ConfigurationError(f"cannot listen for HTTP on {addr}: {error.strerror or error}") from None
    return int(runner.addresses[0][1])


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
