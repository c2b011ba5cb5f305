"""The transformers backend's prefix cache: prompts reuse the keys and values of a prefix already in a cache row.

Sources are the running rows and the free row a prompt goes into (what a finished sequence left there). A hit
must skip the shared positions (``reused_tokens``) and give the logits of a cold prefill (float32, tiny model:
equal up to float rounding), whichever row the prefix came from and however the rows moved since.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from liftoff.backends.transformers.backend import TransformersBackend
from liftoff.core.types import GenerationParams
from tests.models.test_transformers_backend import drain, make_backend, record_sampling

SYSTEM = "You are a careful assistant who answers in one short sentence. "
QUESTIONS = ["What is a river?", "Why is the sea salty?", "Name a planet.", "What do bees make?"]


@pytest.fixture(scope="module")
def cached(tiny_llama: Path) -> Iterator[TransformersBackend]:
    backend = make_backend(tiny_llama, max_batch_size=4, backend_options={"prefix_cache": True})
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def cold(tiny_llama: Path) -> Iterator[TransformersBackend]:
    backend = make_backend(tiny_llama, max_batch_size=4, backend_options={"prefix_cache": "off"})
    yield backend
    backend.close()


def first_logits(
    backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch, requests: dict[str, str]
) -> dict[str, np.ndarray]:
    """Admit ``requests`` together, run them to the end; the logits each one's first token came from."""
    calls = record_sampling(backend, monkeypatch)
    for request_id, text in requests.items():
        backend.admit(request_id, text, GenerationParams(max_new_tokens=4, ignore_eos=True))
    drain(backend)
    monkeypatch.undo()
    firsts: dict[str, np.ndarray] = {}
    for call in calls:
        for row, request_id in enumerate(call.request_ids):
            firsts.setdefault(request_id, call.logits[row])
    return firsts


def assert_same(hit: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    assert hit.keys() == reference.keys()
    for request_id in hit:
        np.testing.assert_allclose(hit[request_id], reference[request_id], atol=2e-4, rtol=0)


def test_a_finished_sequence_leaves_its_prefix_for_the_next(
    cached: TransformersBackend, cold: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_logits(cached, monkeypatch, {"first": SYSTEM + QUESTIONS[0]})
    before = cached.reused_tokens
    hit = first_logits(cached, monkeypatch, {"second": SYSTEM + QUESTIONS[1]})
    shared = len(cached.tokenize(SYSTEM, add_special_tokens=False)) - 1  # the last word's token may merge
    assert cached.reused_tokens - before >= shared > 10
    assert_same(hit, first_logits(cold, monkeypatch, {"second": SYSTEM + QUESTIONS[1]}))
    assert cold.reused_tokens == 0


def test_running_rows_lend_their_prefix_to_new_prompts(
    cached: TransformersBackend, cold: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts admitted while another sequence decodes copy the system prompt from its row."""
    long_run = GenerationParams(max_new_tokens=30, ignore_eos=True)
    references: dict[str, np.ndarray] = {}
    for backend in (cached, cold):
        backend.admit("runner", SYSTEM + "Tell me a long story.", long_run)
        backend.step()
        backend.step()
    before = cached.reused_tokens
    requests = {f"q{index}": SYSTEM + question for index, question in enumerate(QUESTIONS[:3])}
    hit = first_logits(cached, monkeypatch, requests)
    references = first_logits(cold, monkeypatch, requests)
    assert cached.reused_tokens - before >= 3 * 10
    assert_same(hit, references)


def test_rows_moved_by_departures_keep_their_prefixes_right(
    cached: TransformersBackend, cold: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequences of different lengths finish in another order than they started, so rows move; then reuse."""
    for backend in (cached, cold):
        for index, question in enumerate(QUESTIONS):
            backend.admit(
                f"m{index}", SYSTEM + question, GenerationParams(max_new_tokens=2 + 3 * index, ignore_eos=True)
            )
        drain(backend)
    requests = {f"after{index}": SYSTEM + question[::-1] for index, question in enumerate(QUESTIONS[:2])}
    before = cached.reused_tokens
    hit = first_logits(cached, monkeypatch, requests)
    assert cached.reused_tokens > before
    assert_same(hit, first_logits(cold, monkeypatch, requests))


def test_an_unrelated_prompt_reuses_nothing(cached: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    first_logits(cached, monkeypatch, {"x": SYSTEM + QUESTIONS[0]})
    before = cached.reused_tokens
    first_logits(cached, monkeypatch, {"y": "Zebras " + QUESTIONS[0]})
    assert cached.reused_tokens == before
