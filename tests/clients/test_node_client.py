"""The Node.js example (clients/node/check_access.js) against the real server: plain JavaScript calling the contract
through the @entitlements/client package, with one client, hence one connection, for all of its calls."""

from __future__ import annotations

import json

import pytest

from service.server import Running
from tests.clients.nodejs import ConnectionCounter, NodeRun, environment_without, install_node_packages, run_node
from tests.support import API_TOKEN, CUSTOMER_ID, NODE_DIR, WebhookPoster, deliver, load_event

TOKEN_VARIABLES = ("ENTITLEMENTS_TOKEN", "ENTITLEMENTS_API_TOKENS")


@pytest.fixture(scope="session")
def node_packages() -> None:
    install_node_packages()


async def check_access_js(target: str, customer_id: str, *features: str, token: str | None) -> NodeRun:
    """The command line of the README, with the token where the server's own settings keep it."""
    env = environment_without(*TOKEN_VARIABLES)
    if token is not None:
        env["ENTITLEMENTS_API_TOKENS"] = token
    return await run_node(str(NODE_DIR / "check_access.js"), target, customer_id, *features, cwd=NODE_DIR, env=env)


@pytest.mark.usefixtures("node_packages")
async def test_node_client_sees_access_granted_by_an_active_subscription(
    service: Running, webhooks: WebhookPoster
) -> None:
    await deliver(webhooks, load_event("subscription_active"))

    run = await check_access_js(f"127.0.0.1:{service.grpc_port}", CUSTOMER_ID, "dashboard", token=API_TOKEN)

    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["allowed"] is True
    assert answer["reason"] == "ACCESS_REASON_ACTIVE"
    assert answer["status"] == "active"
    assert answer["kind"] == "FEATURE_KIND_BOOLEAN"


@pytest.mark.usefixtures("node_packages")
async def test_node_client_without_a_token_is_refused_as_unauthenticated(
    service: Running, webhooks: WebhookPoster
) -> None:
    await deliver(webhooks, load_event("subscription_active"))

    run = await check_access_js(f"127.0.0.1:{service.grpc_port}", CUSTOMER_ID, "dashboard", token=None)

    assert run.returncode == 1
    assert run.stdout == ""
    error = json.loads(run.stderr)
    assert (error["code"], error["code_name"]) == (16, "UNAUTHENTICATED")
    assert "token" in error["message"]


@pytest.mark.usefixtures("node_packages")
async def test_node_client_asks_about_several_features_over_one_connection(
    service: Running, webhooks: WebhookPoster
) -> None:
    await deliver(webhooks, load_event("subscription_active"))

    async with ConnectionCounter(service.grpc_port) as relay:
        run = await check_access_js(relay.target, CUSTOMER_ID, "dashboard", "pro", "sso", token=API_TOKEN)

    assert run.returncode == 0, run.stderr
    answers = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(a["allowed"], a["reason"]) for a in answers] == [
        (True, "ACCESS_REASON_ACTIVE"),
        (True, "ACCESS_REASON_ACTIVE"),
        (False, "ACCESS_REASON_FEATURE_NOT_IN_PLAN"),
    ]
    assert relay.connections == 1


def test_node_package_main_names_the_example_that_exists() -> None:
    manifest = json.loads((NODE_DIR / "package.json").read_text())

    assert (NODE_DIR / manifest["main"]).is_file(), manifest["main"]
