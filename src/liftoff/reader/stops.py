"""Stop strings (``GenerationParams.stop``), applied by the reader to the text a backend streams.

A backend emits text piece by piece, and a stop string may straddle pieces, so the scanner holds back the tail that
could still be the start of a stop string. When a stop string appears, the text before it is released and the
request ends: the stop string itself is never returned (as in OpenAI's API).
"""

from __future__ import annotations


class StopScanner:
    """Finds the first stop string in a stream of text pieces, releasing only text that cannot start one."""

    __slots__ = ("_held", "_keep", "_stops")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._keep = max((len(stop) for stop in self._stops), default=1) - 1
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add a piece; return the text that is safe to release and whether a stop string was found."""
        text = self._held + piece
        cut = min((index for stop in self._stops if (index := text.find(stop)) >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return text[:cut], True
        hold = self._partial_tail(text)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """The held-back text, at the end of the generation (no stop string followed it)."""
        held, self._held = self._held, ""
        return held

    def _partial_tail(self, text: str) -> int:
        """Length of the longest end of ``text`` that is a proper prefix of some stop string."""
        for size in range(min(self._keep, len(text)), 0, -1):
            tail = text[len(text) - size :]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0
