"""CreateCheckout: a Dodo checkout session for a cart of catalog products, idempotent per (caller, key).

The company's own customer id rides in the session's metadata (ENTITLEMENTS_CUSTOMER_REF_KEY), so the
subscription it creates, and its webhooks, link the ref to the Dodo customer. A customer who already has an
access-granting subscription is refused (ALREADY_SUBSCRIBED) unless the caller allows an additional one: upgrades
go through ChangePlan. A session Dodo may have opened for a lost answer is harmless (unused, it expires in 24 h),
so a retry after a timeout opens a fresh one; a replay of a completed key returns the stored session.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import urlsplit

from service.app.customers import Customers
from service.app.dodo_gateway import DodoGateway
from service.app.entitlement_cache import EntitlementCache
from service.domain import access_rules as access
from service.domain import fingerprints, limits
from service.domain.catalog import Catalog
from service.domain.clock import Clock
from service.domain.errors import (
    AlreadySubscribed,
    IdempotencyKeyReused,
    InvalidField,
    ProductNotInCatalog,
    RequestInFlight,
)
from service.domain.values import CheckoutCustomer, CheckoutItem, CheckoutSession
from storage.engine import Database
from storage.repositories.checkouts import CheckoutClaim, CheckoutRepository

log = logging.getLogger("entitlements.checkouts")

MAX_ITEMS = 20
MAX_QUANTITY = 10_000
MAX_TRIAL_DAYS = 10_000
MAX_URL = 2_048
MAX_EMAIL = 254


@dataclass(frozen=True, slots=True)
class CheckoutRequest:
    items: tuple[CheckoutItem, ...]
    idempotency_key: str
    customer_id: str = ""
    customer_ref: str = ""
    email: str = ""
    name: str = ""
    trial_period_days: int | None = None
    return_url: str = ""
    cancel_url: str = ""
    discount_code: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    allow_additional: bool = False
    caller: str = ""


@dataclass(frozen=True, slots=True)
class CheckoutResult:
    session: CheckoutSession
    replayed: bool = False


class Checkouts:
    def __init__(
        self,
        db: Database,
        catalog: Catalog,
        clock: Clock,
        dodo: DodoGateway,
        cache: EntitlementCache,
        customers: Customers,
        *,
        customer_ref_key: str = "customer_ref",
        lease: timedelta = timedelta(seconds=60),
    ) -> None:
        self.db = db
        self.catalog = catalog
        self.clock = clock
        self.dodo = dodo
        self.cache = cache
        self.customers = customers
        self.customer_ref_key = customer_ref_key
        self.lease = lease

    def _validate(self, request: CheckoutRequest) -> None:
        if not request.items:
            raise InvalidField("items", "items must name at least one product")
        if len(request.items) > MAX_ITEMS:
            raise InvalidField("items", f"items holds more than {MAX_ITEMS} products ({len(request.items)})")
        for item in request.items:
            limits.check_id("items.product_id", item.product_id)
            if self.catalog.plan(item.product_id) is None:
                raise ProductNotInCatalog(item.product_id)
            if not 0 <= item.quantity <= MAX_QUANTITY:
                raise InvalidField("items.quantity", f"quantity must be between 0 (= 1) and {MAX_QUANTITY}")
            for addon in item.addons:
                limits.check_id("items.addons.addon_id", addon.addon_id)
                if not 1 <= addon.quantity <= MAX_QUANTITY:
                    raise InvalidField("items.addons.quantity", f"quantity must be between 1 and {MAX_QUANTITY}")
        if request.customer_id and request.customer_ref:
            raise InvalidField("customer_ref", "give customer_id or customer_ref, not both")
        limits.check_id("customer_id", request.customer_id, required=False)
        limits.check_id("customer_ref", request.customer_ref, required=False)
        if request.email and (len(request.email) > MAX_EMAIL or "@" not in request.email.strip("@")):
            raise InvalidField("email", "email must be an e-mail address")
        limits.check_text("email", request.email, max_length=MAX_EMAIL)
        limits.check_text("name", request.name, max_length=limits.MAX_ID)
        if not (request.customer_id or request.customer_ref or request.email):
            raise InvalidField("customer_id", "name the customer: customer_id, customer_ref or email")
        if request.trial_period_days is not None and not 0 <= request.trial_period_days <= MAX_TRIAL_DAYS:
            raise InvalidField("trial_period_days", f"trial_period_days must be between 0 and {MAX_TRIAL_DAYS}")
        for name, url in (("return_url", request.return_url), ("cancel_url", request.cancel_url)):
            check_url(name, url)
        limits.check_id("discount_code", request.discount_code, required=False)
        limits.check_metadata("metadata", request.metadata)
        given_ref = request.metadata.get(self.customer_ref_key)
        if request.customer_ref and given_ref is not None and given_ref != request.customer_ref:
            raise InvalidField("metadata", f"metadata.{self.customer_ref_key} is set from customer_ref")
        limits.check_id("idempotency_key", request.idempotency_key)

    async def create(self, request: CheckoutRequest) -> CheckoutResult:
        self._validate(request)
        customer_id = request.customer_id
        if request.customer_ref:
            customer_id = await self.customers.resolve("", request.customer_ref) or ""
            if not customer_id and not request.email:
                raise InvalidField("email", "email is required for a customer Dodo does not know yet")
        if customer_id and not request.allow_additional:
            await self._refuse_if_subscribed(customer_id)
        key = request.idempotency_key
        async with self.db.tx() as connection:
            claim = await CheckoutRepository(connection).claim(
                caller=request.caller, key=key, fingerprint=_fingerprint(request), lease=self.lease
            )
        if isinstance(claim, CheckoutSession):
            return CheckoutResult(claim, replayed=True)
        if claim is CheckoutClaim.OTHER_PARAMETERS:
            raise IdempotencyKeyReused("idempotency_key was already used for a different checkout")
        if claim is CheckoutClaim.IN_FLIGHT:
            raise RequestInFlight("a checkout with this idempotency key is being opened; retry shortly")
        metadata = dict(request.metadata)
        if request.customer_ref:
            metadata[self.customer_ref_key] = request.customer_ref
        try:
            session = await self.dodo.create_checkout(
                items=tuple(_counted(item) for item in request.items),
                customer=CheckoutCustomer(customer_id=customer_id, email=request.email, name=request.name)
                if customer_id
                else CheckoutCustomer(email=request.email, name=request.name),
                trial_period_days=request.trial_period_days,
                return_url=request.return_url or None,
                cancel_url=request.cancel_url or None,
                discount_code=request.discount_code or None,
                metadata=metadata,
            )
        except BaseException:
            async with self.db.tx() as connection:
                await CheckoutRepository(connection).forget(caller=request.caller, key=key)
            raise
        async with self.db.tx() as connection:
            await CheckoutRepository(connection).complete(
                caller=request.caller, key=key, session=session, customer_ref=request.customer_ref or None
            )
        log.info(
            "checkout.created",
            extra={"session_id": session.session_id, "customer_ref": request.customer_ref, "caller": request.caller},
        )
        return CheckoutResult(session)

    async def _refuse_if_subscribed(self, customer_id: str) -> None:
        customer = await self.cache.get(customer_id, balances=False)
        best = access.best(customer.subscriptions, self.catalog, self.clock())
        if best is not None and best[1].allowed:
            raise AlreadySubscribed(best[0].subscription_id)


def _counted(item: CheckoutItem) -> CheckoutItem:
    return item if item.quantity else CheckoutItem(item.product_id, 1, item.addons)


def _fingerprint(request: CheckoutRequest) -> str:
    return fingerprints.fingerprint(
        {
            "items": [
                [item.product_id, item.quantity or 1, [[a.addon_id, a.quantity] for a in item.addons]]
                for item in request.items
            ],
            "customer": [request.customer_id, request.customer_ref, request.email, request.name],
            "trial": request.trial_period_days,
            "urls": [request.return_url, request.cancel_url],
            "discount": request.discount_code,
            "metadata": dict(request.metadata),
            "allow_additional": request.allow_additional,
        }
    )


def check_url(name: str, url: str) -> None:
    if not url:
        return
    parts = urlsplit(url)
    printable = not any(ord(character) <= 0x20 or 0x7F <= ord(character) <= 0x9F for character in url)
    if len(url) > MAX_URL or not printable or parts.scheme not in ("https", "http") or not parts.netloc:
        raise InvalidField(name, f"{name} must be an http(s) URL of at most {MAX_URL} characters")
