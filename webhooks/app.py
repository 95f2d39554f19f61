"""The aiohttp app: Dodo's webhook endpoint plus liveness and readiness probes on the HTTP port."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from aiohttp import web

from service.domain.dodo_events import Event, Outcome, parse_event
from service.domain.errors import DomainError, InvalidArgument, StorageUnavailable
from service.domain.limits import MAX_ID
from storage.engine import Database
from storage.errors import is_database_unavailable
from storage.repositories.inbox import InboxRepository
from webhooks.verify import InvalidSignature, SignatureVerifier

log = logging.getLogger("entitlements.webhooks")

MAX_BODY_BYTES = 1024 * 1024
# Prometheus' text exposition format (prometheus_client's CONTENT_TYPE_LATEST).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Lifecycle:
    """Set to draining on shutdown so load balancers stop sending before the listeners close."""

    draining: bool = False


DB = web.AppKey("db", Database)
VERIFIER = web.AppKey("verifier", SignatureVerifier)
# The webhook use case (service/app/webhook_ingest.py), injected so this transport depends only on the domain.
Ingest = Callable[[Event], Awaitable[Outcome]]
INGEST: web.AppKey[Ingest] = web.AppKey("ingest")
# Why the service is not ready now, or None (service/app/readiness.py): the same check gRPC health follows.
ReadinessCheck = Callable[[], Awaitable[str | None]]
READINESS: web.AppKey[ReadinessCheck] = web.AppKey("readiness")
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
# (event type, outcome) of every delivery, 4xx/5xx included: the webhook metrics (service/app/metrics.py).
Observe = Callable[[str, str], None]
OBSERVE: web.AppKey[Observe] = web.AppKey("observe")
# The Prometheus text of the running service.
RENDER_METRICS: web.AppKey[Callable[[], bytes]] = web.AppKey("render_metrics")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except DomainError as exc:
        return _error(exc.http_status, exc.message)
    except Exception as exc:
        if is_database_unavailable(exc):
            log.warning("webhook.unavailable", extra={"path": request.path, "why": type(exc).__name__})
            unavailable = StorageUnavailable()
            return _error(unavailable.http_status, unavailable.message)
        log.exception("webhook.failed", extra={"path": request.path})
        return _error(500, "internal error")


async def receive_dodo(request: web.Request) -> web.Response:
    observe = request.app[OBSERVE]
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        observe("", "too_large")
        return _error(413, f"body over {MAX_BODY_BYTES} bytes")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        observe("", "too_large")
        return _error(413, f"body over {MAX_BODY_BYTES} bytes")
    headers = {name.lower(): value for name, value in request.headers.items()}
    try:
        signed_at = request.app[VERIFIER].verify(body, headers)
    except InvalidSignature as exc:
        log.warning("webhook.rejected", extra={"why": str(exc), "webhook_id": headers.get("webhook-id")})
        observe("", "rejected")
        return _error(401, "invalid webhook signature")
    webhook_id = headers["webhook-id"]
    event_type = ""
    try:
        event = parse_event(body, webhook_id, signed_at)
        event_type = event.type
        if event.untrusted_timestamp is not None:
            _log_untrusted_time(event, event.untrusted_timestamp, signed_at)
        outcome = await request.app[INGEST](event)
    except InvalidArgument as exc:
        # Any 400 (MalformedPayload, or a field check the readers did not translate): a retry of a delivery we
        # already stored is acknowledged, whatever a stricter reader thinks of it now.
        if await _already_stored(request.app[DB], webhook_id):
            observe(event_type, Outcome.DUPLICATE.value)
            return web.json_response({"status": Outcome.DUPLICATE.value})
        log.warning("webhook.malformed", extra={"why": exc.message, "webhook_id": webhook_id[:MAX_ID]})
        observe(event_type, "malformed")
        return _error(400, exc.message)
    except Exception:
        observe(event_type, "failed")
        raise
    observe(event_type, outcome.value)
    return web.json_response({"status": outcome.value})


def _log_untrusted_time(event: Event, claimed: datetime, signed_at: datetime) -> None:
    """The sender's clock or template is wrong: worth an operator's look, though the delivery itself is fine."""
    log.warning(
        "webhook.timestamp_untrusted",
        extra={
            "webhook_id": event.webhook_id,
            "type": event.type,
            "envelope_timestamp": claimed.isoformat(),
            "signed_at": signed_at.isoformat(),
            "ordered_by": "signed_at",
        },
    )


async def _already_stored(db: Database, webhook_id: str) -> bool:
    try:
        async with db.connection() as connection:
            return await InboxRepository(connection).seen(webhook_id)
    except asyncpg.DataError:
        # Text Postgres cannot take (a NUL) cannot be a webhook-id it stored.
        return False


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[LIFECYCLE].draining:
        return _error(503, "shutting down")
    problem = await request.app[READINESS]()
    if problem is not None:
        return _error(503, problem)
    return web.json_response({"status": "ready"})


async def _always_ready() -> str | None:
    return None


def _unobserved(event_type: str, outcome: str) -> None:
    return None


def _no_metrics() -> bytes:
    return b""


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[RENDER_METRICS](), headers={"Content-Type": METRICS_CONTENT_TYPE})


def create_app(
    *,
    db: Database,
    verifier: SignatureVerifier,
    lifecycle: Lifecycle | None = None,
    ingest: Ingest,
    readiness: ReadinessCheck = _always_ready,
    observe: Observe = _unobserved,
    render_metrics: Callable[[], bytes] = _no_metrics,
    middlewares: Sequence[Any] = (),
) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[*middlewares, errors_middleware])
    app[DB] = db
    app[VERIFIER] = verifier
    app[INGEST] = ingest
    app[READINESS] = readiness
    app[OBSERVE] = observe
    app[RENDER_METRICS] = render_metrics
    app[LIFECYCLE] = lifecycle or Lifecycle()
    app.router.add_post("/webhooks/dodo", receive_dodo)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
