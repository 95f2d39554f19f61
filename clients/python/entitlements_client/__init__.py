"""A typed Python client for entitlements.v1 (the Dodo Payments entitlement service): async and blocking clients for
every RPC, plain dataclasses out, typed exceptions with the server's ErrorInfo, deadlines, safe retries, TLS.

    from entitlements_client import EntitlementsClient

    async with EntitlementsClient("127.0.0.1:50051", token=token) as client:
        decision = await client.check_access("cus_123", "dashboard")
        if decision.allowed:
            ...

`SyncEntitlementsClient` has the same methods without `await`. `client.watch()` follows every entitlement change
(resuming by itself from its cursor); `client.local()` is an in-process cache of CheckAccess answers kept right by
that stream. `python -m entitlements_client` (or the
`entitlements` command) is the CLI.
"""

from __future__ import annotations

from entitlements.v1 import entitlements_pb2 as pb
from entitlements_client._clients import DEFAULT_TIMEOUT, EntitlementsClient, SyncEntitlementsClient
from entitlements_client._local import LocalCacheStats, LocalEntitlements, Policy, StreamState, SyncLocalEntitlements
from entitlements_client._version import __version__
from entitlements_client._watch import EntitlementWatch, SyncEntitlementWatch
from entitlements_client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    CursorExpired,
    DeadlineExceeded,
    EntitlementsError,
    FailedPrecondition,
    InsufficientCredits,
    Internal,
    InvalidArgument,
    InvalidCursor,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SubscriberTooSlow,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from entitlements_client.models import (
    AccessDecision,
    AccessReason,
    CancelSubscriptionResult,
    ChangePlanResult,
    CheckAccessResult,
    CheckoutAddon,
    CheckoutItem,
    CheckoutSession,
    ConsumeCreditsResult,
    CreditLedgerEntry,
    CreditLedgerPage,
    CustomerLink,
    EffectiveAt,
    EntitlementEvent,
    EntitlementEventKind,
    FeatureKind,
    Plan,
    PortalSession,
    ProrationMode,
    RecordUsageResult,
    ResumeSubscriptionResult,
    ScheduledChange,
    Subscription,
    Usage,
    UsageDelivery,
    UsageEvent,
)
from entitlements_client.options import NO_RETRY, ReconnectPolicy, RetryPolicy, Tls

__all__ = [
    "DEFAULT_TIMEOUT",
    "NO_RETRY",
    "Aborted",
    "AccessDecision",
    "AccessReason",
    "AlreadyExists",
    "CancelSubscriptionResult",
    "Cancelled",
    "ChangePlanResult",
    "CheckAccessResult",
    "CheckoutAddon",
    "CheckoutItem",
    "CheckoutSession",
    "ConsumeCreditsResult",
    "CreditLedgerEntry",
    "CreditLedgerPage",
    "CursorExpired",
    "CustomerLink",
    "DeadlineExceeded",
    "EffectiveAt",
    "EntitlementEvent",
    "EntitlementEventKind",
    "EntitlementWatch",
    "EntitlementsClient",
    "EntitlementsError",
    "FailedPrecondition",
    "FeatureKind",
    "InsufficientCredits",
    "Internal",
    "InvalidArgument",
    "InvalidCursor",
    "LocalCacheStats",
    "LocalEntitlements",
    "NotFound",
    "PermissionDenied",
    "Plan",
    "Policy",
    "PortalSession",
    "ProrationMode",
    "ReconnectPolicy",
    "RecordUsageResult",
    "ResourceExhausted",
    "ResumeSubscriptionResult",
    "RetryPolicy",
    "ScheduledChange",
    "StreamState",
    "SubscriberTooSlow",
    "Subscription",
    "SyncEntitlementWatch",
    "SyncEntitlementsClient",
    "SyncLocalEntitlements",
    "Tls",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Usage",
    "UsageDelivery",
    "UsageEvent",
    "__version__",
    "pb",
]
