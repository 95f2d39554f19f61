"""The async (`EntitlementsClient`) and blocking (`SyncEntitlementsClient`) clients: the same methods, arguments and
results; one channel per client, reused by every call (create one per process and share it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, TypeVar, overload

import grpc
from google.protobuf.message import Message

from entitlements.v1 import entitlements_pb2 as pb
from entitlements_client import _rpcs
from entitlements_client._local import LocalEntitlements, Policy, SyncLocalEntitlements, local_options
from entitlements_client._rpcs import Deadline, Rpc
from entitlements_client._watch import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    EntitlementWatch,
    SyncEntitlementWatch,
    WatchStateListener,
)
from entitlements_client.errors import from_rpc_error
from entitlements_client.models import (
    CancelSubscriptionResult,
    ChangePlanResult,
    Charge,
    ChargeResult,
    CheckAccessResult,
    CheckoutItem,
    CheckoutSession,
    ConsumeCreditsResult,
    CreditLedgerEntry,
    CreditLedgerPage,
    CustomerLink,
    EffectiveAt,
    Plan,
    PortalSession,
    ProrationMode,
    RecordUsageResult,
    ResumeSubscriptionResult,
    Subscription,
    Usage,
    UsageEvent,
)
from entitlements_client.options import ChannelSpec, ReconnectPolicy, RetryPolicy, Tls

__all__ = ["DEFAULT_TIMEOUT", "EntitlementsClient", "SyncEntitlementsClient"]

Clock = Callable[[], datetime]

DEFAULT_TIMEOUT = 5.0

RequestT = TypeVar("RequestT", bound=Message)
ResultT = TypeVar("ResultT")


class _Base:
    def __init__(
        self,
        target: str,
        *,
        token: str | None,
        timeout: float | None,
        tls: Tls | bool | None,
        retry: RetryPolicy | None,
        options: tuple[tuple[str, str | int], ...],
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive (or None for no deadline)")
        self._spec = ChannelSpec.build(target, token=token, tls=tls, options=options)
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._callables: dict[str, Any] = {}

    @property
    def target(self) -> str:
        return self._spec.target

    def _deadline(self, timeout: float | None) -> Deadline:
        return Deadline(self._timeout if timeout is None else timeout)

    def _attempts(self, rpc: Rpc[RequestT, Any, Any], request: RequestT) -> int:
        return self._retry.max_attempts if rpc.retry_safe(request) else 1


class EntitlementsClient(_Base):
    """Async client (grpc.aio). Use it as `async with EntitlementsClient(...) as client:` or call `close()`.

    `timeout` is every call's default deadline in seconds (None: none), overridable per call; it bounds all attempts
    of a call together. `retry` applies to UNAVAILABLE answers of calls that are safe to repeat (reads, previews,
    LinkCustomer, and writes with an idempotency key); others (CreatePortalSession, a write without a key) are tried
    once. `tls=True` uses the system's roots, or pass a `Tls`.

    Methods that name a customer take the Dodo `customer_id` (positionally) or, as a keyword, `customer_ref`, the
    company's own id for the customer: exactly one of the two, else ValueError before anything is sent.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        tls: Tls | bool | None = None,
        retry: RetryPolicy | None = None,
        options: tuple[tuple[str, str | int], ...] = (),
    ) -> None:
        super().__init__(target, token=token, timeout=timeout, tls=tls, retry=retry, options=options)
        spec = self._spec
        self._channel = (
            grpc.aio.secure_channel(spec.target, spec.credentials, options=spec.options)
            if spec.credentials is not None
            else grpc.aio.insecure_channel(spec.target, options=spec.options)
        )

    async def __aenter__(self) -> EntitlementsClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, rpc: Rpc[RequestT, Any, ResultT], request: RequestT, timeout: float | None) -> ResultT:
        method = self._callables.get(rpc.name)
        if method is None:
            method = self._channel.unary_unary(
                rpc.path, request_serializer=rpc.serialize, response_deserializer=rpc.deserialize
            )
            self._callables[rpc.name] = method
        deadline = self._deadline(timeout)
        attempts = self._attempts(rpc, request)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await method(request, timeout=deadline.remaining(), metadata=self._spec.metadata)
            except grpc.RpcError as error:
                failure = from_rpc_error(error)
                if attempt >= attempts or failure.code != grpc.StatusCode.UNAVAILABLE:
                    raise failure from error
                pause = self._retry.backoff(attempt)
                if not deadline.allows_sleep(pause):
                    raise failure from error
                await asyncio.sleep(pause)
            else:
                return rpc.convert(response)

    @overload
    async def check_access(
        self, customer_id: str, feature: str, *, timeout: float | None = None
    ) -> CheckAccessResult: ...

    @overload
    async def check_access(
        self, *, customer_ref: str, feature: str, timeout: float | None = None
    ) -> CheckAccessResult: ...

    async def check_access(
        self,
        customer_id: str | None = None,
        feature: str | None = None,
        *,
        customer_ref: str | None = None,
        timeout: float | None = None,
    ) -> CheckAccessResult:
        """May the customer use `feature` (a boolean feature, a limit or a credit key) right now? An unlinked
        `customer_ref` answers NO_SUBSCRIPTION."""
        request = _rpcs.check_access_request(customer_id, customer_ref, feature)
        return await self._call(_rpcs.CHECK_ACCESS, request, timeout)

    async def get_subscription(
        self,
        *,
        subscription_id: str | None = None,
        customer_id: str | None = None,
        customer_ref: str | None = None,
        timeout: float | None = None,
    ) -> Subscription:
        """One subscription by id, or the customer's most relevant one (granting first, then the newest)."""
        request = _rpcs.get_subscription_request(subscription_id, customer_id, customer_ref)
        return await self._call(_rpcs.GET_SUBSCRIPTION, request, timeout)

    @overload
    async def change_plan(
        self, request: pb.ChangePlanRequest, /, *, timeout: float | None = None
    ) -> ChangePlanResult: ...

    @overload
    async def change_plan(
        self,
        subscription_id: str,
        product_id: str,
        *,
        quantity: int = 0,
        proration_mode: ProrationMode | int = ProrationMode.UNSPECIFIED,
        effective_at: EffectiveAt | int = EffectiveAt.UNSPECIFIED,
        idempotency_key: str = "",
        preview: bool = False,
        timeout: float | None = None,
    ) -> ChangePlanResult: ...

    async def change_plan(
        self,
        subscription_id: str | pb.ChangePlanRequest,
        product_id: str = "",
        *,
        quantity: int = 0,
        proration_mode: ProrationMode | int = ProrationMode.UNSPECIFIED,
        effective_at: EffectiveAt | int = EffectiveAt.UNSPECIFIED,
        idempotency_key: str = "",
        preview: bool = False,
        timeout: float | None = None,
    ) -> ChangePlanResult:
        """Move a subscription to `product_id` through Dodo (or, with `preview`, price the change only). A change
        needs an `idempotency_key`: retrying with the same key never changes the plan twice."""
        request = (
            subscription_id
            if isinstance(subscription_id, pb.ChangePlanRequest)
            else _rpcs.change_plan_request(
                subscription_id,
                product_id,
                quantity=quantity,
                proration_mode=proration_mode,
                effective_at=effective_at,
                idempotency_key=idempotency_key,
                preview=preview,
            )
        )
        return await self._call(_rpcs.CHANGE_PLAN, request, timeout)

    @overload
    async def consume_credits(
        self,
        customer_id: str,
        credit: str,
        amount: str | Decimal | int,
        idempotency_key: str,
        *,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ConsumeCreditsResult: ...

    @overload
    async def consume_credits(
        self,
        *,
        customer_ref: str,
        credit: str,
        amount: str | Decimal | int,
        idempotency_key: str,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ConsumeCreditsResult: ...

    async def consume_credits(
        self,
        customer_id: str | None = None,
        credit: str | None = None,
        amount: str | Decimal | int | None = None,
        idempotency_key: str | None = None,
        *,
        customer_ref: str | None = None,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ConsumeCreditsResult:
        """Burn `amount` of `credit` atomically; the same `idempotency_key` replays the first answer."""
        request = _rpcs.consume_credits_request(
            customer_id, customer_ref, credit, amount, idempotency_key, description=description, metadata=metadata
        )
        return await self._call(_rpcs.CONSUME_CREDITS, request, timeout)

    @overload
    async def list_credit_ledger(
        self, customer_id: str, credit: str, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> CreditLedgerPage: ...

    @overload
    async def list_credit_ledger(
        self, *, customer_ref: str, credit: str, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> CreditLedgerPage: ...

    async def list_credit_ledger(
        self,
        customer_id: str | None = None,
        credit: str | None = None,
        *,
        customer_ref: str | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> CreditLedgerPage:
        """One page of the ledger, newest first (`page_size` 0 = the server's default of 50)."""
        request = _rpcs.list_credit_ledger_request(
            customer_id, customer_ref, credit, page_size=page_size, page_token=page_token
        )
        return await self._call(_rpcs.LIST_CREDIT_LEDGER, request, timeout)

    @overload
    def iter_credit_ledger(
        self, customer_id: str, credit: str, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[CreditLedgerEntry]: ...

    @overload
    def iter_credit_ledger(
        self, *, customer_ref: str, credit: str, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[CreditLedgerEntry]: ...

    async def iter_credit_ledger(
        self,
        customer_id: str | None = None,
        credit: str | None = None,
        *,
        customer_ref: str | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[CreditLedgerEntry]:
        """Every entry, newest first, page after page (`timeout` applies to each page)."""
        token = ""
        while True:
            request = _rpcs.list_credit_ledger_request(
                customer_id, customer_ref, credit, page_size=page_size, page_token=token
            )
            page = await self._call(_rpcs.LIST_CREDIT_LEDGER, request, timeout)
            for entry in page.entries:
                yield entry
            token = page.next_page_token
            if not token:
                return

    async def create_checkout(
        self,
        items: Sequence[CheckoutItem | str],
        *,
        idempotency_key: str,
        customer_id: str | None = None,
        customer_ref: str | None = None,
        email: str = "",
        name: str = "",
        trial_period_days: int | None = None,
        return_url: str = "",
        cancel_url: str = "",
        discount_code: str = "",
        metadata: Mapping[str, str] | None = None,
        allow_additional: bool = False,
        timeout: float | None = None,
    ) -> CheckoutSession:
        """Open a Dodo checkout session for a cart of catalog products (`CheckoutItem`s, or product ids for one of
        each). The payer is a Dodo `customer_id`, a `customer_ref` (linked once the checkout completes), or neither
        with an `email` for a new customer. `trial_period_days` None keeps the product's trial (0: none). A customer
        with an access-granting subscription is refused (ALREADY_SUBSCRIBED) unless `allow_additional`. The same
        `idempotency_key` and request return the stored session (`replayed`), so retrying is safe."""
        request = _rpcs.create_checkout_request(
            items,
            idempotency_key=idempotency_key,
            customer_id=customer_id,
            customer_ref=customer_ref,
            email=email,
            name=name,
            trial_period_days=trial_period_days,
            return_url=return_url,
            cancel_url=cancel_url,
            discount_code=discount_code,
            metadata=metadata,
            allow_additional=allow_additional,
        )
        return await self._call(_rpcs.CREATE_CHECKOUT, request, timeout)

    @overload
    async def create_portal_session(
        self, customer_id: str, *, return_url: str = "", send_email: bool = False, timeout: float | None = None
    ) -> PortalSession: ...

    @overload
    async def create_portal_session(
        self, *, customer_ref: str, return_url: str = "", send_email: bool = False, timeout: float | None = None
    ) -> PortalSession: ...

    async def create_portal_session(
        self,
        customer_id: str | None = None,
        *,
        customer_ref: str | None = None,
        return_url: str = "",
        send_email: bool = False,
        timeout: float | None = None,
    ) -> PortalSession:
        """A link to Dodo's customer portal for the customer (`send_email`: also mail it to them). Never retried:
        it has no idempotency key, and a repeat could mail the customer twice."""
        request = _rpcs.create_portal_session_request(
            customer_id, customer_ref, return_url=return_url, send_email=send_email
        )
        return await self._call(_rpcs.CREATE_PORTAL_SESSION, request, timeout)

    async def cancel_subscription(
        self,
        subscription_id: str,
        *,
        idempotency_key: str,
        immediately: bool = False,
        reason: str = "",
        timeout: float | None = None,
    ) -> CancelSubscriptionResult:
        """Cancel at the end of the current period (access stays until then), or `immediately`. `reason` is kept
        with the request (one of Dodo's cancel reasons is passed on as such). Retrying with the same
        `idempotency_key` never cancels twice."""
        request = _rpcs.cancel_subscription_request(
            subscription_id, idempotency_key=idempotency_key, immediately=immediately, reason=reason
        )
        return await self._call(_rpcs.CANCEL_SUBSCRIPTION, request, timeout)

    async def resume_subscription(
        self, subscription_id: str, *, idempotency_key: str, timeout: float | None = None
    ) -> ResumeSubscriptionResult:
        """Undo a scheduled cancellation, or resume a paused subscription (FAILED_PRECONDITION when there is
        nothing to resume). Retrying with the same `idempotency_key` is safe."""
        request = _rpcs.resume_subscription_request(subscription_id, idempotency_key=idempotency_key)
        return await self._call(_rpcs.RESUME_SUBSCRIPTION, request, timeout)

    async def list_plans(self, *, timeout: float | None = None) -> tuple[Plan, ...]:
        """The catalog's plans, with Dodo's prices when the service has API access (else `price` is None)."""
        return await self._call(_rpcs.LIST_PLANS, pb.ListPlansRequest(), timeout)

    async def link_customer(self, customer_ref: str, customer_id: str, *, timeout: float | None = None) -> CustomerLink:
        """Link the company's own `customer_ref` to the Dodo `customer_id`, moving it if it was linked elsewhere."""
        request = _rpcs.link_customer_request(customer_ref, customer_id)
        return await self._call(_rpcs.LINK_CUSTOMER, request, timeout)

    @overload
    async def record_usage(
        self, customer_id: str, events: Iterable[UsageEvent], *, timeout: float | None = None
    ) -> RecordUsageResult: ...

    @overload
    async def record_usage(
        self, *, customer_ref: str, events: Iterable[UsageEvent], timeout: float | None = None
    ) -> RecordUsageResult: ...

    async def record_usage(
        self,
        customer_id: str | None = None,
        events: Iterable[UsageEvent] | None = None,
        *,
        customer_ref: str | None = None,
        timeout: float | None = None,
    ) -> RecordUsageResult:
        """Record 1–1000 usage events durably (shipped to Dodo's meters exactly once). Safe to retry: an event id
        already recorded for the customer counts in `duplicates` and is never recorded or sent twice."""
        if events is None:
            raise TypeError("missing required argument: 'events'")
        request = _rpcs.record_usage_request(customer_id, customer_ref, events)
        return await self._call(_rpcs.RECORD_USAGE, request, timeout)

    @overload
    async def get_usage(
        self,
        customer_id: str,
        event_name: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        timeout: float | None = None,
    ) -> Usage: ...

    @overload
    async def get_usage(
        self,
        *,
        customer_ref: str,
        event_name: str,
        start: datetime | None = None,
        end: datetime | None = None,
        timeout: float | None = None,
    ) -> Usage: ...

    async def get_usage(
        self,
        customer_id: str | None = None,
        event_name: str | None = None,
        *,
        customer_ref: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        timeout: float | None = None,
    ) -> Usage:
        """Count, numeric sums and delivery state of one event name's usage in [start, end) (default: the current
        billing period, or the last 30 days without a subscription)."""
        request = _rpcs.get_usage_request(customer_id, customer_ref, event_name, start=start, end=end)
        return await self._call(_rpcs.GET_USAGE, request, timeout)

    async def create_charge(
        self,
        subscription_id: str,
        amount: int,
        *,
        idempotency_key: str,
        currency: str = "",
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ChargeResult:
        """Charge the subscription `amount` minor units of `currency` ("" = the product's) on demand. Retrying with
        the same `idempotency_key` never charges twice; a charge whose answer from Dodo was lost is UNKNOWN until
        the server resolves it (retry, or read it with `get_charge`)."""
        request = _rpcs.create_charge_request(
            subscription_id,
            amount,
            idempotency_key=idempotency_key,
            currency=currency,
            description=description,
            metadata=metadata,
        )
        return await self._call(_rpcs.CREATE_CHARGE, request, timeout)

    async def get_charge(
        self, *, charge_id: str | None = None, idempotency_key: str | None = None, timeout: float | None = None
    ) -> Charge:
        """A charge by its id or by the idempotency key that created it (this caller's)."""
        request = _rpcs.get_charge_request(charge_id, idempotency_key)
        return await self._call(_rpcs.GET_CHARGE, request, timeout)

    def watch(
        self,
        customer_ids: Sequence[str] = (),
        after_cursor: str = "",
        *,
        heartbeats: bool = False,
        reconnect: ReconnectPolicy | None = None,
        heartbeat_timeout: float | None = DEFAULT_HEARTBEAT_TIMEOUT,
        on_state: WatchStateListener | None = None,
    ) -> EntitlementWatch:
        """Every entitlement change of `customer_ids` (empty: every customer) after `after_cursor` (empty: from
        now), in commit order, then live: `async for event in client.watch(): ...`. It resumes by itself from its
        last cursor (`.cursor`) after UNAVAILABLE or WATCH_SUBSCRIBER_TOO_SLOW, with `reconnect`'s backoff, and
        raises CursorExpired / InvalidCursor (never retried) and any other failure. `heartbeats` also yields the
        HEARTBEAT events (the first one means "caught up"); `on_state(watch)` is called when the stream goes live
        or down. `aclose()` ends it. The client's `timeout` does not apply."""
        return EntitlementWatch(
            self._channel,
            customer_ids,
            after_cursor,
            metadata=self._spec.metadata,
            heartbeats=heartbeats,
            reconnect=reconnect,
            heartbeat_timeout=heartbeat_timeout,
            on_state=on_state,
        )

    watch_entitlements = watch

    def local(
        self,
        *,
        policies: Mapping[str, Policy] | None = None,
        default_policy: Policy = Policy.FAIL_CLOSED,
        max_staleness: float = 30.0,
        max_entries: int = 100_000,
        customer_ids: Sequence[str] = (),
        clock: Clock | None = None,
        reconnect: ReconnectPolicy | None = None,
        heartbeat_timeout: float | None = DEFAULT_HEARTBEAT_TIMEOUT,
        settle: float = 0.25,
    ) -> LocalEntitlements:
        """A local cache of CheckAccess answers kept right by the watch stream (`async with client.local() as
        local: await local.check_access(...)`): see `entitlements_client.LocalEntitlements`. `policies` maps
        features to FAIL_OPEN / FAIL_CLOSED (else `default_policy`) for while the stream is down; `max_staleness`
        bounds FAIL_OPEN answers then (seconds); `customer_ids` limits the stream (and so what may be cached
        usefully) to those customers; `clock` (aware UTC datetimes) decides expiry at `access_ends_at`; answers about a
        customer changed in the last `settle` seconds are not cached (the answering replica may lag the stream)."""
        options = local_options(
            policies=policies,
            default_policy=default_policy,
            max_staleness=max_staleness,
            max_entries=max_entries,
            customer_ids=customer_ids,
            clock=clock,
            reconnect=reconnect,
            heartbeat_timeout=heartbeat_timeout,
            settle=settle,
        )
        return LocalEntitlements(self, options)


class SyncEntitlementsClient(_Base):
    """Blocking client: the same methods as `EntitlementsClient`, for code without an event loop. Thread-safe."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        tls: Tls | bool | None = None,
        retry: RetryPolicy | None = None,
        options: tuple[tuple[str, str | int], ...] = (),
    ) -> None:
        super().__init__(target, token=token, timeout=timeout, tls=tls, retry=retry, options=options)
        spec = self._spec
        self._channel = (
            grpc.secure_channel(spec.target, spec.credentials, options=spec.options)
            if spec.credentials is not None
            else grpc.insecure_channel(spec.target, options=spec.options)
        )

    def __enter__(self) -> SyncEntitlementsClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, rpc: Rpc[RequestT, Any, ResultT], request: RequestT, timeout: float | None) -> ResultT:
        method = self._callables.get(rpc.name)
        if method is None:
            method = self._channel.unary_unary(
                rpc.path, request_serializer=rpc.serialize, response_deserializer=rpc.deserialize
            )
            self._callables[rpc.name] = method
        deadline = self._deadline(timeout)
        attempts = self._attempts(rpc, request)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = method(request, timeout=deadline.remaining(), metadata=self._spec.metadata)
            except grpc.RpcError as error:
                failure = from_rpc_error(error)
                if attempt >= attempts or failure.code != grpc.StatusCode.UNAVAILABLE:
                    raise failure from error
                pause = self._retry.backoff(attempt)
                if not deadline.allows_sleep(pause):
                    raise failure from error
                time.sleep(pause)
            else:
                return rpc.convert(response)

    @overload
    def check_access(self, customer_id: str, feature: str, *, timeout: float | None = None) -> CheckAccessResult: ...

    @overload
    def check_access(self, *, customer_ref: str, feature: str, timeout: float | None = None) -> CheckAccessResult: ...

    def check_access(
        self,
        customer_id: str | None = None,
        feature: str | None = None,
        *,
        customer_ref: str | None = None,
        timeout: float | None = None,
    ) -> CheckAccessResult:
        """May the customer use `feature` (a boolean feature, a limit or a credit key) right now? An unlinked
        `customer_ref` answers NO_SUBSCRIPTION."""
        request = _rpcs.check_access_request(customer_id, customer_ref, feature)
        return self._call(_rpcs.CHECK_ACCESS, request, timeout)

    def get_subscription(
        self,
        *,
        subscription_id: str | None = None,
        customer_id: str | None = None,
        customer_ref: str | None = None,
        timeout: float | None = None,
    ) -> Subscription:
        """One subscription by id, or the customer's most relevant one (granting first, then the newest)."""
        request = _rpcs.get_subscription_request(subscription_id, customer_id, customer_ref)
        return self._call(_rpcs.GET_SUBSCRIPTION, request, timeout)

    def change_plan(
        self,
        subscription_id: str,
        product_id: str,
        *,
        quantity: int = 0,
        proration_mode: ProrationMode | int = ProrationMode.UNSPECIFIED,
        effective_at: EffectiveAt | int = EffectiveAt.UNSPECIFIED,
        idempotency_key: str = "",
        preview: bool = False,
        timeout: float | None = None,
    ) -> ChangePlanResult:
        """Move a subscription to `product_id` through Dodo (or, with `preview`, price the change only). A change
        needs an `idempotency_key`: retrying with the same key never changes the plan twice."""
        request = _rpcs.change_plan_request(
            subscription_id,
            product_id,
            quantity=quantity,
            proration_mode=proration_mode,
            effective_at=effective_at,
            idempotency_key=idempotency_key,
            preview=preview,
        )
        return self._call(_rpcs.CHANGE_PLAN, request, timeout)

    @overload
    def consume_credits(
        self,
        customer_id: str,
        credit: str,
        amount: str | Decimal | int,
        idempotency_key: str,
        *,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ConsumeCreditsResult: ...

    @overload
    def consume_credits(
        self,
        *,
        customer_ref: str,
        credit: str,
        amount: str | Decimal | int,
        idempotency_key: str,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ConsumeCreditsResult: ...

    def consume_credits(
        self,
        customer_id: str | None = None,
        credit: str | None = None,
        amount: str | Decimal | int | None = None,
        idempotency_key: str | None = None,
        *,
        customer_ref: str | None = None,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ConsumeCreditsResult:
        """Burn `amount` of `credit` atomically; the same `idempotency_key` replays the first answer."""
        request = _rpcs.consume_credits_request(
            customer_id, customer_ref, credit, amount, idempotency_key, description=description, metadata=metadata
        )
        return self._call(_rpcs.CONSUME_CREDITS, request, timeout)

    @overload
    def list_credit_ledger(
        self, customer_id: str, credit: str, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> CreditLedgerPage: ...

    @overload
    def list_credit_ledger(
        self, *, customer_ref: str, credit: str, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> CreditLedgerPage: ...

    def list_credit_ledger(
        self,
        customer_id: str | None = None,
        credit: str | None = None,
        *,
        customer_ref: str | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> CreditLedgerPage:
        """One page of the ledger, newest first (`page_size` 0 = the server's default of 50)."""
        request = _rpcs.list_credit_ledger_request(
            customer_id, customer_ref, credit, page_size=page_size, page_token=page_token
        )
        return self._call(_rpcs.LIST_CREDIT_LEDGER, request, timeout)

    @overload
    def iter_credit_ledger(
        self, customer_id: str, credit: str, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[CreditLedgerEntry]: ...

    @overload
    def iter_credit_ledger(
        self, *, customer_ref: str, credit: str, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[CreditLedgerEntry]: ...

    def iter_credit_ledger(
        self,
        customer_id: str | None = None,
        credit: str | None = None,
        *,
        customer_ref: str | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[CreditLedgerEntry]:
        """Every entry, newest first, page after page (`timeout` applies to each page)."""
        token = ""
        while True:
            request = _rpcs.list_credit_ledger_request(
                customer_id, customer_ref, credit, page_size=page_size, page_token=token
            )
            page = self._call(_rpcs.LIST_CREDIT_LEDGER, request, timeout)
            yield from page.entries
            token = page.next_page_token
            if not token:
                return

    def create_checkout(
        self,
        items: Sequence[CheckoutItem | str],
        *,
        idempotency_key: str,
        customer_id: str | None = None,
        customer_ref: str | None = None,
        email: str = "",
        name: str = "",
        trial_period_days: int | None = None,
        return_url: str = "",
        cancel_url: str = "",
        discount_code: str = "",
        metadata: Mapping[str, str] | None = None,
        allow_additional: bool = False,
        timeout: float | None = None,
    ) -> CheckoutSession:
        """Open a Dodo checkout session for a cart of catalog products (`CheckoutItem`s, or product ids for one of
        each). The payer is a Dodo `customer_id`, a `customer_ref` (linked once the checkout completes), or neither
        with an `email` for a new customer. `trial_period_days` None keeps the product's trial (0: none). A customer
        with an access-granting subscription is refused (ALREADY_SUBSCRIBED) unless `allow_additional`. The same
        `idempotency_key` and request return the stored session (`replayed`), so retrying is safe."""
        request = _rpcs.create_checkout_request(
            items,
            idempotency_key=idempotency_key,
            customer_id=customer_id,
            customer_ref=customer_ref,
            email=email,
            name=name,
            trial_period_days=trial_period_days,
            return_url=return_url,
            cancel_url=cancel_url,
            discount_code=discount_code,
            metadata=metadata,
            allow_additional=allow_additional,
        )
        return self._call(_rpcs.CREATE_CHECKOUT, request, timeout)

    @overload
    def create_portal_session(
        self, customer_id: str, *, return_url: str = "", send_email: bool = False, timeout: float | None = None
    ) -> PortalSession: ...

    @overload
    def create_portal_session(
        self, *, customer_ref: str, return_url: str = "", send_email: bool = False, timeout: float | None = None
    ) -> PortalSession: ...

    def create_portal_session(
        self,
        customer_id: str | None = None,
        *,
        customer_ref: str | None = None,
        return_url: str = "",
        send_email: bool = False,
        timeout: float | None = None,
    ) -> PortalSession:
        """A link to Dodo's customer portal for the customer (`send_email`: also mail it to them). Never retried:
        it has no idempotency key, and a repeat could mail the customer twice."""
        request = _rpcs.create_portal_session_request(
            customer_id, customer_ref, return_url=return_url, send_email=send_email
        )
        return self._call(_rpcs.CREATE_PORTAL_SESSION, request, timeout)

    def cancel_subscription(
        self,
        subscription_id: str,
        *,
        idempotency_key: str,
        immediately: bool = False,
        reason: str = "",
        timeout: float | None = None,
    ) -> CancelSubscriptionResult:
        """Cancel at the end of the current period (access stays until then), or `immediately`. `reason` is kept
        with the request (one of Dodo's cancel reasons is passed on as such). Retrying with the same
        `idempotency_key` never cancels twice."""
        request = _rpcs.cancel_subscription_request(
            subscription_id, idempotency_key=idempotency_key, immediately=immediately, reason=reason
        )
        return self._call(_rpcs.CANCEL_SUBSCRIPTION, request, timeout)

    def resume_subscription(
        self, subscription_id: str, *, idempotency_key: str, timeout: float | None = None
    ) -> ResumeSubscriptionResult:
        """Undo a scheduled cancellation, or resume a paused subscription (FAILED_PRECONDITION when there is
        nothing to resume). Retrying with the same `idempotency_key` is safe."""
        request = _rpcs.resume_subscription_request(subscription_id, idempotency_key=idempotency_key)
        return self._call(_rpcs.RESUME_SUBSCRIPTION, request, timeout)

    def list_plans(self, *, timeout: float | None = None) -> tuple[Plan, ...]:
        """The catalog's plans, with Dodo's prices when the service has API access (else `price` is None)."""
        return self._call(_rpcs.LIST_PLANS, pb.ListPlansRequest(), timeout)

    def link_customer(self, customer_ref: str, customer_id: str, *, timeout: float | None = None) -> CustomerLink:
        """Link the company's own `customer_ref` to the Dodo `customer_id`, moving it if it was linked elsewhere."""
        request = _rpcs.link_customer_request(customer_ref, customer_id)
        return self._call(_rpcs.LINK_CUSTOMER, request, timeout)

    @overload
    def record_usage(
        self, customer_id: str, events: Iterable[UsageEvent], *, timeout: float | None = None
    ) -> RecordUsageResult: ...

    @overload
    def record_usage(
        self, *, customer_ref: str, events: Iterable[UsageEvent], timeout: float | None = None
    ) -> RecordUsageResult: ...

    def record_usage(
        self,
        customer_id: str | None = None,
        events: Iterable[UsageEvent] | None = None,
        *,
        customer_ref: str | None = None,
        timeout: float | None = None,
    ) -> RecordUsageResult:
        """Record 1–1000 usage events durably (shipped to Dodo's meters exactly once). Safe to retry: an event id
        already recorded for the customer counts in `duplicates` and is never recorded or sent twice."""
        if events is None:
            raise TypeError("missing required argument: 'events'")
        request = _rpcs.record_usage_request(customer_id, customer_ref, events)
        return self._call(_rpcs.RECORD_USAGE, request, timeout)

    @overload
    def get_usage(
        self,
        customer_id: str,
        event_name: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        timeout: float | None = None,
    ) -> Usage: ...

    @overload
    def get_usage(
        self,
        *,
        customer_ref: str,
        event_name: str,
        start: datetime | None = None,
        end: datetime | None = None,
        timeout: float | None = None,
    ) -> Usage: ...

    def get_usage(
        self,
        customer_id: str | None = None,
        event_name: str | None = None,
        *,
        customer_ref: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        timeout: float | None = None,
    ) -> Usage:
        """Count, numeric sums and delivery state of one event name's usage in [start, end) (default: the current
        billing period, or the last 30 days without a subscription)."""
        request = _rpcs.get_usage_request(customer_id, customer_ref, event_name, start=start, end=end)
        return self._call(_rpcs.GET_USAGE, request, timeout)

    def create_charge(
        self,
        subscription_id: str,
        amount: int,
        *,
        idempotency_key: str,
        currency: str = "",
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ChargeResult:
        """Charge the subscription `amount` minor units of `currency` ("" = the product's) on demand. Retrying with
        the same `idempotency_key` never charges twice; a charge whose answer from Dodo was lost is UNKNOWN until
        the server resolves it (retry, or read it with `get_charge`)."""
        request = _rpcs.create_charge_request(
            subscription_id,
            amount,
            idempotency_key=idempotency_key,
            currency=currency,
            description=description,
            metadata=metadata,
        )
        return self._call(_rpcs.CREATE_CHARGE, request, timeout)

    def get_charge(
        self, *, charge_id: str | None = None, idempotency_key: str | None = None, timeout: float | None = None
    ) -> Charge:
        """A charge by its id or by the idempotency key that created it (this caller's)."""
        request = _rpcs.get_charge_request(charge_id, idempotency_key)
        return self._call(_rpcs.GET_CHARGE, request, timeout)

    def watch(
        self,
        customer_ids: Sequence[str] = (),
        after_cursor: str = "",
        *,
        heartbeats: bool = False,
        reconnect: ReconnectPolicy | None = None,
        heartbeat_timeout: float | None = DEFAULT_HEARTBEAT_TIMEOUT,
        on_state: WatchStateListener | None = None,
    ) -> SyncEntitlementWatch:
        """Every entitlement change of `customer_ids` (empty: every customer) after `after_cursor` (empty: from
        now), in commit order, then live: `for event in client.watch(): ...`. It resumes by itself from its
        last cursor (`.cursor`) after UNAVAILABLE or WATCH_SUBSCRIBER_TOO_SLOW, with `reconnect`'s backoff, and
        raises CursorExpired / InvalidCursor (never retried) and any other failure. `heartbeats` also yields the
        HEARTBEAT events (the first one means "caught up"); `on_state(watch)` is called when the stream goes live
        or down. `close()` (from any thread) ends it. The client's `timeout` does not apply."""
        return SyncEntitlementWatch(
            self._channel,
            customer_ids,
            after_cursor,
            metadata=self._spec.metadata,
            heartbeats=heartbeats,
            reconnect=reconnect,
            heartbeat_timeout=heartbeat_timeout,
            on_state=on_state,
        )

    watch_entitlements = watch

    def local(
        self,
        *,
        policies: Mapping[str, Policy] | None = None,
        default_policy: Policy = Policy.FAIL_CLOSED,
        max_staleness: float = 30.0,
        max_entries: int = 100_000,
        customer_ids: Sequence[str] = (),
        clock: Clock | None = None,
        reconnect: ReconnectPolicy | None = None,
        heartbeat_timeout: float | None = DEFAULT_HEARTBEAT_TIMEOUT,
        settle: float = 0.25,
    ) -> SyncLocalEntitlements:
        """A local cache of CheckAccess answers kept right by the watch stream (`with client.local() as local:
        local.check_access(...)`): see `entitlements_client.SyncLocalEntitlements`. `policies` maps
        features to FAIL_OPEN / FAIL_CLOSED (else `default_policy`) for while the stream is down; `max_staleness`
        bounds FAIL_OPEN answers then (seconds); `customer_ids` limits the stream (and so what may be cached
        usefully) to those customers; `clock` (aware UTC datetimes) decides expiry at `access_ends_at`; answers about a
        customer changed in the last `settle` seconds are not cached (the answering replica may lag the stream)."""
        options = local_options(
            policies=policies,
            default_policy=default_policy,
            max_staleness=max_staleness,
            max_entries=max_entries,
            customer_ids=customer_ids,
            clock=clock,
            reconnect=reconnect,
            heartbeat_timeout=heartbeat_timeout,
            settle=settle,
        )
        return SyncLocalEntitlements(self, options)
