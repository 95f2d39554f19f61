"""What the Python client tests share: a real grpc.aio server standing in front of the live service that answers
UNAVAILABLE (or stalls) when told to and otherwise forwards every call byte for byte (WatchEntitlements too, which
it can cut after some messages with a real status on the wire, or send to another replica), fixture subscriptions
(one the service knows by webhook, one both it and the fake Dodo know), and a small PKI for TLS."""

from __future__ import annotations

import asyncio
import datetime
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from entitlements.v1 import entitlements_pb2 as pb
from google.rpc import error_details_pb2, status_pb2

from tests.fakedodo import FakeDodo
from tests.support import FakeClock, WebhookPoster, deliver, iso, load_event

SERVICE = pb.DESCRIPTOR.services_by_name["EntitlementService"]
# Every RPC the contract declares: each needs an `Rpc` in entitlements_client/_rpcs.py, a method on both clients
# and a CLI subcommand (the coverage tests fail for one that has not).
METHODS = tuple(method.name for method in SERVICE.methods)
BUSINESS_ID = "bus_0NmY7fQz4kR2sT8vW1xJa"


Handler = Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]
WATCH = "WatchEntitlements"


@dataclass(frozen=True)
class Cut:
    """How the front ends a watch stream early: after `after` messages, with `code`; `reason` adds an ErrorInfo
    (WATCH_SUBSCRIBER_TOO_SLOW also names the last cursor forwarded, as the service does)."""

    after: int
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    reason: str = ""


@dataclass
class Flaky:
    """Per method: how many attempts arrived; the first `fail_first` of each are answered with `code`. `stall`
    seconds pass before any answer (to outlast a caller's deadline). `hold`, when set, keeps each CheckAccess
    answer (already computed upstream) until it is set. Watch streams: the next `cuts` are ended as each says;
    `mute` next ones go silent; `upstream` (host:port) may be moved to another replica; `forwarded` lists each
    stream's cursors."""

    port: int
    upstream: str
    fail_first: int = 0
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    stall: float = 0.0
    attempts: Counter[str] = field(default_factory=Counter)
    hold: asyncio.Event | None = None
    cuts: list[Cut] = field(default_factory=list)
    # The next `mute` watch streams go silent (open, sending nothing) after their first message.
    mute: int = 0
    forwarded: list[list[str]] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def status_details(code: grpc.StatusCode, message: str, reason: str, **metadata: str) -> tuple[tuple[str, bytes]]:
    """The `grpc-status-details-bin` trailer of a status carrying one ErrorInfo."""
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain="entitlements.v1", metadata=metadata))
    return (("grpc-status-details-bin", status.SerializeToString()),)


async def _nothing() -> AsyncIterator[bytes]:
    nothing: tuple[bytes, ...] = ()
    for message in nothing:
        yield message


def _authorization(context: grpc.aio.ServicerContext[bytes, bytes]) -> tuple[tuple[str, str], ...]:
    return tuple(
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if key == "authorization" and isinstance(value, str)
    )


@asynccontextmanager
async def flaky_front(upstream: str) -> AsyncIterator[Flaky]:
    """A grpc.aio server on its own port, in front of the service at `upstream` (a real UNAVAILABLE on the wire)."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    flaky = Flaky(port, upstream)
    async with grpc.aio.insecure_channel(upstream) as channel:

        async def watching(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
            flaky.attempts[WATCH] += 1
            if flaky.attempts[WATCH] <= flaky.fail_first:
                await context.abort(
                    flaky.code, f"{flaky.code.name.lower()} (test front, attempt {flaky.attempts[WATCH]})"
                )
            cut = flaky.cuts.pop(0) if flaky.cuts else None
            muted = flaky.mute > 0
            flaky.mute -= muted
            cursors: list[str] = []
            flaky.forwarded.append(cursors)
            async with grpc.aio.insecure_channel(flaky.upstream) as replica:
                method: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = replica.unary_stream(
                    f"/{SERVICE.full_name}/{WATCH}"
                )
                call = method(request, metadata=_authorization(context))
                try:
                    async for message in _nothing() if cut is not None and cut.after == 0 else call:
                        cursors.append(pb.EntitlementEvent.FromString(message).cursor)
                        yield message
                        if muted:
                            await asyncio.sleep(3600)  # until the caller gives up on this stream
                        if cut is not None and len(cursors) >= cut.after:
                            break
                except grpc.aio.AioRpcError as error:
                    await context.abort(error.code(), error.details() or "", tuple(error.trailing_metadata() or ()))
                finally:
                    call.cancel()
            if cut is not None:
                trailer = (
                    status_details(cut.code, "cut by the test front", cut.reason, cursor=cursors[-1] if cursors else "")
                    if cut.reason
                    else ()
                )
                await context.abort(cut.code, f"cut by the test front after {len(cursors)} messages", trailer)

        def forwarding(name: str) -> Handler:
            upstream_method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                f"/{SERVICE.full_name}/{name}"
            )

            async def handle(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
                flaky.attempts[name] += 1
                if flaky.stall:
                    await asyncio.sleep(flaky.stall)
                if flaky.attempts[name] <= flaky.fail_first:
                    await context.abort(
                        flaky.code, f"{flaky.code.name.lower()} (test front, attempt {flaky.attempts[name]})"
                    )
                try:
                    answer: bytes = await upstream_method(request, metadata=_authorization(context), timeout=10)
                except grpc.aio.AioRpcError as error:
                    await context.abort(error.code(), error.details() or "", tuple(error.trailing_metadata() or ()))
                if flaky.hold is not None and name == "CheckAccess":
                    await flaky.hold.wait()
                return answer

            return handle

        handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
            name: grpc.unary_unary_rpc_method_handler(forwarding(name)) for name in METHODS if name != WATCH
        }
        handlers[WATCH] = grpc.unary_stream_rpc_method_handler(watching)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
        await server.start()
        try:
            yield flaky
        finally:
            await server.stop(0)


async def pro_customer(webhooks: WebhookPoster) -> None:
    """The fixture customer on Pro (active, 10000 ai_tokens this period at the test clock's default "now")."""
    await deliver(webhooks, load_event("subscription_active"))


async def known_subscription(
    fake_dodo: FakeDodo, webhooks: WebhookPoster, clock: FakeClock, **fields: Any
) -> dict[str, Any]:
    """A subscription the fake Dodo holds (`fields` as for `add_subscription`) and the service has applied from
    its signed `subscription.active`: what CancelSubscription and ResumeSubscription need."""
    sub = fake_dodo.add_subscription(**fields)
    event = {
        "business_id": BUSINESS_ID,
        "type": "subscription.active",
        "timestamp": iso(clock.now - datetime.timedelta(seconds=5)),
        "data": sub,
    }
    await deliver(webhooks, event)
    return sub


# --- TLS -----------------------------------------------------------------------------------------------------------
