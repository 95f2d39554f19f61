"""WatchEntitlements on the wire: the hub's events as EntitlementEvent, and a stream's errors as statuses.

The unary guard in interceptors.py wraps unary handlers only; a stream's errors surface while it is iterated, so
they are mapped here, the same way (domain error -> its status with ErrorInfo, Postgres outage -> UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from entitlements.v1 import entitlements_pb2 as pb

from service.app.entitlement_reader import EntitlementReader
from service.app.watch_hub import Heartbeat, WatchHub
from service.domain import watch_rules
from service.domain.errors import DomainError, StorageUnavailable
from service.domain.watch_rules import WatchEvent, WatchKind
from service.grpc import conversion as convert
from service.grpc.interceptors import status_for
from storage.errors import is_database_unavailable

log = logging.getLogger("entitlements.grpc")

Context = grpc.aio.ServicerContext[Any, Any]

_KINDS = {
    WatchKind.SUBSCRIPTION_CHANGED: pb.ENTITLEMENT_EVENT_KIND_SUBSCRIPTION_CHANGED,
    WatchKind.ACCESS_CHANGED: pb.ENTITLEMENT_EVENT_KIND_ACCESS_CHANGED,
    WatchKind.CREDITS_CHANGED: pb.ENTITLEMENT_EVENT_KIND_CREDITS_CHANGED,
    WatchKind.CREDITS_LOW: pb.ENTITLEMENT_EVENT_KIND_CREDITS_LOW,
    WatchKind.CREDITS_EXHAUSTED: pb.ENTITLEMENT_EVENT_KIND_CREDITS_EXHAUSTED,
    WatchKind.CUSTOMER_LINKED: pb.ENTITLEMENT_EVENT_KIND_CUSTOMER_LINKED,
}
# One event goes to many streams: each is converted once (by position) while it is recent.
_CONVERTED_MAX = 4096


class WatchStream:
    def __init__(self, hub: WatchHub, reader: EntitlementReader) -> None:
        self.hub = hub
        self.reader = reader
        self._converted: dict[int, pb.EntitlementEvent] = {}

    async def serve(self, request: pb.WatchEntitlementsRequest, context: Context) -> AsyncIterator[pb.EntitlementEvent]:
        try:
            customers = watch_rules.check_customer_ids(list(request.customer_ids))
            after = watch_rules.parse_cursor(request.after_cursor) if request.after_cursor else None
            async for item in self.hub.watch(customers, after):
                yield self._message(item)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except DomainError as error:
            status = status_for(error)
            await context.abort(status.code, status.details, status.trailing_metadata)
        except Exception as error:
            if is_database_unavailable(error):
                status = status_for(StorageUnavailable())
                await context.abort(status.code, status.details, status.trailing_metadata)
            log.exception("grpc.failed", extra={"method": "WatchEntitlements"})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    def _message(self, item: WatchEvent | Heartbeat) -> pb.EntitlementEvent:
        if isinstance(item, Heartbeat):
            return pb.EntitlementEvent(cursor=item.cursor, kind=pb.ENTITLEMENT_EVENT_KIND_HEARTBEAT)
        message = self._converted.get(item.position)
        if message is None:
            message = self._convert(item)
            if len(self._converted) >= _CONVERTED_MAX:
                self._converted.clear()
            self._converted[item.position] = message
        return message

    def _convert(self, event: WatchEvent) -> pb.EntitlementEvent:
        message = pb.EntitlementEvent(
            cursor=self.hub.cursor(event.position),
            customer_id=event.customer_id,
            customer_ref=event.customer_ref or "",
            kind=_KINDS[event.kind],
            credit=event.credit or "",
            balance=convert.decimal_text(event.balance),
            threshold=convert.decimal_text(event.threshold),
            occurred_at=convert.timestamp(event.occurred_at),
        )
        if event.subscription is not None:
            view = self.reader.view(event.subscription, customer_ref=event.customer_ref or "", at=event.occurred_at)
            message.subscription.CopyFrom(convert.subscription(view))
        return message
