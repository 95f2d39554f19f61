"""The Node.js client (clients/node/check_access.js) against the real server: the contract works from another
language, loading the same .proto at run time."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.server import Running
from tests.support import API_TOKEN, CUSTOMER_ID, NODE_DIR, WebhookPoster, ensure_node_modules, load_event

NODE_TIMEOUT = 20.0


@pytest.fixture(scope="session")
def node_modules() -> Path:
    if shutil.which("node") is None:
        pytest.fail("node is not installed: run `make install` (it installs Node.js and npm)")
    return ensure_node_modules()


@dataclass
class NodeRun:
    returncode: int
    stdout: str
    stderr: str


async def check_access_js(port: int, customer_id: str, feature: str, *, token: str | None) -> NodeRun:
    """Run the script without blocking the event loop: the server under test answers on this same loop."""
    env = {name: value for name, value in os.environ.items() if name != "ENTITLEMENTS_API_TOKENS"}
    if token is not None:
        env["ENTITLEMENTS_API_TOKENS"] = token
    process = await asyncio.create_subprocess_exec(
        "node",
        str(NODE_DIR / "check_access.js"),
        f"127.0.0.1:{port}",
        customer_id,
        feature,
        env=env,
        cwd=NODE_DIR,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), NODE_TIMEOUT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return NodeRun(process.returncode, stdout.decode(), stderr.decode())


async def test_node_client_sees_access_granted_by_an_active_subscription(
    node_modules: Path, service: Running, webhooks: WebhookPoster
) -> None:
    assert await webhooks.send(load_event("subscription_active")) == (200, {"status": "applied"})

    run = await check_access_js(service.grpc_port, CUSTOMER_ID, "dashboard", token=API_TOKEN)

    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["allowed"] is True
    assert answer["reason"] == "ACCESS_REASON_ACTIVE"
    assert answer["status"] == "active"


async def test_node_client_without_a_token_is_refused_as_unauthenticated(
    node_modules: Path, service: Running, webhooks: WebhookPoster
) -> None:
    assert await webhooks.send(load_event("subscription_active")) == (200, {"status": "applied"})

    run = await check_access_js(service.grpc_port, CUSTOMER_ID, "dashboard", token=None)

    assert run.returncode != 0
    assert run.stdout == ""
    error = json.loads(run.stderr)
    assert error["code"] == 16  # UNAUTHENTICATED
    assert "token" in error["details"]
