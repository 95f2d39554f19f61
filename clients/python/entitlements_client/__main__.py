"""`python -m entitlements_client check-access CUSTOMER FEATURE` (and get-subscription): a quick manual probe.

Target and token come from ENTITLEMENTS_GRPC_ADDR and ENTITLEMENTS_API_TOKENS (first token), like the server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from google.protobuf import json_format

from entitlements_client import EntitlementsClient


async def _run(args: argparse.Namespace) -> int:
    token = next((t.strip() for t in os.environ.get("ENTITLEMENTS_API_TOKENS", "").split(",") if t.strip()), None)
    async with EntitlementsClient(args.target, token=token) as client:
        if args.command == "check-access":
            message = await client.check_access(args.customer_id, args.feature)
            print(json_format.MessageToJson(message, always_print_fields_with_no_presence=True))
        else:
            subscription = await client.get_subscription(customer_id=args.customer_id)
            print(json_format.MessageToJson(subscription))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m entitlements_client")
    parser.add_argument("--target", default=os.environ.get("ENTITLEMENTS_GRPC_ADDR", "127.0.0.1:50051"))
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-access")
    check.add_argument("customer_id")
    check.add_argument("feature")
    get = commands.add_parser("get-subscription")
    get.add_argument("customer_id")
    return asyncio.run(_run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
