"""``liftoff.logs``: a client's value can neither forge a log line nor a field."""

from __future__ import annotations

import io
import logging

from liftoff.logs import MAX_FIELD_CHARS, RequestLog, TextFormatter, escape, field_text


def test_control_characters_are_escaped() -> None:
    assert escape("a\nb\r\tc\x00\x1b\x7f") == "a\\nb\\r\\tc\\x00\\x1b\\x7f"
    assert escape("plain é ✓") == "plain é ✓"


def test_request_fields_are_quoted_when_they_could_be_mistaken_for_structure() -> None:
    assert field_text("primary") == "primary"
    assert field_text(12.5) == "12.5"
    assert field_text("two words") == '"two words"'
    assert field_text("a=b") == '"a=b"'
    assert field_text("new\nline") == '"new\\nline"'
    assert field_text("") == '""'
    long = field_text("g" * 10_000)
    assert len(long) == MAX_FIELD_CHARS + 3


def test_a_request_line_stays_one_line() -> None:
    stream = io.StringIO()
    log = RequestLog("text", stream=stream)
    log.write(lambda: {"consumer_group": "x\n2026-01-01 INFO forged", "status": 404})
    log.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert 'consumer_group="x\\n2026-01-01 INFO forged" status=404' in lines[0]


def test_text_log_messages_stay_on_their_line_but_tracebacks_do_not() -> None:
    formatter = TextFormatter("%(message)s")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "group %s", ("a\nforged",), None)
    assert formatter.format(record) == "group a\\nforged"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "\nTraceback" in formatter.format(failed)
