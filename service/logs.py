"""Log records as one line each, in UTC: `time level logger event key=value ...` (text) or one JSON object (json).

Events have dotted names and their facts travel in `extra=`, which the standard formatter would silently drop.
A traceback stays on the record's own line (escaped in text, a field in JSON), so a log shipper never splits a
record in two.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
FORMATS = ("text", "json")


def _facts(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in record.__dict__.items() if key not in _STANDARD}


class _Utc(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


class EventFormatter(_Utc):
    def format(self, record: logging.LogRecord) -> str:
        parts = [self.formatTime(record), record.levelname, record.name, record.getMessage()]
        parts.extend(f"{key}={_value(value)}" for key, value in _facts(record).items())
        if record.exc_info:
            parts.append(f"exc={self.formatException(record.exc_info)!r}")
        return " ".join(parts).replace("\n", "\\n")


class JsonFormatter(_Utc):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(_facts(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def _value(value: object) -> str:
    text = str(value)
    return repr(text) if not text or any(c.isspace() for c in text) else text


def configure(level: int | str = logging.INFO, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else EventFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # Alembic announces every plugin it loads at INFO on each start (the schema check reads its scripts): noise.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
