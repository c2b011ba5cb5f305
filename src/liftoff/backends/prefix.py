"""Prefix caching helpers shared by the generation backends: matching prompts against tokens already in a KV cache.

Both backends keep, for each cache slot or row that no sequence uses, the tokens whose keys and values are still
there (``kept``). A new prompt that starts with some of those tokens (a system prompt, the earlier turns of a
chat) reuses them and prefills only the rest. :class:`RowPrefixes` is the transformers backend's bookkeeping:
its running rows move (the cache stays contiguous), so what a free row holds changes as rows leave.
"""

from __future__ import annotations

from collections.abc import Sequence


def shared_prefix(kept: Sequence[int], prompt: Sequence[int]) -> int:
    """How many first tokens ``kept`` and ``prompt`` have in common."""
    shared = 0
    for a, b in zip(kept, prompt, strict=False):
        if a != b:
            break
        shared += 1
    return shared


def flag(value: object, *, default: bool) -> bool:
    """A boolean backend option given as a bool, a number or a string (``true``/``false``, ``1``/``0``, ...)."""
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() not in {"false", "0", "no", "off", ""}
    return bool(value)


class RowPrefixes:
    """Which tokens each free row of a row-per-sequence KV cache still holds, and where a prompt's prefix is."""

    def __init__(self) -> None:
        self._kept: dict[int, list[int]] = {}

    def keep(self, row: int, tokens: list[int]) -> None:
        """Row ``row`` is free and holds the keys and values of ``tokens`` (positions ``0..len-1``)."""
        if tokens:
            self._kept[row] = tokens
        else:
            self._kept.pop(row, None)

    def overwrite(self, row: int) -> None:
        """Row ``row`` is about to be written: what it held is gone."""
        self._kept.pop(row, None)

    def clear(self) -> None:
        self._kept.clear()

    def best_source(self, prompt: list[int], own_row: int, running: Sequence[Sequence[int]]) -> tuple[int, int]:
        """The row holding the longest prefix of ``prompt``, and its length.

        Candidates are the running rows (``running[i]`` lists the tokens in row ``i``) and ``own_row``, the free
        row the prompt goes into (no copy needed). Other free rows are left out: they may be written by the same
        prefill before they are read.
        """
        best_row = own_row
        best = shared_prefix(self._kept.get(own_row, ()), prompt)
        for row, tokens in enumerate(running):
            shared = shared_prefix(tokens, prompt)
            if shared > best:
                best_row, best = row, shared
        return best_row, best
