"""`entitlements` / `python -m entitlements_client`: every RPC as a subcommand, snake_case JSON on stdout.

    entitlements --target 127.0.0.1:50051 --token "$TOKEN" check-access --customer-id cus_123 --feature dashboard
    entitlements check-access --customer-ref org_42 dashboard
    entitlements consume-credits --customer-id cus_123 --credit ai_tokens --amount 25 --idempotency-key req-1
    entitlements watch --customer-id cus_123          # one JSON line per change, until Ctrl-C
    entitlements create-checkout --customer-ref org_42 --item pdt_pro:2 --addon pdt_pro:adn_seat:3 \
        --trial-days 14 --return-url https://app.example/done --idempotency-key co-1

Wherever a customer is named, --customer-id (the Dodo customer id) or --customer-ref (the company's own id for the
customer) names it, exactly one of the two.

The target comes from --target, else ENTITLEMENTS_TARGET, else ENTITLEMENTS_GRPC_ADDR, else 127.0.0.1:50051; the
token from --token, else ENTITLEMENTS_TOKEN, else the first of ENTITLEMENTS_API_TOKENS. Global options may also
follow the subcommand. On any failure one line goes to stderr (`error: NOT_FOUND: ... (reason=..., field=...)`)
and the exit status says which kind: 1 the call failed, 2 the command line (or a TLS file) is wrong, 130
interrupted. Never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any, NoReturn, TypeVar

from entitlements_client import _rpcs
from entitlements_client._clients import DEFAULT_TIMEOUT, SyncEntitlementsClient
from entitlements_client._version import __version__
from entitlements_client.errors import EntitlementsError
from entitlements_client.models import (
    CheckoutAddon,
    CheckoutItem,
    CreditLedgerEntry,
    CreditLedgerPage,
    EffectiveAt,
    ProrationMode,
    ProtoEnum,
    UsageEvent,
    to_jsonable,
)
from entitlements_client.options import RetryPolicy, Tls

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

__all__ = ["COMMANDS", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_USAGE", "main"]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_TARGET = "127.0.0.1:50051"
DESCRIPTION = "Call the entitlement service (entitlements.v1): every RPC as a subcommand, JSON out."

_E = TypeVar("_E", bound=ProtoEnum)


class UsageError(Exception):
    """The command line cannot be run as given."""


class _Parser(argparse.ArgumentParser):
    """Errors raise instead of printing usage and exiting, so `main` can answer with one line."""

    stdout: IO[str] | None = None

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        super().print_help(file or self.stdout)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- argument helpers ----------------------------------------------------------------------------------------------


def _enum(kind: type[_E]) -> Callable[[str], _E]:
    def parse(text: str) -> _E:
        try:
            return kind.parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = kind.__name__
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text[:64]!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text[:64]!r}")
    return value


def _pair(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text[:64]!r}")
    return key, value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text[:64]!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a quantity is at least 1: {text[:64]!r}")
    return value


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {text[:64]!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"days cannot be negative: {text[:64]!r}")
    return value


def _item(text: str) -> CheckoutItem:
    """PRODUCT[:QTY]"""
    product, colon, quantity = text.partition(":")
    if not product or (colon and not quantity):
        raise argparse.ArgumentTypeError(f"expected PRODUCT[:QTY], got {text[:64]!r}")
    return CheckoutItem(product, _count(quantity) if colon else 1)


def _addon(text: str) -> tuple[str, CheckoutAddon]:
    """PRODUCT:ADDON[:QTY] -> (the item's product, the add-on)"""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise argparse.ArgumentTypeError(f"expected PRODUCT:ADDON[:QTY], got {text[:64]!r}")
    return parts[0], CheckoutAddon(parts[1], _count(parts[2]) if len(parts) == 3 else 1)


def _cart(items: Sequence[CheckoutItem], addons: Sequence[tuple[str, CheckoutAddon]]) -> list[CheckoutItem]:
    """The --item list with each --addon attached to the item of its product."""
    cart = list(items)
    for product, addon in addons:
        matching = [index for index, item in enumerate(cart) if item.product_id == product]
        if len(matching) != 1:
            said = "is not an --item" if not matching else "is more than one --item"
            raise UsageError(f"--addon {product}:{addon.addon_id}: product {product!r} {said}")
        (index,) = matching
        cart[index] = replace(cart[index], addons=(*cart[index].addons, addon))
    return cart


def _customer_options(parser: argparse.ArgumentParser, *, required: bool, what: str = "customer") -> None:
    """--customer-id / --customer-ref, at most (or, `required`, exactly) one of them."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--customer-id", help=f"the {what}'s Dodo customer id")
    group.add_argument("--customer-ref", help=f"instead of --customer-id: the company's own id for the {what}")


def _either(args: argparse.Namespace, option: str, positional: str, flag: str) -> str:
    """A field given as an option or (for compatibility) positionally, exactly once."""
    by_option, by_position = getattr(args, option), getattr(args, positional)
    if by_option is not None and by_position is not None and by_option != by_position:
        raise UsageError(f"{flag} given twice ({by_position!r} and {by_option!r})")
    value = by_option if by_option is not None else by_position
    if value is None:
        raise UsageError(f"the following arguments are required: {flag}")
    return str(value)


# --- subcommands ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    rpc: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[SyncEntitlementsClient, argparse.Namespace, float | None], Any]
    # Other names for the subcommand.
    aliases: tuple[str, ...] = ()
    # `run` returns an iterator: one compact JSON line per item, each flushed as it comes.
    stream: bool = False


def _check_access_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pos_customer_id", nargs="?", metavar="CUSTOMER_ID", help="same as --customer-id")
    parser.add_argument(
        "pos_feature", nargs="?", metavar="FEATURE", help="same as --feature (alone when --customer-ref is given)"
    )
    parser.add_argument("--customer-id", help="the Dodo customer id")
    parser.add_argument("--customer-ref", help="instead of the customer id: the company's own id for the customer")
    parser.add_argument("--feature", help="a boolean feature, limit or credit key of the catalog")


def _check_access(client: SyncEntitlementsClient, args: argparse.Namespace, timeout: float | None) -> Any:
    if args.customer_ref is not None:
        if args.customer_id is not None or args.pos_feature is not None:
            raise UsageError("name exactly one of --customer-id and --customer-ref")
        # With the customer named by ref, a single positional is the feature.
        args.pos_feature, args.pos_customer_id = args.pos_customer_id, None
        feature = _either(args, "feature", "pos_feature", "--feature")
        return client.check_access(customer_ref=args.customer_ref, feature=feature, timeout=timeout)
    customer = _either(args, "customer_id", "pos_customer_id", "--customer-id")
    feature = _either(args, "feature", "pos_feature", "--feature")
    return client.check_access(customer, feature, timeout=timeout)


def _get_subscription_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pos_customer_id", nargs="?", metavar="CUSTOMER_ID", help="same as --customer-id")
    parser.add_argument("--subscription-id", help="one subscription by id")
    parser.add_argument("--customer-id", help="the customer's most relevant subscription")
    parser.add_argument("--customer-ref", help="the same, naming the customer by the company's own id")


def _get_subscription(client: SyncEntitlementsClient, args: argparse.Namespace, timeout: float | None) -> Any:
    customer = args.customer_id if args.customer_id is not None else args.pos_customer_id
    if sum(value is not None for value in (args.subscription_id, customer, args.customer_ref)) != 1:
        raise UsageError("name exactly one of --subscription-id, --customer-id and --customer-ref")
    return client.get_subscription(
        subscription_id=args.subscription_id, customer_id=customer, customer_ref=args.customer_ref, timeout=timeout
    )


def _change_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subscription-id", required=True)
    parser.add_argument("--product-id", required=True, help="the product (plan) to move to")
    parser.add_argument("--quantity", type=int, default=0, help="0 keeps the current quantity (default)")
    parser.add_argument(
        "--proration-mode",
        type=_enum(ProrationMode),
        default=ProrationMode.UNSPECIFIED,
        help="prorated-immediately (default), full-immediately, difference-immediately or do-not-bill",
    )
    parser.add_argument(
        "--effective-at",
        type=_enum(EffectiveAt),
        default=EffectiveAt.UNSPECIFIED,
        help="immediately (default) or next-billing-date",
    )
    parser.add_argument("--idempotency-key", default="", help="required for a change; reuse it to retry safely")
    parser.add_argument("--preview", action="store_true", help="price the change and change nothing")


def _change_plan(client: SyncEntitlementsClient, args: argparse.Namespace, timeout: float | None) -> Any:
    return client.change_plan(
        args.subscription_id,
        args.product_id,
        quantity=args.quantity,
        proration_mode=args.proration_mode,
        effective_at=args.effective_at,
        idempotency_key=args.idempotency_key,
        preview=args.preview,
        timeout=timeout,
    )


def _consume_credits_arguments(parser: argparse.ArgumentParser) -> None:
    _customer_options(parser, required=True)
    parser.add_argument("--credit", required=True, help="a credit key of the catalog")
    parser.add_argument("--amount", required=True, help="a positive decimal, e.g. 25 or 0.25")
    parser.add_argument("--idempotency-key", default="", help="required; the same key replays the first answer")
    parser.add_argument("--description", default="")
    parser.add_argument("--metadata", type=_pair, action="append", default=[], metavar="KEY=VALUE", help="repeatable")


def _consume_credits(client: SyncEntitlementsClient, args: argparse.Namespace, timeout: float | None) -> Any:
    options = {"description": args.description, "metadata": dict(args.metadata), "timeout": timeout}
    if args.customer_ref is not None:
        return client.consume_credits(
            customer_ref=args.customer_ref,
            credit=args.credit,
            amount=args.amount,
            idempotency_key=args.idempotency_key,
            **options,
        )
    return client.consume_credits(args.customer_id, args.credit, args.amount, args.idempotency_key, **options)


def _list_credit_ledger_arguments(parser: argparse.ArgumentParser) -> None:
    _customer_options(parser, required=True)
    parser.add_argument("--credit", required=True, help="a credit key of the catalog")
    parser.add_argument("--page-size", type=int, default=0, help="0 = the server's default (50), at most 500")
    parser.add_argument("--page-token", default="", help="next_page_token of the previous page")
    parser.add_argument("--all", action="store_true", help="follow next_page_token and print every entry")


def _ledger_page(
    client: SyncEntitlementsClient, args: argparse.Namespace, token: str, timeout: float | None
) -> CreditLedgerPage:
    if args.customer_ref is not None:
        return client.list_credit_ledger(
            customer_ref=args.customer_ref,
            credit=args.credit,
            page_size=args.page_size,
            page_token=token,
            timeout=timeout,
        )
    return client.list_credit_ledger(
        args.customer_id, args.credit, page_size=args.page_size, page_token=token, timeout=timeout
    )


def _list_credit_ledger(client: SyncEntitlementsClient, args: argparse.Namespace, timeout: float | None) -> Any:
    if not args.all:
        return _ledger_page(client, args, args.page_token, timeout)
    entries: list[CreditLedgerEntry] = []
    token = args.page_token
    while True:
        page = _ledger_page(client, args, token, timeout)
        entries.extend(page.entries)
        token = page.next_page_token
        if not token:
            return CreditLedgerPage(entries=tuple(entries), next_page_token="")


def _create_checkout_arguments(parser: argparse.ArgumentParser) -> None:
    _customer_options(parser, required=False, what="payer")
    parser.add_argument("--email", default="", help="a new customer's e-mail (without --customer-id/--customer-ref)")
    parser.add_argument("--name", default="", help="a new customer's name")
    parser.add_argument(
        "--item",
        type=_item,
        action="append",
        required=True,
        metavar="PRODUCT[:QTY]",
        help="a catalog product in the cart, quantity 1 unless given; repeatable",
    )
    parser.add_argument(
        "--addon",
        type=_addon,
        action="append",
        default=[],
        metavar="PRODUCT:ADDON[:QTY]",
        help="an add-on of the --item for PRODUCT, quantity 1 unless given; repeatable",
    )
    parser.add_argument(
        "--trial-days",
        "--trial-period-days",
        dest="trial_period_days",
        type=_days,
        default=None,
        metavar="DAYS",
        help="override the product's trial (0 = no trial); without it the product's trial applies",
    )
    parser.add_argument("--return-url", default="", help="where the buyer goes after paying")
    parser.add_argument("--cancel-url", default="", help="where the buyer goes after abandoning the checkout")
    parser.add_argument("--discount-code", default="")
    parser.add_argument("--metadata", type=_pair, action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    parser.add_argument(
        "--allow-additional",
        action="store_true",
        help="let a customer who already has an access-granting subscription buy another (upgrades: change-plan)",
    )
    parser.add_argument("--idempotency-key", default="", help="required; the same key and request replay the session")


def _create_checkout(client: SyncEntitlementsClient, args: argparse.Namespace, timeout: float | None) -> Any:
    return client.create_checkout(
        _cart(args.item, args.addon),
        idempotency_key=args.idempotency_key,
        customer_id=args.customer_id,
        customer_ref=args.customer_ref,
        email=args.email,
        name=args.name,
        trial_period_days=args.trial_period_days,
        return_url=args.return_url,
        cancel_url=args.cancel_url,
        discount_code=args.discount_code,
        metadata=dict(args.metadata),
        allow_additional=args.allow_additional,
        timeout=timeout,
    )


def _create_portal_session_arguments(parser: argparse.ArgumentParser) -> None:
    _customer_options(parser, required=True)
    parser.add_argument("--return-url", default="", help="where the portal's return link goes (default: Dodo's)")
    parser.add_argument("--send-email", action="store_true", help="also e-mail the link to the customer")


def _create_portal_session(client: SyncEntitlementsClient, args: argparse.Namespace, timeout: float | None) -> Any:
    options = {"return_url": args.return_url, "send_email": args.send_email, "timeout": timeout}
    if args.customer_ref is not None:
        return client.create_portal_session(customer_ref=args.customer_ref, **options)
    return client.create_portal_session(args.customer_id, **options)


def _cancel_subscription_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subscription-id", required=True)
    parser.add_argument(
        "--immediately", action="store_true", help="cancel now (default: at the end of the current period)"
    )
    parser.add_argument("--reason", default="", help="why, in the caller's words (a Dodo cancel reason is passed on)")
    parser.add_argument("--idempotency-key", default="", help="required; reuse it to retry safely")


def _cancel_subscription(client: SyncEntitlementsClient, args: argparse.Namespace, timeout: float | None) -> Any:
    return client.cancel_subscription(
        args.subscription_id,
        idempotency_key=args.idempotency_key,
        immediately=args.immediately,
        reason=args.reason,
        timeout=timeout,
    )


def _resume_subscription_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subscription-id", required=True)
    parser.add_argument("--idempotency-key", default="", help="required; reuse it to retry safely")


def _resume_subscription(client: SyncEntitlementsClient, args: argparse.Namespace, timeout: float | None) -> Any:
    return client.resume_subscription(args.subscription_id, idempotency_key=args.idempotency_key, timeout=timeout)


def _list_plans_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _list_plans(client: SyncEntitlementsClient, args: argparse.Namespace, timeout: float | None) -> Any:
    return {"plans": client.list_plans(timeout=timeout)}


def _link_customer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--customer-ref", required=True, help="the company's own id for the customer")
    parser.add_argument("--customer-id", required=True, help="the Dodo customer to link it to (moved if linked)")


def _link_customer(client: SyncEntitlementsClient, args: argparse.Namespace, timeout: float | None) -> Any:
    return client.link_customer(args.customer_ref, args.customer_id, timeout=timeout)


def _create_charge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subscription-id", required=True)
    parser.add_argument("--amount", required=True, type=int, help="minor units of the currency (e.g. cents)")
    parser.add_argument("--currency", default="", help="ISO 4217 code (default: the product's)")
    parser.add_argument("--description", default="", help="the line item's text at Dodo")
    parser.add_argument("--metadata", type=_pair, action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    parser.add_argument("--idempotency-key", default="", help="required; reuse it to retry safely")


def _create_charge(client: SyncEntitlementsClient, args: argparse.Namespace, timeout: float | None) -> Any:
    return client.create_charge(
        args.subscription_id,
        args.amount,
        idempotency_key=args.idempotency_key,
        currency=args.currency,
        description=args.description,
        metadata=dict(args.metadata),
        timeout=timeout,
    )


def _get_charge_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--charge-id")
    which.add_argument("--idempotency-key", help="the key the charge was created with")


def _get_charge(client: SyncEntitlementsClient, args: argparse.Namespace, timeout: float | None) -> Any:
    return client.get_charge(charge_id=args.charge_id, idempotency_key=args.idempotency_key, timeout=timeout)


def _property(text: str) -> tuple[str, str | int | float | bool]:
    """KEY=VALUE: a JSON number or true/false is sent as such (meters aggregate numbers only), anything else as text."""
    key, value = _pair(text)
    if value in ("true", "false"):
        return key, value == "true"
    try:
        number = json.loads(value)
    except ValueError:
        return key, value
    return (key, number) if isinstance(number, int | float) and not isinstance(number, bool) else (key, value)


def _instant(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text[:64]!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a time zone (e.g. Z): {text[:64]!r}")
    return value


def _record_usage_arguments(parser: argparse.ArgumentParser) -> None:
    _customer_options(parser, required=True)
    parser.add_argument("--event-id", required=True, help="unique per customer; reuse it to retry safely")
    parser.add_argument("--event-name", required=True, help="matched to Dodo meters case-sensitively")
    parser.add_argument("--timestamp", type=_instant, help="ISO 8601 (default: now; at most 1 h old)")
    parser.add_argument("--property", type=_property, action="append", default=[], metavar="KEY=VALUE")


def _record_usage(client: SyncEntitlementsClient, args: argparse.Namespace, timeout: float | None) -> Any:
    events = [UsageEvent(args.event_id, args.event_name, args.timestamp, dict(args.property))]
    if args.customer_ref is not None:
        return client.record_usage(customer_ref=args.customer_ref, events=events, timeout=timeout)
    return client.record_usage(args.customer_id, events, timeout=timeout)


def _get_usage_arguments(parser: argparse.ArgumentParser) -> None:
    _customer_options(parser, required=True)
    parser.add_argument("--event-name", required=True)
    parser.add_argument("--start", type=_instant, help="ISO 8601 (default: the current billing period's start)")
    parser.add_argument("--end", type=_instant, help="ISO 8601, exclusive (default: the period's end)")


def _get_usage(client: SyncEntitlementsClient, args: argparse.Namespace, timeout: float | None) -> Any:
    options = {"start": args.start, "end": args.end, "timeout": timeout}
    if args.customer_ref is not None:
        return client.get_usage(customer_ref=args.customer_ref, event_name=args.event_name, **options)
    return client.get_usage(args.customer_id, args.event_name, **options)


def _watch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--customer-id",
        action="append",
        default=[],
        dest="customer_ids",
        help="only this customer's events (repeat it for several, at most 1000); none: every customer",
    )
    parser.add_argument("--after-cursor", default="", help="resume right after this cursor (default: from now)")
    parser.add_argument("--heartbeats", action="store_true", help="also print the HEARTBEAT events")
    parser.add_argument("--max-events", type=_count, default=None, help="exit after printing this many events")


def _watch(client: SyncEntitlementsClient, args: argparse.Namespace, timeout: float | None) -> Iterator[Any]:
    watch = client.watch(args.customer_ids, args.after_cursor, heartbeats=args.heartbeats)
    printed = 0
    try:
        for event in watch:
            yield event
            printed += 1
            if args.max_events is not None and printed >= args.max_events:
                return
    finally:
        watch.close()


def command_name(rpc: str) -> str:
    """CheckAccess -> check-access."""
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in rpc).lstrip("-")


COMMANDS: Mapping[str, Command] = {
    command_name(command.rpc): command
    for command in (
        Command("CheckAccess", "may a customer use a feature right now?", _check_access_arguments, _check_access),
        Command(
            "GetSubscription",
            "a subscription with its access, plan and balances",
            _get_subscription_arguments,
            _get_subscription,
        ),
        Command("ChangePlan", "move a subscription to another plan", _change_plan_arguments, _change_plan),
        Command("ConsumeCredits", "burn credits atomically", _consume_credits_arguments, _consume_credits),
        Command(
            "ListCreditLedger",
            "a customer's ledger for one credit, newest first",
            _list_credit_ledger_arguments,
            _list_credit_ledger,
        ),
        Command(
            "CreateCheckout",
            "open a Dodo checkout session for a cart of catalog products",
            _create_checkout_arguments,
            _create_checkout,
        ),
        Command(
            "CreatePortalSession",
            "a link to Dodo's customer portal (never retried: it may send an e-mail)",
            _create_portal_session_arguments,
            _create_portal_session,
        ),
        Command(
            "CancelSubscription",
            "cancel a subscription at period end, or --immediately",
            _cancel_subscription_arguments,
            _cancel_subscription,
        ),
        Command(
            "ResumeSubscription",
            "undo a scheduled cancellation, or resume a paused subscription",
            _resume_subscription_arguments,
            _resume_subscription,
        ),
        Command("ListPlans", "the catalog's plans with Dodo's prices", _list_plans_arguments, _list_plans),
        Command(
            "LinkCustomer",
            "link (or move) the company's own customer id to a Dodo customer",
            _link_customer_arguments,
            _link_customer,
        ),
        Command(
            "CreateCharge",
            "charge a subscription on demand, never twice for one idempotency key",
            _create_charge_arguments,
            _create_charge,
        ),
        Command("GetCharge", "a charge by id or idempotency key", _get_charge_arguments, _get_charge),
        Command(
            "RecordUsage",
            "record a usage event (sent to Dodo's meters exactly once)",
            _record_usage_arguments,
            _record_usage,
        ),
        Command("GetUsage", "count and sum a customer's usage of one event", _get_usage_arguments, _get_usage),
        Command(
            "WatchEntitlements",
            "follow entitlement changes as JSON lines (resuming by itself; Ctrl-C ends it)",
            _watch_arguments,
            _watch,
            aliases=("watch",),
            stream=True,
        ),
    )
}
ALIASES: Mapping[str, str] = {alias: name for name, command in COMMANDS.items() for alias in command.aliases}
assert {command.rpc for command in COMMANDS.values()} <= set(_rpcs.RPCS)


# --- the program ---------------------------------------------------------------------------------------------------


def _connection_options() -> _Parser:
    """Options accepted before or after the subcommand (SUPPRESS: a later placement never resets an earlier one)."""
    common = _Parser(add_help=False)
    group = common.add_argument_group("connection")
    quiet = argparse.SUPPRESS
    group.add_argument("--target", default=quiet, help=f"host:port (env ENTITLEMENTS_TARGET; default {DEFAULT_TARGET})")
    group.add_argument("--token", default=quiet, help="bearer token (env ENTITLEMENTS_TOKEN)")
    group.add_argument(
        "--timeout", type=_positive_float, default=quiet, help=f"deadline in seconds (default {DEFAULT_TIMEOUT:g})"
    )
    group.add_argument("--max-attempts", type=int, default=quiet, help="attempts of a retry-safe call on UNAVAILABLE")
    group.add_argument("--tls", action="store_true", default=quiet, help="TLS with the system's trusted roots")
    group.add_argument("--ca", default=quiet, metavar="PEM", help="TLS, trusting this CA certificate")
    group.add_argument("--cert", default=quiet, metavar="PEM", help="client certificate (mutual TLS; needs --key)")
    group.add_argument("--key", default=quiet, metavar="PEM", help="client private key (mutual TLS)")
    group.add_argument("--server-name", default=quiet, help="the name the server certificate is checked against")
    return common


def build_parser(prog: str | None = None, stdout: IO[str] | None = None) -> argparse.ArgumentParser:
    common = _connection_options()
    parser = _Parser(prog=prog or "entitlements", description=DESCRIPTION, parents=[common])
    parser.stdout = stdout
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(
            name, aliases=list(command.aliases), help=command.help, description=command.help, parents=[common]
        )
        assert isinstance(sub, _Parser)
        sub.stdout = stdout
        command.arguments(sub)
    return parser


def _client(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[SyncEntitlementsClient, float | None]:
    target = (
        getattr(args, "target", None) or environ.get("ENTITLEMENTS_TARGET") or environ.get("ENTITLEMENTS_GRPC_ADDR")
    )
    token = getattr(args, "token", None) or environ.get("ENTITLEMENTS_TOKEN")
    if not token:
        token = next((t.strip() for t in environ.get("ENTITLEMENTS_API_TOKENS", "").split(",") if t.strip()), None)
    tls: Tls | bool | None = None
    ca, cert, key = (getattr(args, name, None) for name in ("ca", "cert", "key"))
    server_name = getattr(args, "server_name", None)
    if ca or cert or key or server_name:
        tls = Tls.from_files(ca, cert, key, server_name=server_name)
    elif getattr(args, "tls", False):
        tls = True
    attempts = getattr(args, "max_attempts", None)
    retry = RetryPolicy(max_attempts=attempts) if attempts is not None else None
    timeout: float | None = getattr(args, "timeout", DEFAULT_TIMEOUT)
    client = SyncEntitlementsClient(target or DEFAULT_TARGET, token=token, timeout=timeout, tls=tls, retry=retry)
    return client, timeout


def _run(argv: Sequence[str] | None, environ: Mapping[str, str], prog: str | None, out: IO[str]) -> int:
    parser = build_parser(prog, out)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version
        return done.code if isinstance(done.code, int) else 0
    command = COMMANDS[ALIASES.get(args.command, args.command)]
    try:
        client, timeout = _client(args, environ)
    except ValueError as error:
        raise UsageError(str(error)) from None
    with client:
        try:
            result = command.run(client, args, timeout)
            if command.stream:
                for item in result:
                    print(json.dumps(to_jsonable(item), ensure_ascii=False), file=out, flush=True)
                return 0
        except (ValueError, TypeError) as error:  # refused before anything was sent
            raise UsageError(str(error)) from None
    print(json.dumps(to_jsonable(result), indent=2, ensure_ascii=False), file=out)
    return 0


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    prog: str | None = None,
) -> int:
    """Run one command; the exit status is returned (console scripts pass it to sys.exit)."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        return _run(argv, os.environ if environ is None else environ, prog, out)
    except UsageError as error:
        print(f"error: {_one_line(str(error))} (see --help)", file=err)
        return EXIT_USAGE
    except EntitlementsError as error:
        print(f"error: {_one_line(str(error))}", file=err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("error: interrupted", file=err)
        return EXIT_INTERRUPTED
    except Exception as error:
        print(f"error: unexpected failure: {type(error).__name__}: {_one_line(str(error))}", file=err)
        return EXIT_FAILED
