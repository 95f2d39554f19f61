"""`python -m service migrate|serve|banner`: configured only by the environment (DESIGN §9)."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from service.domain.errors import ConfigurationError
from service.logs import configure as configure_logging
from service.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description="Dodo Payments entitlement service")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply database migrations (Alembic) up to head")
    commands.add_parser("serve", help="serve gRPC and the webhook HTTP app until SIGTERM")
    commands.add_parser("banner", help="print the addresses and an example call for the current environment")
    rec = commands.add_parser("reconcile", help="fetch subscriptions from Dodo and apply them like webhooks")
    which = rec.add_mutually_exclusive_group(required=True)
    which.add_argument("--subscription", action="append", metavar="ID", help="this subscription (repeatable)")
    which.add_argument("--stale", action="store_true", help="those whose local state may be out of date")
    which.add_argument("--all", action="store_true", help="every stored subscription")
    which.add_argument(
        "--credits", action="store_true", help="report drift between our and Dodo's balances of Dodo-linked credits"
    )
    args = parser.parse_args(argv)
    configure_logging(logging.INFO)
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"entitlements: refusing to start: invalid configuration: {problems}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        return _run(args, settings)
    except ConfigurationError as exc:
        print(f"entitlements: refusing to start: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "migrate":
        from storage.migrate import upgrade

        upgrade(settings.require_database())
        print("migrations: at head", flush=True)
        return 0
    if args.command == "banner":
        from service.dev.banner import banner

        print(banner(settings), flush=True)
        return 0
    if args.command == "reconcile":
        import uvloop

        from service.reconcile_cli import run_credit_report, run_reconcile

        if args.credits:
            return uvloop.run(run_credit_report(settings))
        return uvloop.run(run_reconcile(settings, subscriptions=args.subscription, stale=args.stale))
    if args.command == "serve":
        import uvloop

        from service.server import serve

        uvloop.run(serve(settings))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
