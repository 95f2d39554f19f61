"""Callers with names and scopes (DESIGN §14), against the real server on port 0: each RPC needs its scope, a known
caller without it is PERMISSION_DENIED / CALLER_SCOPE_MISSING, a missing or unknown token stays UNAUTHENTICATED,
the old ENTITLEMENTS_API_TOKENS keep meaning every scope, and the caller's name reaches the use case."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeAlias

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from sqlalchemy import select

from service.app.dodo_gateway import DodoGateway
from service.domain.catalog import Catalog
from service.domain.errors import ConfigurationError
from service.grpc.interceptors import LEGACY_CALLER, Scope, parse_callers, required_scope
from service.server import Running, start
from storage.engine import Database
from storage.models import PlanChangeRequest
from tests.fakedodo import FakeDodo
from tests.support import DODO_API_KEY, TEAM, FakeClock, error_info, make_settings

Stub: TypeAlias = "pb_grpc.EntitlementServiceAsyncStub"
Metadata = tuple[tuple[str, str], ...]
Call = Callable[[Stub, Metadata], Awaitable[object]]

CALLERS = (
    "dashboard:tok-dashboard-1:check,"
    "meter:tok-meter-2:consume,"
    "shop:tok-shop-3:billing,"
    "backoffice:tok-backoffice:4:check+consume+billing"  # a token may contain ':'
)
TOKENS = {
    "dashboard": "tok-dashboard-1",
    "meter": "tok-meter-2",
    "shop": "tok-shop-3",
    "backoffice": "tok-backoffice:4",
}
SCOPES = {
    "dashboard": {"check"},
    "meter": {"consume"},
    "shop": {"billing"},
    "backoffice": {"check", "consume", "billing"},
}
LEGACY_TOKEN = "old-shared-token"
UNKNOWN_CUSTOMER = "cus_0Zz9Yy8Xx7Ww6Vv5Uu4Tt"


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


# One call per RPC, each answered by the use case (success or a domain error) once auth lets it through.
RPCS: dict[str, tuple[str, Call]] = {
    "CheckAccess": (
        "check",
        lambda stub, md: stub.CheckAccess(
            pb.CheckAccessRequest(customer_id=UNKNOWN_CUSTOMER, feature="dashboard"), metadata=md
        ),
    ),
    "GetSubscription": (
        "check",
        lambda stub, md: stub.GetSubscription(pb.GetSubscriptionRequest(customer_id=UNKNOWN_CUSTOMER), metadata=md),
    ),
    "ListCreditLedger": (
        "check",
        lambda stub, md: stub.ListCreditLedger(
            pb.ListCreditLedgerRequest(customer_id=UNKNOWN_CUSTOMER, credit="ai_tokens"), metadata=md
        ),
    ),
    "ConsumeCredits": (
        "consume",
        lambda stub, md: stub.ConsumeCredits(
            pb.ConsumeCreditsRequest(
                customer_id=UNKNOWN_CUSTOMER, credit="ai_tokens", amount="1", idempotency_key="k-1"
            ),
            metadata=md,
        ),
    ),
    "ChangePlan": (
        "billing",
        # No subscription id: INVALID_ARGUMENT from the use case, before Dodo is asked anything.
        lambda stub, md: stub.ChangePlan(pb.ChangePlanRequest(product_id=TEAM, idempotency_key="k-2"), metadata=md),
    ),
}


async def outcome(call: Awaitable[object]) -> grpc.aio.AioRpcError | None:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error
    return None


def refused_by_auth(error: grpc.aio.AioRpcError | None) -> bool:
    if error is None or error.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return False
    return error.code() == grpc.StatusCode.UNAUTHENTICATED or error_info(error).reason == "CALLER_SCOPE_MISSING"


@asynccontextmanager
async def serving(
    database_url: str, clock: FakeClock, catalog: Catalog, fake_dodo: FakeDodo, **env: str
) -> AsyncIterator[tuple[Running, Stub]]:
    """The real server with these settings, and a stub whose calls carry whatever metadata the test gives."""
    running = await start(
        make_settings(database_url, **env),
        clock=clock,
        catalog=catalog,
        db=Database.from_url(database_url, pool_size=4),
        dodo=DodoGateway(DODO_API_KEY, fake_dodo.base_url, timeout=1.0, read_max_retries=0),
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
            yield running, pb_grpc.EntitlementServiceStub(channel)
    finally:
        await running.stop(0)


@pytest.fixture
async def scoped(
    database_url: str, db: Database, clock: FakeClock, catalog: Catalog, fake_dodo: FakeDodo
) -> AsyncIterator[Stub]:
    async with serving(
        database_url, clock, catalog, fake_dodo, ENTITLEMENTS_CALLERS=CALLERS, ENTITLEMENTS_API_TOKENS=LEGACY_TOKEN
    ) as (_, stub):
        yield stub


# ------------------------------------------------------------------------------------------------ scopes


@pytest.mark.parametrize("rpc", sorted(RPCS))
async def test_each_rpc_is_answered_for_callers_with_its_scope_and_refused_for_the_others(
    scoped: Stub, rpc: str
) -> None:
    scope, call = RPCS[rpc]

    for caller, token in TOKENS.items():
        error = await outcome(call(scoped, bearer(token)))

        if scope in SCOPES[caller]:
            assert not refused_by_auth(error), (caller, error)
        else:
            assert error is not None, caller
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, caller
            info = error_info(error)
            assert (info.reason, info.domain, dict(info.metadata)) == (
                "CALLER_SCOPE_MISSING",
                "entitlements.v1",
                {"scope": scope},
            )
            assert scope in (error.details() or "")
            assert token not in (error.details() or "")


@pytest.mark.parametrize("rpc", sorted(RPCS))
async def test_the_old_api_tokens_still_mean_every_scope(scoped: Stub, rpc: str) -> None:
    _, call = RPCS[rpc]

    assert not refused_by_auth(await outcome(call(scoped, bearer(LEGACY_TOKEN))))


@pytest.mark.parametrize(
    "metadata",
    [(), bearer("tok-dashboard"), bearer("tok-dashboard-1x"), (("authorization", "Basic tok-dashboard-1"),)],
    ids=["no-token", "prefix-of-a-token", "token-plus-a-character", "basic-scheme"],
)
async def test_a_missing_or_unknown_token_stays_unauthenticated_not_permission_denied(
    scoped: Stub, metadata: Metadata
) -> None:
    for rpc, (_, call) in RPCS.items():
        error = await outcome(call(scoped, metadata))

        assert error is not None, rpc
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, rpc
        assert "token" in (error.details() or "")


async def test_health_needs_no_token_and_reflection_any_valid_caller_whatever_its_scopes(
    database_url: str, db: Database, clock: FakeClock, catalog: Catalog, fake_dodo: FakeDodo
) -> None:
    async with (
        serving(database_url, clock, catalog, fake_dodo, ENTITLEMENTS_CALLERS=CALLERS, ENTITLEMENTS_API_TOKENS="") as (
            running,
            _,
        ),
        grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel,
    ):
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        reflect = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        listing = [reflection_pb2.ServerReflectionRequest(list_services="")]

        health = await check(health_pb2.HealthCheckRequest())
        (listed,) = [response async for response in reflect(iter(listing), metadata=bearer(TOKENS["meter"]))]
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            _ = [response async for response in reflect(iter(listing))]

    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "entitlements.v1.EntitlementService" in {service.name for service in listed.list_services_response.service}
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_every_rpc_maps_to_the_scope_of_design_14_and_an_unknown_method_needs_billing() -> None:
    service = "/entitlements.v1.EntitlementService/"
    wanted = {
        "CheckAccess": Scope.CHECK,
        "GetSubscription": Scope.CHECK,
        "ListCreditLedger": Scope.CHECK,
        "ConsumeCredits": Scope.CONSUME,
        "ChangePlan": Scope.BILLING,
        "ListPlans": Scope.CHECK,
        "CreateCheckout": Scope.BILLING,
        "CreatePortalSession": Scope.BILLING,
        "CancelSubscription": Scope.BILLING,
        "ResumeSubscription": Scope.BILLING,
        "LinkCustomer": Scope.BILLING,
        "RecordUsage": Scope.CONSUME,
        "GetUsage": Scope.CHECK,
        "CreateCharge": Scope.BILLING,
        "GetCharge": Scope.BILLING,
        "WatchEntitlements": Scope.CHECK,
    }
    contract = {method.name for method in pb.DESCRIPTOR.services_by_name["EntitlementService"].methods}

    assert contract <= set(wanted), "a new RPC needs a decision here (and in interceptors._METHOD_SCOPES)"
    assert {name: required_scope(service + name) for name in wanted} == wanted
    assert required_scope("/some.other.Service/Method") == Scope.BILLING
    assert required_scope("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None


# --------------------------------------------------------------------------------------------- the caller's name


@pytest.mark.parametrize(
    ("env", "token", "stored_as"),
    [
        ({"ENTITLEMENTS_CALLERS": CALLERS, "ENTITLEMENTS_API_TOKENS": ""}, TOKENS["shop"], "shop"),
        ({"ENTITLEMENTS_CALLERS": CALLERS, "ENTITLEMENTS_API_TOKENS": ""}, TOKENS["backoffice"], "backoffice"),
        ({"ENTITLEMENTS_API_TOKENS": f"{LEGACY_TOKEN},another-token"}, "another-token", LEGACY_CALLER),
        ({"ENTITLEMENTS_API_TOKENS": ""}, "", ""),
    ],
    ids=["named-caller", "another-named-caller", "old-api-token", "auth-off"],
)
async def test_the_authenticated_callers_name_reaches_the_plan_change_record(
    database_url: str,
    db: Database,
    clock: FakeClock,
    catalog: Catalog,
    fake_dodo: FakeDodo,
    env: dict[str, str],
    token: str,
    stored_as: str,
) -> None:
    fake_dodo.frozen_now = clock.now
    sub = fake_dodo.add_subscription()
    request = pb.ChangePlanRequest(subscription_id=sub["subscription_id"], product_id=TEAM, idempotency_key="order-1")

    async with serving(database_url, clock, catalog, fake_dodo, **env) as (_, stub):
        await stub.ChangePlan(request, metadata=bearer(token) if token else ())

    async with db.session() as session:
        stored = (await session.execute(select(PlanChangeRequest.caller, PlanChangeRequest.status))).all()
    assert [tuple(row) for row in stored] == [(stored_as, "completed")]


# ------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("callers", "api_tokens", "says"),
    [
        ("web:tok-web", "", "entry 1: expected name:token:scope+scope"),
        ("web:tok-web:", "", "entry 1: expected name:token:scope+scope"),
        (":tok-web:check", "", "entry 1: expected name:token:scope+scope"),
        ("web::check", "", "entry 1: expected name:token:scope+scope"),
        ("ok:tok-ok:check,web", "", "entry 2: expected name:token:scope+scope"),
        ("web:tok-web:check+admin", "", "entry 1 ('web'): unknown scope 'admin'"),
        ("web:tok-web:check+", "", "entry 1 ('web'): unknown scope ''"),
        ("w e b:tok-web:check", "", "entry 1: caller name 'w e b' must be"),
        ("web:tok web:check", "", "entry 1 ('web'): the token must not contain whitespace"),
        ("web:tok-web-1:check,web:tok-web-2:billing", "", "caller name 'web' is used twice"),
        ("web:tok-web:check,app:tok-web:billing", "", "callers 'web' and 'app' have the same token"),
        ("web:tok-web:check", "tok-web", "callers 'web' and 'default' have the same token"),
        (
            "default:tok-web:check",
            "tok-legacy",
            "the name 'default' is taken by the callers of ENTITLEMENTS_API_TOKENS",
        ),
    ],
    ids=[
        "no-scopes-part",
        "empty-scopes",
        "empty-name",
        "empty-token",
        "second-entry",
        "unknown-scope",
        "empty-scope",
        "name-with-spaces",
        "token-with-spaces",
        "duplicate-name",
        "duplicate-token",
        "token-also-in-api-tokens",
        "name-default-with-api-tokens",
    ],
)
def test_a_malformed_callers_entry_is_a_configuration_error_that_names_it_and_never_the_token(
    callers: str, api_tokens: str, says: str
) -> None:
    with pytest.raises(ConfigurationError) as refused:
        parse_callers(callers, [api_tokens] if api_tokens else [])

    message = str(refused.value)
    assert says in message
    for secret in ("tok-web", "tok web", "tok-legacy", "tok-web-1", "tok-web-2", "tok-ok"):
        assert secret not in message


def test_callers_parse_into_names_tokens_and_scopes_and_the_old_tokens_into_default_with_every_scope() -> None:
    parsed = parse_callers(" dashboard:tok-d:check , ,ops:tok:o:check+billing+check", ["legacy-2", "legacy-1"])

    assert [(caller.name, caller.token, caller.scopes) for caller in parsed] == [
        ("dashboard", b"tok-d", frozenset({Scope.CHECK})),
        ("ops", b"tok:o", frozenset({Scope.CHECK, Scope.BILLING})),
        ("default", b"legacy-1", frozenset(Scope)),
        ("default", b"legacy-2", frozenset(Scope)),
    ]
    assert "tok-d" not in repr(parsed)
    assert parse_callers("", []) == ()


async def test_the_server_refuses_to_start_with_malformed_callers(
    database_url: str, clock: FakeClock, catalog: Catalog, fake_dodo: FakeDodo
) -> None:
    with pytest.raises(ConfigurationError, match="unknown scope 'admin'"):
        async with serving(database_url, clock, catalog, fake_dodo, ENTITLEMENTS_CALLERS="ops:tok-ops:admin"):
            pass  # pragma: no cover  # start() raises
