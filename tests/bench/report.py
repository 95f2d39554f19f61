"""Results: one row per case, the table printed at the end and bench-results.json."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.common import LoadResult


@dataclass
class Side:
    """One measured server (the service, or a baseline) under one load."""

    name: str
    load: LoadResult
    server_cpu_us: float | None = None
    postgres_cpu_us: float | None = None
    machine_busy: float | None = None
    rss_mb: float | None = None
    # Cores' worth of CPU used meanwhile by processes that are not the bench's: above ~0.2 the numbers are skewed.
    other_cores: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requests_per_second": round(self.load.requests_per_second, 1),
            "calls_in_window": self.load.ok,
            "window_seconds": round(self.load.window_seconds, 3),
            "p50_ms": round(self.load.p50_ms, 3),
            "p99_ms": round(self.load.p99_ms, 3),
            "errors": self.load.errors,
            "server_cpu_us_per_call": _round(self.server_cpu_us, 1),
            "postgres_cpu_us_per_call": _round(self.postgres_cpu_us, 1),
            "machine_busy": _round(self.machine_busy, 3),
            "other_load_cores": _round(self.other_cores, 2),
            "rss_mb": _round(self.rss_mb, 1),
            "note": self.load.note,
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class Case:
    name: str
    generator: str
    in_flight: int
    service: Side
    baseline: Side | None = None
    # The bare grpc.aio identity echo (identity serializers, no interceptors): the framework's own ceiling.
    ceiling: Side | None = None
    target: str = ""
    passed: bool | None = None
    why: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline.load.requests_per_second <= 0:
            return None
        return self.service.load.requests_per_second / self.baseline.load.requests_per_second

    @property
    def p99_ratio(self) -> float | None:
        if self.baseline is None or self.baseline.load.p99_ms <= 0:
            return None
        return self.service.load.p99_ms / self.baseline.load.p99_ms

    @property
    def ceiling_ratio(self) -> float | None:
        if self.ceiling is None or self.ceiling.load.requests_per_second <= 0:
            return None
        return self.service.load.requests_per_second / self.ceiling.load.requests_per_second

    @property
    def ceiling_p99_ratio(self) -> float | None:
        if self.ceiling is None or self.ceiling.load.p99_ms <= 0:
            return None
        return self.service.load.p99_ms / self.ceiling.load.p99_ms

    def as_json(self) -> dict[str, Any]:
        return {
            "case": self.name,
            "generator": self.generator,
            "in_flight": self.in_flight,
            "service": self.service.as_json(),
            "baseline": None if self.baseline is None else self.baseline.as_json(),
            "ratio": _round(self.ratio, 3),
            "p99_ratio": _round(self.p99_ratio, 3),
            "bare_echo": None if self.ceiling is None else self.ceiling.as_json(),
            "ratio_to_bare_echo": _round(self.ceiling_ratio, 3),
            "p99_ratio_to_bare_echo": _round(self.ceiling_p99_ratio, 3),
            "target": self.target,
            "passed": self.passed,
            "why": self.why,
            **self.extra,
        }


COLUMNS = (
    ("case", 26),
    ("in-flight", 9),
    ("req/s", 8),
    ("p50 ms", 7),
    ("p99 ms", 7),
    ("srv µs/call", 11),
    ("pg µs/call", 10),
    ("RSS MB", 7),
    ("other", 5),
    ("baseline", 12),
    ("base req/s", 10),
    ("base p99", 8),
    ("base µs", 7),
    ("ratio", 6),
    ("bare req/s", 10),
    ("bare p99", 8),
    ("bare µs", 7),
    ("×bare", 6),
    ("target", 30),
    ("result", 6),
)


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(cases: list[Case]) -> str:
    lines = ["  ".join(title.rjust(width) if i else title.ljust(width) for i, (title, width) in enumerate(COLUMNS))]
    lines.append("-" * len(lines[0]))
    for case in cases:
        s, b = case.service, case.baseline
        cells = [
            case.name,
            str(case.in_flight) if case.in_flight else "-",
            _fmt(s.load.requests_per_second) if s.load.requests_per_second else "-",
            _fmt(s.load.p50_ms, 2) if s.load.latencies_us else "-",
            _fmt(s.load.p99_ms, 2) if s.load.latencies_us else "-",
            _fmt(s.server_cpu_us),
            _fmt(s.postgres_cpu_us),
            _fmt(s.rss_mb),
            _fmt(max(s.other_cores or 0.0, (b.other_cores or 0.0) if b else 0.0), 1),
            b.name if b else "-",
            _fmt(b.load.requests_per_second) if b else "-",
            _fmt(b.load.p99_ms, 2) if b and b.load.latencies_us else "-",
            _fmt(b.server_cpu_us) if b else "-",
            _fmt(case.ratio, 2),
            _fmt(case.ceiling.load.requests_per_second) if case.ceiling else "-",
            _fmt(case.ceiling.load.p99_ms, 2) if case.ceiling and case.ceiling.load.latencies_us else "-",
            _fmt(case.ceiling.server_cpu_us) if case.ceiling else "-",
            _fmt(case.ceiling_ratio, 2),
            case.target or "-",
            {True: "PASS", False: "FAIL", None: "info"}[case.passed],
        ]
        lines.append(
            "  ".join(
                cell.rjust(width) if i else cell.ljust(width)
                for i, (cell, (_, width)) in enumerate(zip(cells, COLUMNS, strict=True))
            )
        )
    notes = [f"  {case.name} @{case.in_flight}: {case.why}" for case in cases if case.why]
    if notes:
        lines += ["", "notes:", *notes]
    lines += [
        "",
        "ratio: to the baseline (the protobuf echo for gRPC rows); ×bare: to the bare grpc.aio identity echo, the",
        "framework's ceiling (identity serializers, no interceptors). The service runs with callers (tokens) and",
        "metrics on, TLS off, and every client sends the bench caller's token (to the echoes too: same bytes).",
        "srv/pg/base/bare µs: CPU per call of the server process, of Postgres for this database, of the baselines;",
        "other: cores used meanwhile by processes outside the bench (above ~0.2 they skew the row).",
    ]
    return "\n".join(lines)


def write_json(path: Path, *, command: str, config: dict[str, Any], setup: dict[str, Any], cases: list[Case]) -> None:
    judged = [case.passed for case in cases if case.passed is not None]
    document = {
        "command": command,
        "machine": {"cpus": _cpus(), "python": platform.python_version(), "platform": platform.platform()},
        "config": config,
        "setup": setup,
        "all_targets_met": bool(judged) and all(judged),
        "cases": [case.as_json() for case in cases],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def _cpus() -> int:
    import os

    return os.cpu_count() or 0
