"""The TypeScript package (clients/typescript, @entitlements/client) against the real server: its own suite, run by
node's test runner, calls every RPC through one client while this test serves them; a relay counts the connections."""

from __future__ import annotations

import re

import pytest

from service.server import Running
from tests.clients.nodejs import (
    TS_DIR,
    ConnectionCounter,
    NodeRun,
    environment_without,
    install_node_packages,
    run_node,
)
from tests.fakedodo import FakeDodo
from tests.support import API_TOKEN, CUSTOMER_ID, SUB_ID, TEAM, WebhookPoster, deliver, load_event

SUITE = "dist/test/"  # compiled from clients/typescript/test/*.test.ts by `make node-deps`


@pytest.fixture(scope="session")
def node_packages() -> None:
    install_node_packages()


def tap_counts(output: str) -> dict[str, int]:
    """The closing counts of node's TAP reporter (`# pass 7`, `# fail 0`, ...)."""
    return {
        name: int(count)
        for name, count in re.findall(r"^# (tests|pass|fail|cancelled|skipped|todo) (\d+)$", output, re.M)
    }


async def run_suite(target: str, **scenario: str) -> NodeRun:
    env = environment_without("ENTITLEMENTS_TARGET", "ENTITLEMENTS_TOKEN")
    env.update(ENTITLEMENTS_TARGET=target, ENTITLEMENTS_TOKEN=API_TOKEN, **scenario)
    return await run_node("--test", "--test-reporter=tap", SUITE, cwd=TS_DIR, env=env, within=120)


@pytest.mark.usefixtures("node_packages")
async def test_typescript_client_suite_passes_against_the_live_server_over_one_connection(
    service: Running, webhooks: WebhookPoster, fake_dodo: FakeDodo
) -> None:
    await deliver(webhooks, load_event("subscription_active"))
    at_dodo = fake_dodo.add_subscription()  # ChangePlan previews price a subscription Dodo knows

    async with ConnectionCounter(service.grpc_port) as relay:
        run = await run_suite(
            relay.target,
            LIVE_CUSTOMER_ID=CUSTOMER_ID,
            LIVE_SUBSCRIPTION_ID=SUB_ID,
            LIVE_PREVIEW_SUBSCRIPTION_ID=at_dodo["subscription_id"],
            LIVE_PREVIEW_PRODUCT_ID=TEAM,
        )

    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    counts = tap_counts(run.stdout)
    assert counts.get("pass", 0) > 0, report
    assert (counts.get("fail"), counts.get("cancelled")) == (0, 0), report
    # The live suite shares one client; the other file's calls go to a closed port and never reach the relay.
    assert relay.connections == 1, report


@pytest.mark.usefixtures("node_packages")
async def test_typescript_client_suite_fails_without_a_live_server() -> None:
    """The suite refuses to pass vacuously: without a target and scenario it fails instead of skipping."""
    env = environment_without("ENTITLEMENTS_TARGET", "ENTITLEMENTS_TOKEN", "LIVE_CUSTOMER_ID", "LIVE_SUBSCRIPTION_ID")

    run = await run_node("--test", "--test-reporter=tap", SUITE, cwd=TS_DIR, env=env)

    assert run.returncode != 0
    assert "LIVE_CUSTOMER_ID is not set" in run.stdout
