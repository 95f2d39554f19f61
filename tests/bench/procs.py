"""The processes the bench starts (the service, the echo baseline) and what /proc says about them.

CPU and memory come straight from /proc (this bench runs on Linux): user+system time of one process, the summed
time of the local Postgres backends, and the machine's busy share.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.bench.common import BenchError

REPO_ROOT = Path(__file__).resolve().parents[2]
_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """Runs in the child before exec: if the bench dies hard, its servers go too instead of lingering."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) in KiB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


_SHARED_POSTGRES_WORK = ("walwriter", "wal writer", "checkpointer", "background writer")


_SHARED_POSTGRES_WORK = ("walwriter", "wal writer", "checkpointer", "background writer")


@dataclass(frozen=True)
class Snapshot:
    """CPU seconds and parent of every process, and which Postgres processes work for the bench's database."""

    cpu: dict[int, float]
    parent: dict[int, int]
    postgres: frozenset[int]
    at: float


def snapshot(database: str) -> Snapshot:
    """One pass over /proc. Postgres processes that work for `database` are its backends (the process title names
    the database) and the shared WAL writer, checkpointer and background writer; other databases' backends (a test
    suite running meanwhile) are not."""
    cpu: dict[int, float] = {}
    parent: dict[int, int] = {}
    postgres: set[int] = set()
    needle = f" {database} "
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            cpu[pid] = (int(fields[11]) + int(fields[12])) / _TICKS
            parent[pid] = int(fields[1])
            if stat[stat.index("(") + 1 : stat.rindex(")")] == "postgres":
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if needle in title or any(name in title for name in _SHARED_POSTGRES_WORK):
                    postgres.add(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError, ValueError):
            continue
    return Snapshot(cpu, parent, frozenset(postgres), time.monotonic())


def _descendants(root: int, parent: dict[int, int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = {root}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


@dataclass
class CpuWindow:
    """CPU used between `start()` and `stop()`: by one server process, by Postgres for the bench's database, by the
    machine as a whole, and by processes that are not the bench's (other work on the machine skews every number)."""

    pid: int
    database: str
    _before: Snapshot | None = None
    _machine: tuple[int, int] = (0, 0)
    server_seconds: float = 0.0
    postgres_seconds: float | None = None
    machine_busy: float = 0.0
    # Cores' worth of CPU that processes outside the bench (its process tree and its database's Postgres) used.
    other_cores: float = 0.0

    def start(self) -> None:
        self._before = snapshot(self.database)
        self._machine = machine_ticks()

    def stop(self) -> None:
        after = snapshot(self.database)
        before = self._before
        assert before is not None

        def spent(pid: int) -> float:
            # A process gone by the end took its time with it: count nothing rather than a negative.
            return max(0.0, after.cpu[pid] - before.cpu.get(pid, 0.0)) if pid in after.cpu else 0.0

        self.server_seconds = spent(self.pid)
        postgres = before.postgres | after.postgres
        self.postgres_seconds = sum(spent(pid) for pid in postgres) if postgres else None
        ours = _descendants(os.getpid(), after.parent) | _descendants(os.getpid(), before.parent) | postgres
        kernel = {pid for pid, ppid in after.parent.items() if ppid in (0, 2)}
        other = sum(spent(pid) for pid in after.cpu if pid not in ours and pid not in kernel)
        self.other_cores = other / max(1e-9, after.at - before.at)
        busy, total = machine_ticks()
        self.machine_busy = (busy - self._machine[0]) / max(1, total - self._machine[1])


def machine_busy(seconds: float) -> float:
    """The machine's busy share over the next `seconds` (all CPUs); blocks."""
    before = machine_ticks()
    time.sleep(seconds)
    after = machine_ticks()
    return (after[0] - before[0]) / max(1, after[1] - before[1])


@dataclass
class Managed:
    """A server subprocess with its output in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _closed: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def spawn(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> Managed:
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C on the bench reaches the bench, which then stops its servers in order.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    return Managed(name, process, log_path)


async def wait_http_ok(server: Managed, url: str, limit_seconds: float) -> None:
    """Poll `url` until it answers 200; fail early, with the server's log, if the process exits."""
    deadline = time.monotonic() + limit_seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
        while True:
            if server.process.poll() is not None:
                raise BenchError(f"{server.name} exited with {server.process.returncode}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{server.name} not ready at {url} after {limit_seconds:.0f}s")
            await asyncio.sleep(0.2)


async def wait_log_line(server: Managed, marker: str, limit_seconds: float) -> None:
    deadline = time.monotonic() + limit_seconds
    while marker not in server.log_tail(200):
        if server.process.poll() is not None:
            raise BenchError(f"{server.name} exited with {server.process.returncode}")
        if time.monotonic() > deadline:
            raise BenchError(f"{server.name} did not print {marker!r} within {limit_seconds:.0f}s")
        await asyncio.sleep(0.1)
