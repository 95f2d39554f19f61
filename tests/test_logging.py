from __future__ import annotations

import logging

from service.logs import EventFormatter


def test_event_lines_carry_their_extra_facts_and_quote_values_with_spaces() -> None:
    record = logging.LogRecord("entitlements.webhooks", logging.WARNING, __file__, 1, "webhook.rejected", (), None)
    record.__dict__.update(why="no matching signature", webhook_id="msg_1")
    line = EventFormatter().format(record)
    assert line.endswith("WARNING entitlements.webhooks webhook.rejected why='no matching signature' webhook_id=msg_1")


def test_an_event_without_facts_is_just_the_event() -> None:
    record = logging.LogRecord("entitlements.cache", logging.INFO, __file__, 1, "cache.listening", (), None)
    assert EventFormatter().format(record).endswith("INFO entitlements.cache cache.listening")
