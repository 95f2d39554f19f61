"""Names and small helpers every bench module shares."""

from __future__ import annotations

from dataclasses import dataclass, field

SERVICE = "entitlements.v1.EntitlementService"
CHECK_ACCESS = f"/{SERVICE}/CheckAccess"
CONSUME_CREDITS = f"/{SERVICE}/ConsumeCredits"
RECORD_USAGE = f"/{SERVICE}/RecordUsage"
# The usage event the RecordUsage cases record (no meter needs to match it: the bench has no Dodo key).
USAGE_EVENT_NAME = "bench.api_call"
PRO = "pdt_6Gx2Kq9LwPro0Mth4Rt1"
FEATURE = "dashboard"
CREDIT = "ai_tokens"
API_CALLS_ENTITLEMENT = "cent_7Dk2Mq8Wx5Lp3Zr9Tv1Nb"
# Bench-only Standard Webhooks secret (the test suite's): the service under test is started with it.
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
# The account the raw UPDATE baseline hammers: a row of credit_balances that belongs to no seeded customer, so the
# seeded accounts keep balance = sum(ledger).
RAW_UPDATE_CUSTOMER = "cus_bench_raw_update_row"
# The service runs as in production, with callers configured: every bench client presents this caller's token.
BENCH_CALLER = "bench"
BENCH_TOKEN = "bench-token-5f3c9a1e7d2b4c6a8e0f1a2b3c4d5e6f"
BENCH_CALLERS = f"{BENCH_CALLER}:{BENCH_TOKEN}:check+consume"
AUTH_METADATA = (("authorization", f"Bearer {BENCH_TOKEN}"),)
AUTH_HEADER = f"authorization: Bearer {BENCH_TOKEN}"
HOT_CHECK_CUSTOMER = 0
HOT_CONSUME_CUSTOMER = 1


class BenchError(Exception):
    """A run that cannot produce numbers (a server that does not start, a sanity call that fails): reported
    without a harness traceback, with the servers' log tails."""


def customer_id(index: int) -> str:
    """Dodo-shaped ids: a prefix and 21 characters."""
    return f"cus_B{index:020d}"


def subscription_id(index: int) -> str:
    return f"sub_B{index:020d}"


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 when empty)."""
    if not ordered:
        return 0.0
    rank = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class LoadResult:
    """What one load generator measured in its measurement window (latencies in microseconds)."""

    requests_per_second: float
    ok: int
    latencies_us: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    window_seconds: float = 0.0
    note: str = ""

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_us, 50) / 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_us, 99) / 1000

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())
