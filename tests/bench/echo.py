"""The baselines: bare grpc.aio servers on the service's method paths that answer a constant without any work.

Two kinds, one per process:

- the protobuf echo (default): same method paths and message types as `entitlements.v1.EntitlementService`
  (requests are parsed, responses serialized, like the real servicer's), one process, uvloop, no interceptors, no
  reflection, no health service. A bare aiohttp endpoint on `--http-port` is the webhook receiver's baseline.
- the identity echo (`--identity`): identity serializers (`lambda b: b`), the response's bytes made once, no
  interceptors: what grpc.aio itself costs per call, the framework's own ceiling.

Run as `python -m tests.bench.echo --grpc-port P [--http-port Q | --identity]`; prints `echo: ready` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc
import uvloop
from aiohttp import web
from entitlements.v1 import entitlements_pb2 as pb

SERVICE = "entitlements.v1.EntitlementService"

CHECK_ACCESS_RESPONSE = pb.CheckAccessResponse(
    allowed=True,
    reason=pb.ACCESS_REASON_ACTIVE,
    status="active",
    subscription_id="sub_B00000000000000000000",
    product_id="pdt_6Gx2Kq9LwPro0Mth4Rt1",
    kind=pb.FEATURE_KIND_BOOLEAN,
)
CONSUME_CREDITS_RESPONSE = pb.ConsumeCreditsResponse(
    entry_id="cle_00000000000000000000000000000000", balance_after="999999999", overage_after="0"
)


async def check_access(request: pb.CheckAccessRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    return CHECK_ACCESS_RESPONSE


async def consume_credits(request: pb.ConsumeCreditsRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    return CONSUME_CREDITS_RESPONSE


CHECK_ACCESS_BYTES = CHECK_ACCESS_RESPONSE.SerializeToString()
CONSUME_CREDITS_BYTES = CONSUME_CREDITS_RESPONSE.SerializeToString()


def identity(data: bytes) -> bytes:
    return data


async def check_access_bytes(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return CHECK_ACCESS_BYTES


async def consume_credits_bytes(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return CONSUME_CREDITS_BYTES


def identity_handler() -> grpc.GenericRpcHandler:
    """The framework's ceiling: grpc.aio's own per-call work, nothing parsed or serialized."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "CheckAccess": grpc.unary_unary_rpc_method_handler(
                check_access_bytes, request_deserializer=identity, response_serializer=identity
            ),
            "ConsumeCredits": grpc.unary_unary_rpc_method_handler(
                consume_credits_bytes, request_deserializer=identity, response_serializer=identity
            ),
        },
    )


def generic_handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "CheckAccess": grpc.unary_unary_rpc_method_handler(
                check_access,
                request_deserializer=pb.CheckAccessRequest.FromString,
                response_serializer=pb.CheckAccessResponse.SerializeToString,
            ),
            "ConsumeCredits": grpc.unary_unary_rpc_method_handler(
                consume_credits,
                request_deserializer=pb.ConsumeCreditsRequest.FromString,
                response_serializer=pb.ConsumeCreditsResponse.SerializeToString,
            ),
        },
    )


async def webhook(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"status": "applied"})


async def serve(grpc_port: int, http_port: int | None, *, identity_only: bool = False) -> None:
    # The service's own server options, so the comparison is transport against transport.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((identity_handler() if identity_only else generic_handler(),))
    if server.add_insecure_port(f"127.0.0.1:{grpc_port}") == 0:
        raise SystemExit(f"echo: cannot listen on 127.0.0.1:{grpc_port}")
    await server.start()
    runner: web.AppRunner | None = None
    if http_port is not None:
        app = web.Application()
        app.router.add_post("/webhooks/dodo", webhook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", http_port).start()
    print("echo: ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)
    if runner is not None:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.echo")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, help="the aiohttp webhook baseline's port (protobuf echo only)")
    parser.add_argument("--identity", action="store_true", help="identity serializers: grpc.aio's own ceiling")
    args = parser.parse_args()
    if args.identity and args.http_port is not None:
        parser.error("--identity serves gRPC only")
    uvloop.run(serve(args.grpc_port, args.http_port, identity_only=args.identity))


if __name__ == "__main__":
    main()
