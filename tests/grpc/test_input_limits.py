"""Input limits at the edge (DESIGN §12): every field of every request is bounded and checked before any work, and
breaking a limit is INVALID_ARGUMENT naming the field (ErrorInfo FIELD_INVALID), with a short message that quotes at
most 64 characters of input. A fuzz run over every request message never gets UNKNOWN or INTERNAL, and nothing
with a control character is stored."""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.engine import Database
from tests.support import CUSTOMER_ID, PRO, SUB_ID, WebhookPoster, deliver, error_info, load_event

Stub: TypeAlias = "pb_grpc.EntitlementServiceAsyncStub"

LONG_ID = "c" * 256
NUL = "cus_\x00evil"
BELL = "ring\x07"
MAX_MESSAGE = 400  # enough to name the field and the rule and quote 64 characters (repr: up to 4 each)


def consume(**fields: Any) -> pb.ConsumeCreditsRequest:
    base: dict[str, Any] = {"customer_id": CUSTOMER_ID, "credit": "ai_tokens", "amount": "1", "idempotency_key": "k"}
    return pb.ConsumeCreditsRequest(**{**base, **fields})


def ledger(**fields: Any) -> pb.ListCreditLedgerRequest:
    return pb.ListCreditLedgerRequest(**{"customer_id": CUSTOMER_ID, "credit": "ai_tokens", **fields})


def check(**fields: Any) -> pb.CheckAccessRequest:
    return pb.CheckAccessRequest(**{"customer_id": CUSTOMER_ID, "feature": "dashboard", **fields})


CASES: list[tuple[str, str, Any]] = [
    ("CheckAccess", "customer_id", check(customer_id=LONG_ID)),
    ("CheckAccess", "customer_id", check(customer_id=NUL)),
    ("CheckAccess", "customer_id", check(customer_id="line\u2028separator")),
    ("CheckAccess", "customer_id", check(customer_id="..")),
    ("CheckAccess", "feature", check(feature="dash\x00board")),
    ("CheckAccess", "feature", check(feature="f" * 10_000)),
    ("GetSubscription", "subscription_id", pb.GetSubscriptionRequest(subscription_id=NUL)),
    ("GetSubscription", "customer_id", pb.GetSubscriptionRequest(customer_id=LONG_ID)),
    ("ConsumeCredits", "customer_id", consume(customer_id=NUL)),
    ("ConsumeCredits", "idempotency_key", consume(idempotency_key="k" * 10_000)),
    ("ConsumeCredits", "idempotency_key", consume(idempotency_key="key\x00")),
    ("ConsumeCredits", "amount", consume(amount="1e400")),
    ("ConsumeCredits", "amount", consume(amount="٣")),
    ("ConsumeCredits", "description", consume(description="d" * 1_001)),
    ("ConsumeCredits", "description", consume(description=BELL)),
    ("ConsumeCredits", "description", consume(description="x" * 3_500_000)),
    ("ConsumeCredits", "metadata", consume(metadata={f"k{n}": "v" for n in range(51)})),
    ("ConsumeCredits", "metadata", consume(metadata={"k" * 41: "v"})),
    ("ConsumeCredits", "metadata", consume(metadata={"k": "v" * 501})),
    ("ConsumeCredits", "metadata", consume(metadata={"k": "v\x00"})),
    ("ConsumeCredits", "metadata", consume(metadata={"": "v"})),
    ("ConsumeCredits", "metadata", consume(metadata={str(n): "v" for n in range(20_000)})),
    ("ListCreditLedger", "page_size", ledger(page_size=501)),
    ("ListCreditLedger", "page_size", ledger(page_size=-1)),
    ("ListCreditLedger", "page_token", ledger(page_token="t" * 10_000)),
    ("ListCreditLedger", "customer_id", ledger(customer_id=NUL)),
]


@pytest.mark.parametrize(("rpc", "field", "request_"), CASES, ids=[f"{c[0]}-{c[1]}-{n}" for n, c in enumerate(CASES)])
async def test_a_field_over_its_limit_is_invalid_argument_naming_the_field(
    stub: Stub, db: Database, rpc: str, field: str, request_: Any
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await getattr(stub, rpc)(request_)
    error = refused.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    info = error_info(error)
    assert (info.reason, info.metadata["field"]) in (("FIELD_INVALID", field), ("PRODUCT_NOT_IN_CATALOG", field))
    assert len(error.details() or "") <= MAX_MESSAGE
    async with db.connection() as connection:
        assert await connection.fetchval("SELECT count(*) FROM credit_ledger") == 0


async def test_the_limits_themselves_are_allowed(webhooks: WebhookPoster, stub: Stub) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    at_limits = consume(
        idempotency_key="k" * 255,
        description="tab\tand newline\n are fine " + "d" * 970,
        metadata={f"{n:0>40}": "v" * 500 for n in range(50)},
    )
    response = await stub.ConsumeCredits(at_limits)
    assert not response.replayed
    page = await stub.ListCreditLedger(ledger(page_size=500))
    assert [e.source for e in page.entries if e.kind == "consumption"] == ["k" * 255]
    assert (await stub.CheckAccess(check(customer_id="c" * 255))).reason == pb.ACCESS_REASON_NO_SUBSCRIPTION


async def test_a_page_size_of_500_is_served_whole_and_the_next_page_follows(
    webhooks: WebhookPoster, stub: Stub, db: Database
) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    async with db.tx() as connection:
        await connection.execute(
            """
            INSERT INTO credit_ledger (entry_id, customer_id, credit, amount, balance_after, kind, source)
            SELECT 'cle_page_' || n, $1, 'ai_tokens', 0, 10000, 'consumption', 'page-test'
            FROM generate_series(1, 520) AS n
            """,
            CUSTOMER_ID,
        )
    first = await stub.ListCreditLedger(ledger(page_size=500))
    assert len(first.entries) == 500
    assert first.next_page_token
    rest = await stub.ListCreditLedger(ledger(page_size=500, page_token=first.next_page_token))
    assert len(rest.entries) == 521 - 500  # 520 rows and the plan grant
    assert rest.next_page_token == ""
    default = await stub.ListCreditLedger(ledger())
    assert len(default.entries) == 50


# ------------------------------------------------------------------------------------------------------ fuzzing

# Everything protobuf lets a caller put in a string: control characters, NUL, separators, other scripts' digits,
# emoji, and sizes from empty to far past every limit.
_CHARS = st.characters(codec="utf-8", exclude_categories=["Cs"])
_TEXT = st.one_of(
    st.text(_CHARS, max_size=20),
    st.text(st.sampled_from("\x00\x01\x07\t\n\r\x1f\x7f\u2028 a1.-_٣😀"), max_size=12),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "\x00", "é", "😀"]), st.integers(0, 3000)),
    st.sampled_from(["", CUSTOMER_ID, SUB_ID, PRO, "dashboard", "ai_tokens", "api_calls", "pro", "projects"]),
)
_AMOUNT = st.one_of(_TEXT, st.sampled_from(["1", "0.5", "25", "1e3", "-1", "NaN", " 5", "0", "9" * 30]))
_METADATA = st.dictionaries(_TEXT, _TEXT, max_size=60)

_REQUESTS: dict[str, st.SearchStrategy[Any]] = {
    "CheckAccess": st.builds(pb.CheckAccessRequest, customer_id=_TEXT, feature=_TEXT),
    "GetSubscription": st.one_of(
        st.builds(pb.GetSubscriptionRequest, subscription_id=_TEXT),
        st.builds(pb.GetSubscriptionRequest, customer_id=_TEXT),
    ),
    "ConsumeCredits": st.builds(
        pb.ConsumeCreditsRequest,
        customer_id=_TEXT,
        credit=_TEXT,
        amount=_AMOUNT,
        idempotency_key=_TEXT,
        description=_TEXT,
        metadata=_METADATA,
    ),
    "ListCreditLedger": st.builds(
        pb.ListCreditLedgerRequest,
        customer_id=_TEXT,
        credit=_TEXT,
        page_size=st.integers(-(2**31), 2**31 - 1),
        page_token=_TEXT,
    ),
    "ChangePlan": st.builds(
        pb.ChangePlanRequest,
        subscription_id=_TEXT,
        product_id=_TEXT,
        quantity=st.integers(-(2**31), 2**31 - 1),
        proration_mode=st.integers(0, 9),
        effective_at=st.integers(0, 5),
        idempotency_key=_TEXT,
        preview=st.booleans(),
    ),
}
_VALUE = st.one_of(
    st.builds(lambda text: struct_pb2.Value(string_value=text), _TEXT),
    st.builds(lambda number: struct_pb2.Value(number_value=number), st.floats(allow_nan=True, allow_infinity=True)),
    st.builds(lambda flag: struct_pb2.Value(bool_value=flag), st.booleans()),
    st.just(struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)),
    st.just(struct_pb2.Value(list_value=struct_pb2.ListValue())),
)
_WAVE_2: dict[str, st.SearchStrategy[Any]] = {
    "CreateCheckout": st.builds(
        pb.CreateCheckoutRequest,
        customer_id=_TEXT,
        customer_ref=_TEXT,
        email=_TEXT,
        name=_TEXT,
        items=st.lists(st.builds(pb.CheckoutItem, product_id=_TEXT, quantity=st.integers(-5, 20_000)), max_size=25),
        return_url=_TEXT,
        cancel_url=_TEXT,
        discount_code=_TEXT,
        metadata=_METADATA,
        idempotency_key=_TEXT,
    ),
    "CreatePortalSession": st.builds(
        pb.CreatePortalSessionRequest, customer_id=_TEXT, customer_ref=_TEXT, return_url=_TEXT
    ),
    "CancelSubscription": st.builds(
        pb.CancelSubscriptionRequest, subscription_id=_TEXT, reason=_TEXT, idempotency_key=_TEXT
    ),
    "ResumeSubscription": st.builds(pb.ResumeSubscriptionRequest, subscription_id=_TEXT, idempotency_key=_TEXT),
    "LinkCustomer": st.builds(pb.LinkCustomerRequest, customer_ref=_TEXT, customer_id=_TEXT),
    "RecordUsage": st.builds(
        pb.RecordUsageRequest,
        customer_id=_TEXT,
        customer_ref=_TEXT,
        events=st.lists(
            st.builds(
                pb.UsageEvent,
                event_id=_TEXT,
                event_name=_TEXT,
                properties=st.dictionaries(_TEXT, _VALUE, max_size=55),
            ),
            max_size=5,
        ),
    ),
    "GetUsage": st.builds(pb.GetUsageRequest, customer_id=_TEXT, customer_ref=_TEXT, event_name=_TEXT),
    "CreateCharge": st.builds(
        pb.CreateChargeRequest,
        subscription_id=_TEXT,
        amount=st.integers(-(2**63), 2**63 - 1),
        currency=_TEXT,
        description=_TEXT,
        metadata=_METADATA,
        idempotency_key=_TEXT,
    ),
    "GetCharge": st.one_of(
        st.builds(pb.GetChargeRequest, charge_id=_TEXT), st.builds(pb.GetChargeRequest, idempotency_key=_TEXT)
    ),
}
_REQUESTS.update(_WAVE_2)
EXAMPLES_PER_RPC = 400
EXAMPLES_PER_WAVE_2_RPC = 150


def drawn(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """`count` examples of `strategy`, the same ones every run (derandomized), drawn by Hypothesis itself."""
    examples: list[Any] = []

    @settings(max_examples=count, database=None, derandomize=True, deadline=None)
    @given(st.data())
    def collect(data: st.DataObject) -> None:
        examples.append(data.draw(strategy))

    collect()
    return examples


@pytest.mark.parametrize("rpc", sorted(_REQUESTS))
async def test_fuzzed_requests_never_get_unknown_or_internal_and_store_no_control_characters(
    webhooks: WebhookPoster, stub: Stub, db: Database, rpc: str
) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    requests = drawn(_REQUESTS[rpc], EXAMPLES_PER_WAVE_2_RPC if rpc in _WAVE_2 else EXAMPLES_PER_RPC)
    call = getattr(stub, rpc)
    seen: set[grpc.StatusCode] = set()
    failures: list[tuple[Any, grpc.aio.AioRpcError]] = []

    async def one(request: Any) -> None:
        try:
            await call(request, timeout=10)
            seen.add(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            failures.append((request, error))

    for start in range(0, len(requests), 50):
        await asyncio.gather(*(one(r) for r in requests[start : start + 50]))
    for request, error in failures:
        seen.add(error.code())
        assert error.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (request, error.details())
        assert len(error.details() or "") <= MAX_MESSAGE, error.details()
    assert grpc.StatusCode.INVALID_ARGUMENT in seen
    async with db.connection() as connection:
        stored = await connection.fetchval(
            r"""
            SELECT count(*) FROM credit_ledger
            WHERE description ~ '[\x01-\x08\x0b-\x1f\x7f]' OR metadata::text ~ '\\u00[01][0-9a-f]'
               OR idempotency_key ~ '[\x01-\x1f\x7f]' OR customer_id ~ '[\x01-\x1f\x7f]'
            """
        )
    assert stored == 0


def change_plan(**fields: Any) -> pb.ChangePlanRequest:
    base: dict[str, Any] = {"subscription_id": SUB_ID, "product_id": PRO, "idempotency_key": "k"}
    return pb.ChangePlanRequest(**{**base, **fields})


@pytest.mark.parametrize(
    ("field", "request_"),
    [
        ("subscription_id", change_plan(subscription_id=NUL)),
        ("subscription_id", change_plan(subscription_id=LONG_ID)),
        ("product_id", change_plan(product_id="p\x00")),
        ("idempotency_key", change_plan(idempotency_key="k" * 10_000)),
        ("idempotency_key", change_plan(idempotency_key="\x1b[31m")),
    ],
)
async def test_change_plan_fields_over_their_limits_are_refused_before_dodo_is_called(
    stub: Stub, fake_dodo: Any, field: str, request_: pb.ChangePlanRequest
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ChangePlan(request_)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused.value).metadata["field"] == field
    assert fake_dodo.requests == []


@pytest.mark.parametrize(
    "method", ["CheckAccess", "GetSubscription", "ChangePlan", "ConsumeCredits", "ListCreditLedger"]
)
async def test_bytes_that_are_not_the_request_message_are_invalid_argument_without_internals(
    channel: grpc.aio.Channel, method: str
) -> None:
    raw = channel.unary_unary(
        f"/entitlements.v1.EntitlementService/{method}",
        request_serializer=lambda body: body,
        response_deserializer=lambda body: body,
    )
    for body in (b"\xff\xff\xff\xff", b"\x0a\xff\x01", bytes(range(256)), b"\x12\x05ab"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await raw(body)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
        assert "Error" not in (refused.value.details() or "")


async def test_fuzzed_watch_requests_open_a_stream_or_are_invalid_argument(stub: Stub) -> None:
    """WatchEntitlements is a stream: each fuzzed request either opens (its first message is the caught-up
    heartbeat) or ends at once with INVALID_ARGUMENT naming the field; never UNKNOWN or INTERNAL."""
    requests = drawn(
        st.builds(
            pb.WatchEntitlementsRequest,
            customer_ids=st.lists(_TEXT, max_size=5),
            after_cursor=st.one_of(_TEXT, st.just("")),
        ),
        EXAMPLES_PER_WAVE_2_RPC,
    )
    codes: set[grpc.StatusCode] = set()

    async def one(request: pb.WatchEntitlementsRequest) -> None:
        call = stub.WatchEntitlements(request, timeout=10)
        refused: grpc.aio.AioRpcError | None = None
        try:
            first = await call.read()
            assert isinstance(first, pb.EntitlementEvent), first
            assert first.kind == pb.ENTITLEMENT_EVENT_KIND_HEARTBEAT, first
            codes.add(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            refused = error
        finally:
            call.cancel()
        if refused is not None:
            codes.add(refused.code())
            assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT, (request, refused.details())
            assert error_info(refused).metadata["field"] in ("customer_ids", "after_cursor")
            assert len(refused.details() or "") <= MAX_MESSAGE

    for start in range(0, len(requests), 50):
        await asyncio.gather(*(one(r) for r in requests[start : start + 50]))
    assert codes == {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
