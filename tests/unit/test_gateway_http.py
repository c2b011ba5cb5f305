"""``liftoff.gateway.http.sse_event``: the bytes it produces are read back exactly by the official client's parser.

The official client (``takeoff_client.sse.SSEClient``) splits lines on ``\\r``, ``\\n`` and ``\\r\\n``, so a token's
``\\r`` and ``\\r\\n`` reach the client as ``\\n`` (documented behaviour); every other character survives.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from takeoff_client.sse import SSEClient

from liftoff.gateway.http import sse_event


def parse(chunks: Iterable[bytes]) -> list[tuple[str, str]]:
    """``(event, data)`` of every event the official client reads from these chunks."""
    return [(event.event, event.data) for event in SSEClient(list(chunks)).events()]


def as_client_sees(data: str) -> str:
    return data.replace("\r\n", "\n").replace("\r", "\n")


# ---- the produced text ------------------------------------------------------------------------------------------


def test_single_line() -> None:
    assert sse_event("hello") == "data: hello\n\n"


def test_leading_spaces_are_kept_after_the_field_space() -> None:
    assert sse_event("  two spaces") == "data:   two spaces\n\n"


def test_every_line_gets_its_own_data_field() -> None:
    assert sse_event("a\nb") == "data: a\ndata: b\n\n"
    assert sse_event("a\r\nb") == "data: a\ndata: b\n\n"
    assert sse_event("a\rb") == "data: a\ndata: b\n\n"
    assert sse_event("a\n") == "data: a\ndata: \n\n"
    assert sse_event("\n") == "data: \ndata: \n\n"


def test_event_name() -> None:
    assert sse_event('{"detail": "x"}', event="error") == 'event: error\ndata: {"detail": "x"}\n\n'


def test_output_has_no_bare_carriage_returns() -> None:
    for data in ("a\rb", "a\r\nb", "\r\r\n\n\r"):
        assert "\r" not in sse_event(data)


# ---- read back by the official client ---------------------------------------------------------------------------


TOKENS = [
    "hello",
    " world",
    "  leading spaces",
    "trailing space ",
    " ",
    "",
    "multi\nline",
    "ends with newline\n",
    "\n",
    "\n\nblank lines first",
    "a\n\nb",
    "windows\r\nline\r\nbreaks",
    "old mac\rbreak",
    "mixed\r\n\r\n\n\r",
    ":starts with a colon",
    "data: looks like a field",
    "event: also a field",
    "tab\tseparated",
    "é漢字🙂",
    "other breaks \x0b \x0c \x1c \x85 \u2028 \u2029 stay",
    '{"json": "with \\n escaped"}',
]


@pytest.mark.parametrize("data", TOKENS)
def test_official_client_reads_the_data_back(data: str) -> None:
    assert parse([sse_event(data).encode()]) == [("message", as_client_sees(data))]


def test_carriage_returns_become_newlines_for_the_client() -> None:
    assert parse([sse_event("a\r\nb\rc").encode()]) == [("message", "a\nb\nc")]


def test_named_event_reaches_the_client() -> None:
    assert parse([sse_event("boom\nline 2", event="error").encode()]) == [("error", "boom\nline 2")]


def test_a_whole_stream_in_one_chunk() -> None:
    stream = "".join(sse_event(token) for token in TOKENS).encode()
    assert parse([stream]) == [("message", as_client_sees(token)) for token in TOKENS]


STREAM_TOKENS = ["Hello", " wor\nld", "  two\r\nlines\r", "\n", "é🙂", ""]


def _stream() -> tuple[bytes, list[tuple[str, str]]]:
    raw = "".join(sse_event(token) for token in STREAM_TOKENS) + sse_event("the end", event="error")
    expected = [("message", as_client_sees(token)) for token in STREAM_TOKENS] + [("error", "the end")]
    return raw.encode(), expected


def test_every_split_into_two_chunks() -> None:
    raw, expected = _stream()
    for cut in range(len(raw) + 1):
        assert parse([raw[:cut], raw[cut:]]) == expected, cut


def test_every_split_into_three_chunks() -> None:
    raw, expected = _stream()
    for first in range(len(raw) + 1):
        for second in range(first, len(raw) + 1):
            chunks = [raw[:first], raw[first:second], raw[second:]]
            assert parse(chunks) == expected, (first, second)


def test_byte_by_byte() -> None:
    raw, expected = _stream()
    assert parse(raw[index : index + 1] for index in range(len(raw))) == expected
