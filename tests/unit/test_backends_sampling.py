"""``liftoff.backends.sampling``: safe for any accepted value, one row's failure stays its own, and the n-gram
index answers what the plain scan answers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from liftoff.backends.sampling import (
    FAILED,
    MIN_TEMPERATURE,
    NgramIndex,
    SamplerState,
    banned_ngram_tokens,
    sample,
    sequence_failure,
)
from liftoff.core.types import GenerationParams

EOS = np.array([9], dtype=np.int64)


def state(**fields: object) -> SamplerState:
    return SamplerState(GenerationParams(**fields), prompt=[1, 2, 3])  # type: ignore[arg-type]


def logits(*rows: list[float]) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, MIN_TEMPERATURE / 2, 0.0])
def test_a_tiny_temperature_is_greedy(temperature: float) -> None:
    row = [0.0, 5.0, 1.0, 30.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    states = [state(temperature=temperature, top_k=0, seed=seed) for seed in range(5)]
    assert sample(logits(*[row] * 5), states, EOS) == [3] * 5


def test_just_above_the_threshold_samples_from_finite_probabilities() -> None:
    row = [0.0, 40.0, 39.9999, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    picks = {sample(logits(row), [state(temperature=MIN_TEMPERATURE * 2, top_k=0, seed=s)], EOS)[0] for s in range(20)}
    assert picks <= {1, 2}


def test_non_finite_logits_never_reach_the_draw() -> None:
    nan_row = [float("nan"), 1.0, float("inf"), 0.5, float("-inf"), 0.0, 0.0, 0.0, 0.0, 0.0]
    all_masked = [float("-inf")] * 10
    picks = sample(logits(nan_row, all_masked), [state(temperature=0.7, top_k=0, seed=1), state(seed=2, top_k=0)], EOS)
    assert picks[0] == 2  # the only infinite logit is the most likely token
    assert picks[1] != FAILED  # a row with nothing finite left falls back to its best token


def test_huge_repetition_penalty_keeps_the_row_finite() -> None:
    row = [3.0, -2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    pick = sample(logits(row), [state(repetition_penalty=100.0, temperature=1.0, top_k=0, seed=3)], EOS)[0]
    assert 0 <= pick < 10


def test_negative_and_huge_seeds_are_honoured_reproducibly() -> None:
    row = [0.0] * 10
    for seed in (-7, -(2**63), 2**64 - 1):
        first = [sample(logits(row), [state(temperature=1.0, top_k=0, seed=seed)], EOS)[0] for _ in range(3)]
        assert len(set(first)) == 1


class _Refusing:
    """A grammar that refuses every token it is told of."""

    complete = False

    def mask(self, row: np.ndarray) -> None:
        pass

    def accept(self, token: int) -> None:
        raise RuntimeError("refused")


class _Breaking(_Refusing):
    """A grammar whose mask fails."""

    def mask(self, row: np.ndarray) -> None:
        raise ValueError("mask broke")


def test_one_rows_failure_fails_that_row_alone() -> None:
    rows = logits(*[[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]] * 4)
    states = [state(), state(), state(), state(temperature=0.5, top_k=0, seed=1)]
    states[1].constraint = _Refusing()
    states[2].constraint = _Breaking()
    picks = sample(rows, states, EOS)
    assert picks[0] == 1
    assert picks[3] == 1
    assert picks[1] == picks[2] == FAILED
    assert states[1].generated == []
    assert states[2].generated == []
    assert states[0].generated == [1]
    assert "refused" in sequence_failure(states[1]).message
    assert "mask broke" in sequence_failure(states[2]).message
    assert sequence_failure(states[2]).error_type == "generation_error"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 32])
def test_the_ngram_index_bans_what_the_plain_scan_bans(size: int) -> None:
    rng = random.Random(size)
    prompt = [rng.randrange(6) for _ in range(40)]
    index = NgramIndex(size, prompt)
    generated: list[int] = []
    for _ in range(60):
        assert index.banned(generated) == sorted(set(banned_ngram_tokens(prompt + generated, size)))
        generated.append(rng.randrange(6))


def test_the_index_is_built_on_first_use_and_kept() -> None:
    sampler = state(no_repeat_ngram_size=2)
    sampler.prompt = [4, 5, 4]
    assert sampler.banned_ngrams() == [5]
    first = sampler.ngrams
    sampler.generated.append(6)
    assert sampler.banned_ngrams() == []
    assert sampler.ngrams is first
