"""Fixed-body gRPC load from h2load (nghttp2's C HTTP/2 load generator).

A gRPC unary request is an HTTP/2 POST whose body is one length-prefixed message: a compressed-flag byte (0), the
4-byte big-endian length and the serialized protobuf. h2load repeats that body; it only sees HTTP statuses (gRPC
errors travel in trailers), so the harness checks once with nghttp that the same body gets `grpc-status: 0`.

Latency percentiles come from h2load's per-request log (main phase only: h2load leaves warm-up requests out).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.bench.common import LoadResult

_FINISHED = re.compile(r"finished in ([\d.]+)s, ([\d.]+) req/s")
_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


def missing_tools() -> list[str]:
    return [tool for tool in ("h2load", "nghttp") if shutil.which(tool) is None]


def _headers(extra: Sequence[str] = ()) -> list[str]:
    found = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    for header in extra:
        found += ["-H", header]
    return found


async def grpc_status_of(port: int, path: str, body_file: Path, headers: Sequence[str] = ()) -> tuple[str, bytes]:
    """One request with nghttp: the grpc-status trailer (or "" when absent) and the raw output."""
    process = await asyncio.create_subprocess_exec(
        "nghttp",
        "-v",
        "-d",
        str(body_file),
        *_headers(headers),
        f"http://127.0.0.1:{port}{path}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 20)
    found = re.search(rb"grpc-status: (\d+)", output)
    return (found.group(1).decode() if found else ""), output


def read_log(log_file: Path, start: float, end: float) -> tuple[list[float], int]:
    """Sorted latencies (µs) of the 2xx requests in h2load's log, and how many completed in [start, end]."""
    latencies: list[float] = []
    inside = 0
    start_us, end_us = start * 1e6, end * 1e6
    for line in log_file.read_text().splitlines():
        began, status, elapsed = line.split("\t")
        if not status.startswith("2"):
            continue
        latencies.append(float(elapsed))
        if start_us <= int(began) + int(elapsed) <= end_us:
            inside += 1
    latencies.sort()
    return latencies, inside


def split_in_flight(in_flight: int) -> tuple[int, int]:
    """(connections, streams per connection): up to 4 connections, like a few client channels."""
    connections = min(in_flight, 4)
    while in_flight % connections:
        connections -= 1
    return connections, in_flight // connections


async def run(
    *,
    port: int,
    path: str,
    body_file: Path,
    in_flight: int,
    warmup: float,
    duration: float,
    log_file: Path,
    on_window: Callable[[bool], None],
    headers: Sequence[str] = (),
) -> LoadResult:
    """h2load for `warmup` + `duration` seconds; `on_window` brackets (most of) the main phase for CPU sampling.

    Requests/s is h2load's own (main phase); the CPU window is slightly shorter than the main phase (h2load's
    phase start is only known to within its connection setup), and the caller divides its CPU by the requests
    completed inside it, counted from the per-request log.
    """
    connections, streams = split_in_flight(in_flight)
    args = [
        "h2load",
        f"http://127.0.0.1:{port}{path}",
        "-d",
        str(body_file),
        *_headers(headers),
        "-c",
        str(connections),
        "-m",
        str(streams),
        f"--duration={round(duration * 1000)}ms",
        f"--warm-up-time={round(warmup * 1000)}ms",
        f"--log-file={log_file}",
    ]
    launched = time.time()
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )

    margin = min(0.25, duration / 10)
    window: list[float] = []

    async def bracket() -> None:
        await asyncio.sleep(max(0.0, launched + warmup + margin - time.time()))
        window.append(time.time())
        on_window(True)
        await asyncio.sleep(max(0.0, duration - 2 * margin))
        window.append(time.time())
        on_window(False)

    bracketing = asyncio.create_task(bracket())
    try:
        output_bytes, _ = await asyncio.wait_for(process.communicate(), warmup + duration + 60)
        await bracketing
    finally:
        if process.returncode is None:  # interrupted or timed out: no load generator outlives the bench
            process.kill()
            await process.wait()
        bracketing.cancel()
    output = output_bytes.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"h2load exited with {process.returncode}:\n{output[-2000:]}")
    finished, requests, statuses = _FINISHED.search(output), _REQUESTS.search(output), _STATUS.search(output)
    if finished is None or requests is None or statuses is None:
        raise RuntimeError(f"cannot parse h2load output:\n{output[-2000:]}")
    rate = float(finished.group(2))
    failed = int(requests.group(5))
    non_2xx = sum(int(statuses.group(n)) for n in (2, 3, 4))
    errors = {key: value for key, value in (("failed", failed), ("non-2xx", non_2xx)) if value}

    latencies, in_cpu_window = await asyncio.to_thread(read_log, log_file, window[0], window[1])
    result = LoadResult(rate, in_cpu_window, latencies, errors, window[1] - window[0])
    result.note = f"h2load -c {connections} -m {streams}"
    return result
