"""The baseline: a bare grpc.aio server on the service's method paths that answers a constant without any work.

Same method paths and message types as `entitlements.v1.EntitlementService` (requests are parsed, responses
serialized, like the real servicer's), one process, uvloop, no interceptors, no reflection, no health service.
A bare aiohttp endpoint on a second port is the webhook receiver's baseline.

Run as `python -m tests.bench.echo --grpc-port P --http-port Q`; prints `echo: ready` once both listen.
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


async def serve(grpc_port: int, http_port: int) -> None:
    # The service's own server options, so the comparison is transport against transport.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((generic_handler(),))
    if server.add_insecure_port(f"127.0.0.1:{grpc_port}") == 0:
        raise SystemExit(f"echo: cannot listen on 127.0.0.1:{grpc_port}")
    await server.start()
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
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.echo")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.grpc_port, args.http_port))


if __name__ == "__main__":
    main()
