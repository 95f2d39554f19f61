"""Domain errors. Each names a condition and carries its gRPC and HTTP status on its base; one interceptor and one
aiohttp middleware map them, so expected outcomes never surface as UNKNOWN, INTERNAL or 500.

The bases (`InvalidArgument`, `NotFound`, `FailedPrecondition`, ...) are what transports map; code raises the
named condition. `ConfigurationError` is not a domain error: it stops a process at start, and only `__main__`
turns it into an exit code.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

QUOTE_LIMIT = 64


def quote(value: str) -> str:
    """Caller input inside a message (DESIGN §12): repr'd and cut to QUOTE_LIMIT characters."""
    if len(value) <= QUOTE_LIMIT:
        return repr(value)
    return repr(value[:QUOTE_LIMIT]) + f"… ({len(value)} characters)"


class ConfigurationError(Exception):
    """The process cannot start as configured (empty webhook key, bad catalog, port taken, schema not at head)."""


class DomainError(Exception):
    grpc_code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION
    http_status: int = 409
    # google.rpc.ErrorInfo reason, for callers that must branch on the condition.
    reason: str = ""

    def __init__(self, message: str, *, reason: str = "", metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


# --- the bases, one per status ---------------------------------------------------------------------------------


class InvalidArgument(DomainError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFound(DomainError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class FailedPrecondition(DomainError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409


class ResourceExhausted(DomainError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class PermissionDenied(DomainError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class Unavailable(DomainError):
    """A dependency (Postgres, Dodo) is unreachable or busy: safe to retry. The one family for every such case."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class Internal(DomainError):
    """Our own misconfiguration (e.g. Dodo refusing our API key): generic to the caller, loud in the logs."""

    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500


# --- invalid input ---------------------------------------------------------------------------------------------


class InvalidField(InvalidArgument):
    """One request field breaks its rule (DESIGN §12); ErrorInfo FIELD_INVALID names it in metadata `field`."""

    reason = "FIELD_INVALID"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, metadata={"field": field})
        self.field = field


class MissingField(InvalidField):
    def __init__(self, field: str) -> None:
        super().__init__(field, f"{field} is required")


class UnknownFeature(InvalidField):
    def __init__(self, feature: str) -> None:
        super().__init__("feature", f"unknown feature {quote(feature)}: not a feature, limit or credit of the catalog")


class UnknownCredit(InvalidField):
    def __init__(self, credit: str) -> None:
        super().__init__("credit", f"unknown credit {quote(credit)}: not a credit of the catalog")


class InvalidAmount(InvalidField):
    pass


class InvalidPageToken(InvalidField):
    def __init__(self) -> None:
        super().__init__("page_token", "page_token is not one this service issued")


class ProductNotInCatalog(InvalidField):
    reason = "PRODUCT_NOT_IN_CATALOG"

    def __init__(self, product_id: str) -> None:
        super().__init__("product_id", f"product {quote(product_id)} is not in the plan catalog")


class PlanUnchanged(InvalidArgument):
    def __init__(self) -> None:
        super().__init__("the subscription already has this product and quantity")


class MalformedPayload(InvalidArgument):
    """A signed webhook (or a Dodo answer) whose body is not what Dodo sends: not JSON, no type/data, unreadable."""


# --- not found -------------------------------------------------------------------------------------------------


class SubscriptionNotFound(NotFound):
    def __init__(self, subscription_id: str, *, at_dodo: bool = False) -> None:
        where = " at Dodo" if at_dodo else ""
        super().__init__(f"subscription {quote(subscription_id)} not found{where}")
        self.subscription_id = subscription_id


class CustomerNotFound(NotFound):
    """A Dodo customer id that Dodo (or, with `at_dodo=False`, this service) does not know."""

    def __init__(self, customer_id: str, *, at_dodo: bool = False) -> None:
        where = " at Dodo" if at_dodo else ""
        super().__init__(f"customer {quote(customer_id)} not found{where}")
        self.customer_id = customer_id


class CustomerRefNotLinked(NotFound):
    reason = "CUSTOMER_REF_NOT_LINKED"

    def __init__(self, customer_ref: str) -> None:
        super().__init__(f"customer_ref {quote(customer_ref)} is not linked to a Dodo customer")


class CustomerNotKnown(NotFound):
    def __init__(self, customer_id: str) -> None:
        super().__init__(f"customer {quote(customer_id)} is not known here (no subscription or payment seen)")


class CustomerHasNoSubscription(NotFound):
    def __init__(self, customer_id: str) -> None:
        super().__init__(f"customer {quote(customer_id)} has no subscription")


class ChargeNotFound(NotFound):
    """CreateCharge/GetCharge: no charge of this caller has that charge_id or idempotency key."""

    def __init__(self, selector: str) -> None:
        super().__init__(f"charge {quote(selector)} not found")


# --- preconditions ---------------------------------------------------------------------------------------------


class IdempotencyKeyReused(FailedPrecondition):
    reason = "IDEMPOTENCY_KEY_REUSED"


class AlreadySubscribed(FailedPrecondition):
    reason = "ALREADY_SUBSCRIBED"

    def __init__(self, subscription_id: str) -> None:
        super().__init__(
            "the customer already has a subscription that grants access; change its plan with ChangePlan, or set "
            "allow_additional for a second subscription",
            metadata={"subscription_id": subscription_id},
        )


class NothingToResume(FailedPrecondition):
    def __init__(self, status: str) -> None:
        super().__init__(f"subscription is {quote(status)} with no scheduled cancellation: nothing to resume")


class SubscriptionNotActive(FailedPrecondition):
    def __init__(self, status: str) -> None:
        super().__init__(f"subscription is {quote(status)}; only an active subscription can change plan")


class PlanChangeAlreadyScheduled(FailedPrecondition):
    def __init__(self) -> None:
        super().__init__("a plan change is already scheduled for this subscription")


class PlanChangeInProgress(FailedPrecondition):
    """Another mutation of this subscription (any idempotency key, any caller) is in flight at Dodo: mutations of
    one subscription go one at a time, so two prorations never overlap. Retry once it has finished."""

    reason = "PLAN_CHANGE_IN_PROGRESS"

    def __init__(self) -> None:
        super().__init__("another change of this subscription is in progress; retry once it has finished")


class DodoRefused(FailedPrecondition):
    """Dodo understood the request and refused it (409, 422, other 4xx): sending it again won't help."""

    def __init__(self, message: str, *, status: int, code: str | None = None) -> None:
        super().__init__(f"Dodo refused the request: {message or f'HTTP {status}'}")
        self.dodo_message = message
        self.status = status
        self.code = code


# --- credits ---------------------------------------------------------------------------------------------------


class InsufficientCredits(ResourceExhausted):
    http_status = 402
    reason = "INSUFFICIENT_CREDITS"


class CreditAccessDenied(PermissionDenied):
    """Consuming a credit the customer has no access to; the reason is the AccessReason code."""


# --- unavailable -----------------------------------------------------------------------------------------------


class StorageUnavailable(Unavailable):
    def __init__(self) -> None:
        super().__init__("storage unavailable, retry later")


class StorageBusy(Unavailable):
    """Every connection this kind of work may use is taken: fail fast rather than queue without bound."""

    def __init__(self, budget: str) -> None:
        super().__init__(f"storage busy ({budget} connections all in use), retry later")
        self.budget = budget


class ConsumeQueueFull(Unavailable):
    def __init__(self, bound: int) -> None:
        super().__init__(f"too many consumptions queued in this process (over {bound}); retry shortly")


class AccountBusy(Unavailable):
    def __init__(self) -> None:
        super().__init__("the credit account is locked by another transaction; retry shortly")


class RequestInFlight(Unavailable):
    """Another attempt with the same idempotency key holds it right now."""


class DodoUnavailable(Unavailable):
    """No usable answer from Dodo (timeout, connection error, 429, 5xx, unreadable body): the call may be retried.

    `outcome_unknown` is True when the request may have reached Dodo and taken effect (a read timeout, a 5xx):
    after a mutation, read the state back before deciding whether to send it again.
    """

    def __init__(
        self, detail: str, *, status: int | None = None, outcome_unknown: bool = True, message: str = ""
    ) -> None:
        super().__init__(message or f"Dodo is unavailable ({detail}); safe to retry")
        self.detail = detail
        self.status = status
        self.outcome_unknown = outcome_unknown


# --- our own configuration -------------------------------------------------------------------------------------


class DodoNotConfigured(FailedPrecondition):
    """No Dodo API key is set: calls that need Dodo cannot be made by this deployment (access checks still work)."""

    reason = "DODO_NOT_CONFIGURED"

    def __init__(self) -> None:
        super().__init__("this service has no Dodo API access configured (DODO_PAYMENTS_API_KEY is unset)")


class DodoMisconfigured(Internal):
    """Dodo refused our API key, or none is configured: every call fails until an operator acts."""

    def __init__(self, detail: str, *, status: int | None = None) -> None:
        super().__init__("the request could not be made: the service is misconfigured")
        self.detail = detail
        self.status = status


# --- the watch stream ------------------------------------------------------------------------------------------


class CursorExpired(FailedPrecondition):
    """The events after this cursor are past retention (ENTITLEMENTS_WATCH_RETENTION_HOURS): start afresh."""

    reason = "CURSOR_EXPIRED"


class WatchSubscriberTooSlow(ResourceExhausted):
    """The stream's buffer filled because its reader fell behind; resume from `cursor` (ErrorInfo metadata)."""

    reason = "WATCH_SUBSCRIBER_TOO_SLOW"

    def __init__(self, cursor: str, buffered: int) -> None:
        super().__init__(
            f"the stream fell {buffered} events behind; resume from the cursor in ErrorInfo metadata",
            metadata={"cursor": cursor},
        )
        self.cursor = cursor
