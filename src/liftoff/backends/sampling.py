"""Token selection shared by the real-model backends, in numpy: one implementation, one set of semantics.

Per sequence, in Hugging Face ``generate``'s order: repetition penalty (over prompt and output), no-repeat n-grams
(over prompt and output), end-of-sequence suppressed until ``min_new_tokens`` (or always, with ``ignore_eos``),
then greedy (``top_k == 1`` or ``temperature == 0``) or temperature, top-k, top-p and a draw from the sequence's own
random generator (seeded by ``seed`` when given). Greedy rows without penalties are picked together with one
``argmax``.

A sequence of a structured-generation request carries a :class:`Constraint` (its grammar, see
:mod:`liftoff.backends.grammar`): it masks the row before anything else, outranks the no-repeat ban (which is
lifted when it would leave no token the grammar allows) and the end-of-sequence hold (lifted when the grammar
allows nothing else), and is told of each token picked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from liftoff.core.types import FinishReason, GenerationParams

Logits = npt.NDArray[np.float32]


class Constraint(Protocol):
    """A sequence's grammar, as the sampler uses it."""

    @property
    def complete(self) -> bool:
        """Nothing may come next but an end-of-sequence token."""

    def mask(self, row: Logits) -> None:
        """Set the logits of the tokens that may not come next to -inf."""

    def accept(self, token: int) -> None:
        """Move on by the token picked."""


@dataclass(slots=True)
class SamplerState:
    """What the sampler needs to remember about one sequence."""

    params: GenerationParams
    prompt: list[int]
    generated: list[int] = field(default_factory=list)
    constraint: Constraint | None = None
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.params.seed)

    @property
    def greedy(self) -> bool:
        """Whether this sequence decodes greedily."""
        return self.params.top_k == 1 or self.params.temperature == 0

    @property
    def plain(self) -> bool:
        """Greedy with nothing to adjust and no grammar: the batch can take these rows' argmax at once."""
        p = self.params
        adjusted = p.repetition_penalty != 1.0 or p.no_repeat_ngram_size > 0 or self.holds_eos
        return self.greedy and not adjusted and self.constraint is None

    @property
    def grammar_complete(self) -> bool:
        """Whether this sequence's grammar allows nothing more but its end (the backend then finishes it)."""
        return self.constraint is not None and self.constraint.complete

    @property
    def holds_eos(self) -> bool:
        """Whether end-of-sequence tokens are forbidden at this step."""
        return self.params.ignore_eos or len(self.generated) < self.params.min_new_tokens


def _repetition_penalty(row: Logits, state: SamplerState) -> None:
    penalty = state.params.repetition_penalty
    seen = np.unique(np.fromiter((*state.prompt, *state.generated), dtype=np.int64))
    if not seen.size:
        return
    values = row[seen]
    row[seen] = np.where(values < 0, values * penalty, values / penalty)


def _ban_ngrams(row: Logits, state: SamplerState) -> None:
    banned = banned_ngram_tokens([*state.prompt, *state.generated], state.params.no_repeat_ngram_size)
    if not banned:
        return
    kept = row[banned]
    row[banned] = -np.inf
    if state.constraint is not None and not np.isfinite(row).any():
        row[banned] = kept  # the grammar allows nothing else: it outranks the ban


def banned_ngram_tokens(tokens: list[int], size: int) -> list[int]:
    """Tokens that would repeat an n-gram of ``size`` already in ``tokens`` (HF ``no_repeat_ngram_size``)."""
    if size <= 0 or len(tokens) < size:
        return []
    prefix = tuple(tokens[len(tokens) - size + 1 :]) if size > 1 else ()
    banned = []
    for start in range(len(tokens) - size + 1):
        if tuple(tokens[start : start + size - 1]) == prefix:
            banned.append(tokens[start + size - 1])
    return banned


def _top_k_top_p(row: Logits, top_k: int, top_p: float) -> Logits:
    if 0 < top_k < row.size:
        kth = np.partition(row, -top_k)[-top_k]
        row = np.where(row < kth, -np.inf, row).astype(np.float32)
    if top_p < 1.0:
        order = np.argsort(row)[::-1]
        probs = _softmax(row[order])
        keep = np.cumsum(probs) - probs < top_p  # always keeps the most likely token
        cut = np.full(row.shape, -np.inf, dtype=np.float32)
        cut[order[keep]] = row[order[keep]]
        row = cut
    return row


def _softmax(row: Logits) -> Logits:
    shifted = np.exp(row - np.max(row))
    result: Logits = shifted / shifted.sum()
    return result


def _select(row: Logits, state: SamplerState, eos_ids: npt.NDArray[np.int64]) -> int:
    params = state.params
    if state.constraint is not None:
        state.constraint.mask(row)
    if params.repetition_penalty != 1.0:
        _repetition_penalty(row, state)
    if params.no_repeat_ngram_size:
        _ban_ngrams(row, state)
    if state.holds_eos and eos_ids.size and not state.grammar_complete:
        row[eos_ids] = -np.inf
    if state.greedy:
        return int(np.argmax(row))
    row = _top_k_top_p(row / np.float32(params.temperature), params.top_k, params.top_p)
    probs = _softmax(row)
    return int(state.rng.choice(row.size, p=probs))


def sample(logits: Logits, states: list[SamplerState], eos_ids: npt.NDArray[np.int64]) -> list[int]:
    """One token per row of ``logits`` (row ``i`` belongs to ``states[i]``); each is appended to its state (and
    its grammar moved on by it)."""
    chosen = [0] * len(states)
    plain = [i for i, state in enumerate(states) if state.plain]
    if plain:
        picks = np.argmax(logits[plain], axis=1)
        for i, token in zip(plain, picks.tolist(), strict=True):
            chosen[i] = token
    for i, state in enumerate(states):
        if not state.plain:
            chosen[i] = _select(np.array(logits[i], dtype=np.float32), state, eos_ids)
    for state, token in zip(states, chosen, strict=True):
        state.generated.append(token)
        if state.constraint is not None:
            state.constraint.accept(token)
    return chosen


def finish_reason(state: SamplerState, budget: int) -> FinishReason | None:
    """Why a sequence whose last token was not an end-of-sequence token ends now: its grammar allows nothing
    more (``stop``) or it has made ``budget`` tokens (``length``); None while it goes on."""
    if state.grammar_complete:
        return FinishReason.STOP
    if len(state.generated) >= budget:
        return FinishReason.LENGTH
    return None
