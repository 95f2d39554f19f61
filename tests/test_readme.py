"""The README's commands and snippets, run as written (issue 10): a newcomer who pastes them gets what they say.

The service runs as `make run` runs it (`python -m service serve`, no tokens, the dev webhook key), on free ports
instead of the defaults: the only change made to the README's text is those two addresses. Each ```sh block of
"Try it" and "A subscription journey" runs as one bash script; a `# expect: TEXT` line checks that the output of the
command just above it contains TEXT. In the journey, a `# … ` line is where Dodo acts (the customer pays and Dodo
sends the webhook): the fake Dodo plays that part. The ```python and ```js blocks run as they are."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.fakedodo import FakeDodo, start_fake_dodo
from tests.support import REPO_ROOT, WEBHOOK_SECRET, sign

README = (REPO_ROOT / "README.md").read_text()
GRPC_DEFAULT, HTTP_DEFAULT = "127.0.0.1:50051", "127.0.0.1:8080"
DODO_KEY = "readme_dodo_key"


def section(title: str) -> str:
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.MULTILINE | re.DOTALL)
    assert found is not None, f"README has no section {title!r}"
    return found.group(1)


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Served:
    env: dict[str, str]
    grpc: str
    http: str

    def localize(self, text: str) -> str:
        return text.replace(GRPC_DEFAULT, self.grpc).replace(HTTP_DEFAULT, self.http)


@pytest.fixture
async def served(database_url: str, db: object, tmp_path: Path) -> AsyncIterator[tuple[Served, FakeDodo]]:
    async with start_fake_dodo(api_key=DODO_KEY) as (fake, base_url):
        grpc_addr, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "TMPDIR") if name in os.environ}
        env.update(
            {
                "PYTHONDONTWRITEBYTECODE": "1",
                "DATABASE_URL": database_url,
                "DODO_PAYMENTS_WEBHOOK_KEY": WEBHOOK_SECRET,
                "DODO_PAYMENTS_API_KEY": DODO_KEY,
                "DODO_PAYMENTS_BASE_URL": base_url,
                "ENTITLEMENTS_GRPC_ADDR": grpc_addr,
                "ENTITLEMENTS_HTTP_ADDR": http_addr,
            }
        )
        log = (tmp_path / "serve.log").open("wb")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", "serve", env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            await _until_ready(http_addr, process, tmp_path / "serve.log")
            yield Served(env, grpc_addr, http_addr), fake
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), 15)
            log.close()


async def _until_ready(http_addr: str, process: asyncio.subprocess.Process, log: Path) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            assert process.returncode is None, "serve exited before it was ready (see serve.log)"
            try:
                async with session.get(f"http://{http_addr}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"serve never became ready (see {log})")


def as_checked_script(block: str) -> str:
    """The block as a bash script: each command's output is shown and checked against its `# expect:` lines."""
    lines = ["set -euo pipefail"]
    for line in block.splitlines():
        stripped = line.strip()
        if stripped.startswith("# expect: "):
            wanted = stripped.removeprefix("# expect: ")
            lines.append(
                f'grep -qF -- {shlex.quote(wanted)} <<<"$out" || '
                f"{{ echo 'README: expected {shlex.quote(wanted)[1:-1]} in the output above' >&2; exit 1; }}"
            )
        elif not stripped or stripped.startswith("#"):
            continue
        elif "=$(" in stripped:  # an assignment the next lines use
            lines.append(stripped)
            lines.append(f'out="${{{stripped.split("=", 1)[0]}}}"; echo "$out"')
        else:
            lines.append(f'out=$({stripped} 2>&1) || {{ echo "$out"; exit 1; }}; echo "$out"')
    return "\n".join(lines) + "\n"


async def run_bash(script: str, served: Served) -> str:
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        served.localize(script),
        env=served.env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    text = output.decode()
    assert process.returncode == 0, f"README block failed:\n{script}\n--- output ---\n{text}"
    return text


async def test_try_it_runs_as_written(served: tuple[Served, FakeDodo]) -> None:
    server, _ = served
    text = section("Try it")
    shell = blocks(text, "sh")
    assert shell, "Try it has commands"
    for block in shell:
        await run_bash(as_checked_script(block), server)
    for snippet in blocks(text, "python"):
        result = await run_bash(f"{sys.executable} - <<'PYTHON'\n{snippet}PYTHON\n", server)
        assert "dashboard: True GRACE_PERIOD" in result, result
        assert "ai_tokens left: 9970" in result, result
    for snippet in blocks(text, "js"):
        result = await run_bash(f"node - <<'JS'\n{snippet}JS\n", server)
        assert "dashboard: true GRACE_PERIOD" in result, result


async def test_the_stub_snippet_of_credits_runs_after_try_it(served: tuple[Served, FakeDodo]) -> None:
    server, _ = served
    for block in blocks(section("Try it"), "sh"):
        await run_bash(as_checked_script(block), server)
    (snippet,) = blocks(section("Credits"), "python")
    result = await run_bash(f"{sys.executable} - <<'PYTHON'\n{snippet}PYTHON\n", server)
    assert "spent: cle_" in result, result
    assert "newest: consumption" in result, result


async def test_the_subscription_journey_runs_as_written(served: tuple[Served, FakeDodo]) -> None:
    server, fake = served
    (block,) = blocks(section("A subscription journey"), "sh")
    steps = re.split(r"^# … .*$", block, flags=re.MULTILINE)
    assert len(steps) == 2, "one place where Dodo acts"
    await run_bash(as_checked_script(steps[0]), server)
    # Dodo's part: the customer pays the session, Dodo signs and sends subscription.active.
    (session_id,) = fake.checkout_sessions
    subscription = fake.complete_checkout(session_id)
    await _send_webhook(server, "subscription.active", subscription)
    await run_bash(as_checked_script(steps[1]), server)


async def _send_webhook(server: Served, event_type: str, data: dict[str, object]) -> None:
    import aiohttp

    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    body = json.dumps({"business_id": "bus_readme", "type": event_type, "timestamp": now, "data": data}).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://{server.http}/webhooks/dodo", data=body, headers=sign(body)) as response,
    ):
        assert response.status == 200, await response.text()
