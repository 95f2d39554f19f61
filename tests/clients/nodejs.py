"""Node.js from the tests: the packages as `make node-deps` leaves them, node processes that do not block the event
loop (the server under test answers on that same loop), and a TCP relay that counts the connections a client opens."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tests.support import REPO_ROOT

TS_DIR = REPO_ROOT / "clients" / "typescript"
NODE_TIMEOUT = 60.0


def install_node_packages() -> None:
    """clients/node and clients/typescript installed from their lockfiles and compiled: the very target `make test`
    runs first, so a test never sees a stale dist/."""
    if shutil.which("node") is None:
        raise RuntimeError("node is not installed: run `make install` (it installs Node.js and npm)")
    result = subprocess.run(
        ["make", "--no-print-directory", "node-deps"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"make node-deps failed:\n{result.stdout}{result.stderr}")


@dataclass
class NodeRun:
    returncode: int
    stdout: str
    stderr: str


async def run_node(*args: str, cwd: Path, env: Mapping[str, str], within: float = NODE_TIMEOUT) -> NodeRun:
    """Run node and collect its output, killing it if it has not finished `within` seconds."""
    process = await asyncio.create_subprocess_exec(
        "node",
        *args,
        env=dict(env),
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), within)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return NodeRun(process.returncode, stdout.decode(), stderr.decode())


def environment_without(*names: str) -> dict[str, str]:
    """This process's environment less the given variables, so that a developer's own settings cannot leak in."""
    return {name: value for name, value in os.environ.items() if name not in names}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@dataclass
class ConnectionCounter:
    """A TCP relay on 127.0.0.1 in front of `upstream_port` that counts the connections it accepts."""

    upstream_port: int
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _relays: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> ConnectionCounter:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._relays, return_exceptions=True)
        for writer in self._writers:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        self.connections += 1
        self._writers.append(client_writer)
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.append(upstream_writer)
        await asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))
