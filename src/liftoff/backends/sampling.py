"""Token selection shared by the real-model backends, in numpy: one implementation, one set of semantics.

Per sequence, in Hugging Face ``generate``'s order: repetition penalty (over prompt and output), no-repeat n-grams
(over prompt and output), end-of-sequence suppressed until ``min_new_tokens`` (or always, with ``ignore_eos``),
then greedy (``top_k == 1`` or ``temperature == 0``) or temperature, top-k, top-p and a draw from the sequence's own
random generator (seeded by ``seed`` when given). Greedy rows without penalties are picked together with one
``argmax``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from liftoff.core.types import GenerationParams

Logits = npt.NDArray[np.float32]


@dataclass(slots=True)
class SamplerState:
    """What the sampler needs to remember about one sequence."""

    params: GenerationParams
    prompt: list[int]
    generated: list[int] = field(default_factory=list)
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.params.seed)

    @property
    def greedy(self) -> bool:
        """Whether this sequence decodes greedily."""
        return self.params.top_k == 1 or self.params.temperature == 0

    @property
    def plain(self) -> bool:
        """Greedy with nothing to adjust: the batch can take these rows' argmax at once."""
        p = self.params
        return self.greedy and p.repetition_penalty == 1.0 and not p.no_repeat_ngram_size and not self.holds_eos

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
    if params.repetition_penalty != 1.0:
        _repetition_penalty(row, state)
    if params.no_repeat_ngram_size:
        banned = banned_ngram_tokens([*state.prompt, *state.generated], params.no_repeat_ngram_size)
        if banned:
            row[banned] = -np.inf
    if state.holds_eos and eos_ids.size:
        row[eos_ids] = -np.inf
    if state.greedy:
        return int(np.argmax(row))
    row = _top_k_top_p(row / np.float32(params.temperature), params.top_k, params.top_p)
    probs = _softmax(row)
    return int(state.rng.choice(row.size, p=probs))


def sample(logits: Logits, states: list[SamplerState], eos_ids: npt.NDArray[np.int64]) -> list[int]:
    """One token per row of ``logits`` (row ``i`` belongs to ``states[i]``); each is appended to its state."""
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
    return chosen
