"""The llama.cpp backend's prefix cache: a new prompt reuses the KV of the longest matching prefix left in a slot.

A hit must skip the shared tokens (``reused_tokens``), leave nothing of the earlier sequence beyond the shared
prefix, and give the same next-token distribution as a cold prefill (up to rounding: the reused positions were
computed in other calls).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make venv builds it)")

from liftoff.backends.base import BackendContext
from liftoff.backends.llamacpp import backend as llamacpp_module
from liftoff.backends.llamacpp.backend import LlamaCppBackend
from liftoff.backends.resolve import resolve_model
from liftoff.backends.sampling import SamplerState
from liftoff.config.models import ReaderConfig
from liftoff.core.types import FinishReason, GenerationParams
from tests.models.runs import Run, drain

MODEL = "smollm2-135m-instruct"
CHAT = GenerationParams(max_new_tokens=8, use_chat_template=True)


def make_backend(tmp_path_factory: pytest.TempPathFactory, *, prefix_cache: object) -> LlamaCppBackend:
    config = ReaderConfig(
        model_name=MODEL,
        device="cpu",
        max_batch_size=2,
        max_sequence_length=512,
        backend_options={"n_threads": 1, "prefix_cache": prefix_cache},
    )
    backend = LlamaCppBackend(config, BackendContext(model=resolve_model(MODEL, tmp_path_factory.mktemp("repo"))))
    backend.load(lambda fraction: None)
    return backend


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppBackend]:
    backend = make_backend(tmp_path_factory, prefix_cache=True)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppBackend]:
    backend = make_backend(tmp_path_factory, prefix_cache="false")  # options may come as strings from the env
    yield backend
    backend.close()


@pytest.fixture
def first_logits(monkeypatch: pytest.MonkeyPatch) -> list[npt.NDArray[np.float32]]:
    """The logits each request's first token was chosen from, in the order the requests ran (one at a time)."""
    captured: list[npt.NDArray[np.float32]] = []
    real = llamacpp_module.sample

    def capturing(logits: Any, batch: list[SamplerState], eos_ids: Any) -> list[int]:
        captured.extend(np.array(logits[row], copy=True) for row, state in enumerate(batch) if not state.generated)
        return real(logits, batch, eos_ids)

    monkeypatch.setattr(llamacpp_module, "sample", capturing)
    return captured


def run(backend: LlamaCppBackend, request_id: str, text: str, params: GenerationParams = CHAT) -> Run:
    backend.admit(request_id, text, params)
    return drain(backend, {})[request_id]


def prompt_tokens(backend: LlamaCppBackend, text: str) -> int:
    return len(backend.tokenize(text, use_chat_template=True))


def test_a_shared_system_prompt_is_not_prefilled_again(cached: LlamaCppBackend) -> None:
    first = run(cached, "a", "Name a colour.")
    before = cached.reused_tokens
    second = run(cached, "b", "Name a fruit.")
    shared = 0
    for x, y in zip(
        cached.tokenize("Name a colour.", use_chat_template=True),
        cached.tokenize("Name a fruit.", use_chat_template=True),
        strict=False,
    ):
        if x != y:
            break
        shared += 1
    assert shared > 20  # SmolLM2's default system prompt
    assert cached.reused_tokens - before == shared
    assert first.reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert second.text.strip()
    assert second.final is not None
    assert second.final.prompt_tokens == prompt_tokens(cached, "Name a fruit.")


def test_the_same_prompt_again_prefills_only_its_last_token(cached: LlamaCppBackend) -> None:
    run(cached, "a", "Tell me about rivers.")
    before = cached.reused_tokens
    again = run(cached, "b", "Tell me about rivers.")
    assert cached.reused_tokens - before == prompt_tokens(cached, "Tell me about rivers.") - 1
    assert again.text.strip()


def test_a_hit_gives_the_distribution_of_a_cold_prefill(
    cached: LlamaCppBackend, cold: LlamaCppBackend, first_logits: list[npt.NDArray[np.float32]]
) -> None:
    run(cached, "warm-up", "Describe a quiet harbour at dawn.")
    prompts = ["Describe a busy market at noon.", "Describe a quiet harbour at night."]
    for index, text in enumerate(prompts):
        before = cached.reused_tokens
        run(cached, f"hit{index}", text)
        assert cached.reused_tokens > before
        run(cold, f"cold{index}", text)
    assert cold.reused_tokens == 0
    assert len(first_logits) == 1 + 2 * len(prompts)
    for index in range(len(prompts)):
        hit, reference = first_logits[1 + 2 * index], first_logits[2 + 2 * index]
        assert np.abs(hit - reference).max() < 0.5
        assert np.argsort(hit)[-5:].tolist().count(int(np.argmax(reference))) == 1


def test_nothing_of_the_previous_sequence_beyond_the_prefix_is_kept(
    cached: LlamaCppBackend, cold: LlamaCppBackend, first_logits: list[npt.NDArray[np.float32]]
) -> None:
    """A long earlier answer left in the slot must not leak into a prompt that shares only its beginning."""
    run(
        cached, "long", "The history of the printing press begins", GenerationParams(max_new_tokens=40, ignore_eos=True)
    )
    before = cached.reused_tokens
    run(cached, "hit", "The history of bread", GenerationParams(max_new_tokens=2))
    assert cached.reused_tokens - before == 3  # "The", " history", " of"
    run(cold, "reference", "The history of bread", GenerationParams(max_new_tokens=2))
    _, hit, reference = first_logits
    assert np.abs(hit - reference).max() < 0.5


def test_an_aborted_prefill_leaves_a_usable_prefix(cached: LlamaCppBackend) -> None:
    cached.admit("gone", "Explain how tides work. " * 10, GenerationParams(max_new_tokens=4))
    assert cached.abort("gone")  # aborted before its prefill ran: its slot keeps nothing
    answer = run(cached, "next", "Explain how tides work.", GenerationParams(max_new_tokens=4))
    assert answer.final is not None
    assert answer.final.completion_tokens >= 1
    assert cached.active() == 0
