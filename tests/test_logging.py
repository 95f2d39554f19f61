from __future__ import annotations

import json
import logging
import sys

from service.logs import EventFormatter, JsonFormatter


def test_event_lines_carry_their_extra_facts_and_quote_values_with_spaces() -> None:
    record = logging.LogRecord("entitlements.webhooks", logging.WARNING, __file__, 1, "webhook.rejected", (), None)
    record.__dict__.update(why="no matching signature", webhook_id="msg_1")
    line = EventFormatter().format(record)
    assert line.endswith("WARNING entitlements.webhooks webhook.rejected why='no matching signature' webhook_id=msg_1")


def test_an_event_without_facts_is_just_the_event() -> None:
    record = logging.LogRecord("entitlements.cache", logging.INFO, __file__, 1, "cache.listening", (), None)
    assert EventFormatter().format(record).endswith("INFO entitlements.cache cache.listening")


def test_times_are_utc_and_a_traceback_stays_on_the_records_line() -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        record = logging.LogRecord(
            "entitlements.grpc", logging.ERROR, __file__, 1, "grpc.failed", (), exc_info=sys.exc_info()
        )
    record.created = 0.0
    record.msecs = 0.0
    line = EventFormatter().format(record)
    assert line.startswith("1970-01-01T00:00:00.000Z ERROR entitlements.grpc grpc.failed exc=")
    assert "\n" not in line
    assert "RuntimeError" in line


def test_json_lines_carry_the_event_its_facts_and_the_traceback() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        record = logging.LogRecord(
            "entitlements.webhooks", logging.WARNING, __file__, 1, "webhook.malformed", (), exc_info=sys.exc_info()
        )
    record.__dict__.update(why="not JSON", webhook_id="msg_2")
    record.created = 86400.5
    record.msecs = 500.0
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["time"] == "1970-01-02T00:00:00.500Z"
    assert (entry["level"], entry["logger"], entry["event"]) == (
        "WARNING",
        "entitlements.webhooks",
        "webhook.malformed",
    )
    assert (entry["why"], entry["webhook_id"]) == ("not JSON", "msg_2")
    assert "ValueError: bad" in entry["exc"]
