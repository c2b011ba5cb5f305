"""Token selection shared by the real-model backends, in numpy: one implementation, one set of semantics.

Per sequence, in Hugging Face ``generate``'s order: repetition penalty (over prompt and output), no-repeat n-grams
(over prompt and output), end-of-sequence suppressed until ``min_new_tokens`` (or always, with ``ignore_eos``),
then greedy (``top_k == 1`` or ``temperature == 0``) or temperature, top-k, top-p and a draw from the sequence's own
random generator (seeded by ``seed`` when given). Greedy rows without penalties are picked together with one
``argmax``.

Numerically safe for any value a request may carry: a temperature below :data:`MIN_TEMPERATURE` is greedy (dividing
by ``1e-40`` overflows to infinities and NaN), probabilities are computed in float64 from finite logits only, and a
row left with no finite logit falls back to its most likely token. A failure while choosing one row's token (a
grammar that refuses, a bug) fails that row alone: :func:`sample` returns :data:`FAILED` for it and keeps the
exception in its state, and the backend ends that sequence with an error while the others go on.

No-repeat n-grams are looked up in an index of the sequence's n-grams kept up to date token by token
(:class:`NgramIndex`), so a step costs the same however long the sequence is.

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

from liftoff.core.errors import BackendError
from liftoff.core.types import FinishReason, GenerationParams

Logits = npt.NDArray[np.float32]
Wide = npt.NDArray[np.float64]  # probabilities are computed in float64

MIN_TEMPERATURE = 1e-5  # below this a temperature is greedy (as vLLM does): the division would overflow
_HUGE_LOGIT = 1e30  # an infinite logit becomes this: the most likely token, and no overflow in the softmax
FAILED = -1  # the token :func:`sample` gives a row whose choice failed (its state keeps the exception)


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
    failure: Exception | None = None  # why the last choice failed (the row got FAILED)
    ngrams: NgramIndex | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        seed = self.params.seed
        self.rng = np.random.default_rng(None if seed is None else seed % (1 << 64))  # negative seeds too

    @property
    def greedy(self) -> bool:
        """Whether this sequence decodes greedily."""
        return self.params.top_k == 1 or self.params.temperature < MIN_TEMPERATURE

    def banned_ngrams(self) -> list[int]:
        """The tokens that would repeat an n-gram of ``no_repeat_ngram_size`` (the index is built on first use)."""
        if self.ngrams is None:
            self.ngrams = NgramIndex(self.params.no_repeat_ngram_size, self.prompt)
        return self.ngrams.banned(self.generated)

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


class NgramIndex:
    """Every n-gram of a sequence, as (its first n-1 tokens) → {the tokens that completed it}, kept up to date.

    It holds its own copy of the tokens and catches up with the sequence's output when asked, so asking costs the
    new tokens only, not the sequence's length (the plain scan cost a whole pass per token).
    """

    __slots__ = ("_follow", "_indexed", "_prompt", "size", "tokens")

    def __init__(self, size: int, prompt: list[int]) -> None:
        self.size = size
        self.tokens: list[int] = list(prompt)
        self._prompt = len(prompt)
        self._follow: dict[tuple[int, ...], set[int]] = {}
        self._indexed = 0  # tokens whose n-gram (the one ending there) is in the index
        self._catch_up()

    def _catch_up(self) -> None:
        n, tokens = self.size, self.tokens
        for end in range(max(self._indexed, n - 1), len(tokens)):
            self._follow.setdefault(tuple(tokens[end - n + 1 : end]), set()).add(tokens[end])
        self._indexed = len(tokens)

    def banned(self, generated: list[int]) -> list[int]:
        """The tokens that would complete an n-gram already seen, after the sequence's output so far."""
        self.tokens.extend(generated[len(self.tokens) - self._prompt :])
        self._catch_up()
        if self.size <= 0 or len(self.tokens) < self.size:
            return []
        key = tuple(self.tokens[len(self.tokens) - self.size + 1 :]) if self.size > 1 else ()
        return sorted(self._follow.get(key, ()))


def _repetition_penalty(row: Logits, state: SamplerState) -> None:
    penalty = state.params.repetition_penalty
    seen = np.unique(np.fromiter((*state.prompt, *state.generated), dtype=np.int64))
    if not seen.size:
        return
    values = row[seen]
    row[seen] = np.where(values < 0, values * penalty, values / penalty)


def _ban_ngrams(row: Logits, state: SamplerState) -> None:
    banned = state.banned_ngrams()
    if not banned:
        return
    kept = row[banned]
    row[banned] = -np.inf
    if state.constraint is not None and not np.isfinite(row).any():
        row[banned] = kept  # the grammar allows nothing else: it outranks the ban


def banned_ngram_tokens(tokens: list[int], size: int) -> list[int]:
    """Tokens that would repeat an n-gram of ``size`` already in ``tokens`` (HF ``no_repeat_ngram_size``): the plain
    scan that :class:`NgramIndex` answers incrementally (kept as its reference)."""
    if size <= 0 or len(tokens) < size:
        return []
    prefix = tuple(tokens[len(tokens) - size + 1 :]) if size > 1 else ()
    banned = []
    for start in range(len(tokens) - size + 1):
        if tuple(tokens[start : start + size - 1]) == prefix:
            banned.append(tokens[start + size - 1])
    return banned


def _top_k_top_p(row: Wide, top_k: int, top_p: float) -> Wide:
    if 0 < top_k < row.size:
        kth = np.partition(row, -top_k)[-top_k]
        row = np.where(row < kth, -np.inf, row).astype(row.dtype)
    if top_p < 1.0:
        order = np.argsort(row)[::-1]
        probs = _softmax(row[order])
        keep = np.cumsum(probs) - probs < top_p  # always keeps the most likely token
        cut = np.full(row.shape, -np.inf, dtype=row.dtype)
        cut[order[keep]] = row[order[keep]]
        row = cut
    return row


def _softmax(row: Wide) -> Wide:
    shifted = np.exp(row - np.max(row))
    result: Wide = shifted / shifted.sum()
    return result


def _draw(row: Logits, state: SamplerState) -> int:
    """A token drawn from ``row`` (temperature, top-k and top-p applied), in float64 and from finite logits only;
    the most likely token when nothing finite is left."""
    params = state.params
    scaled = np.nan_to_num(row.astype(np.float64) / params.temperature, nan=-np.inf, posinf=_HUGE_LOGIT)
    kept = _top_k_top_p(scaled, params.top_k, params.top_p)
    if not np.isfinite(kept).any():
        return int(np.argmax(np.nan_to_num(row, nan=-np.inf)))
    shifted = np.exp(kept - kept.max())
    probs = shifted / shifted.sum()
    return int(state.rng.choice(row.size, p=probs))


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
        return int(np.argmax(np.nan_to_num(row, nan=-np.inf)))
    return _draw(row, state)


def sample(logits: Logits, states: list[SamplerState], eos_ids: npt.NDArray[np.int64]) -> list[int]:
    """One token per row of ``logits`` (row ``i`` belongs to ``states[i]``); each is appended to its state (and
    its grammar moved on by it). A row whose choice failed gets :data:`FAILED` and keeps the reason in its state."""
    chosen = [0] * len(states)
    plain = [i for i, state in enumerate(states) if state.plain]
    if plain:
        picks = np.argmax(logits[plain], axis=1)
        for i, token in zip(plain, picks.tolist(), strict=True):
            chosen[i] = token
    for i, state in enumerate(states):
        if not state.plain:
            chosen[i] = _choose(logits[i], state, eos_ids)
    for i, (state, token) in enumerate(zip(states, chosen, strict=True)):
        if token != FAILED and not _take(state, token):
            chosen[i] = FAILED
    return chosen


def _choose(row: Logits, state: SamplerState, eos_ids: npt.NDArray[np.int64]) -> int:
    """One row's token, or :data:`FAILED` with the exception kept in ``state``: one row's failure stays its own."""
    try:
        return _select(np.array(row, dtype=np.float32), state, eos_ids)
    except Exception as exc:
        state.failure = exc
        return FAILED


def _take(state: SamplerState, token: int) -> bool:
    """Append ``token`` and move the grammar on by it; False (and nothing appended) when the grammar fails."""
    state.generated.append(token)
    if state.constraint is None:
        return True
    try:
        state.constraint.accept(token)
    except Exception as exc:
        state.failure = exc
        state.generated.pop()
        return False
    return True


def sequence_failure(state: SamplerState) -> BackendError:
    """The error that ends a sequence whose token could not be chosen (see :data:`FAILED`)."""
    reason = state.failure
    what = f"{type(reason).__name__}: {reason}" if reason is not None else "unknown reason"
    return BackendError(f"choosing the next token failed ({what}); this request ended, others were not affected")


def finish_reason(state: SamplerState, budget: int) -> FinishReason | None:
    """Why a sequence whose last token was not an end-of-sequence token ends now: its grammar allows nothing
    more (``stop``) or it has made ``budget`` tokens (``length``); None while it goes on."""
    if state.grammar_complete:
        return FinishReason.STOP
    if len(state.generated) >= budget:
        return FinishReason.LENGTH
    return None
