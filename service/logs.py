"""Log lines as `time level logger event key=value ...`: events have dotted names and their facts travel in
`extra=`, which the standard formatter would silently drop."""

from __future__ import annotations

import logging
import sys

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class EventFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        facts = " ".join(f"{key}={_value(value)}" for key, value in record.__dict__.items() if key not in _STANDARD)
        return f"{line} {facts}" if facts else line


def _value(value: object) -> str:
    text = str(value)
    return repr(text) if not text or any(c.isspace() for c in text) else text


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EventFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
