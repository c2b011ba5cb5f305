"""Stop strings (``GenerationParams.stop``), applied by the reader to the text a backend streams.

A backend emits text piece by piece, and a stop string may straddle pieces, so the scanner holds back the tail that
could still be the start of a stop string. When a stop string appears, the text before it is released and the
request ends: the stop string itself is never returned (as in OpenAI's API).

Each stop string is followed by a Knuth-Morris-Pratt matcher: its state is how much of the stop string the text
ends with, and each new character moves it in amortised constant time. A piece thus costs its own length times
the number of stop strings, however long they are (rescanning the held tail for every piece cost the square of a
stop string's length, and a megabyte stop string stalled the engine).
"""

from __future__ import annotations


class _Matcher:
    """How much of one stop string the text seen so far ends with."""

    __slots__ = ("_fail", "matched", "stop")

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.matched = 0
        self._fail = _failure(stop)

    def feed(self, char: str) -> bool:
        """Move on by one character; True when the text now ends with the whole stop string."""
        stop, matched = self.stop, self.matched
        while matched and stop[matched] != char:
            matched = self._fail[matched - 1]
        if stop[matched] == char:
            matched += 1
        if matched == len(stop):
            self.matched = self._fail[matched - 1]
            return True
        self.matched = matched
        return False


def _failure(pattern: str) -> list[int]:
    """KMP's table: for each prefix, the length of its longest proper suffix that is also a prefix."""
    table = [0] * len(pattern)
    size = 0
    for index in range(1, len(pattern)):
        while size and pattern[index] != pattern[size]:
            size = table[size - 1]
        if pattern[index] == pattern[size]:
            size += 1
        table[index] = size
    return table


class StopScanner:
    """Finds the first stop string in a stream of text pieces, releasing only text that cannot start one."""

    __slots__ = ("_held", "_matchers")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._matchers = [_Matcher(stop) for stop in dict.fromkeys(stops) if stop]
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add a piece; return the text that is safe to release and whether a stop string was found."""
        text = self._held + piece
        start = len(self._held)
        for offset, char in enumerate(piece, start):
            ended = [matcher for matcher in self._matchers if matcher.feed(char)]
            if ended:
                self._held = ""
                return text[: offset + 1 - max(len(matcher.stop) for matcher in ended)], True
        hold = max((matcher.matched for matcher in self._matchers), default=0)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """The held-back text, at the end of the generation (no stop string followed it)."""
        held, self._held = self._held, ""
        return held
