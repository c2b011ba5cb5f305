"""The transformers backend with ``backend_options.quantize: int8`` on the tiny Llama and on the bundled SmolLM2."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch

from liftoff.backends.transformers import load as hf_load
from liftoff.backends.transformers.backend import TransformersBackend
from liftoff.backends.transformers.int8 import Int8Linear, Int8Slice
from liftoff.backends.transformers.load import ModelLoadError
from liftoff.core.types import GenerationParams
from tests.models.conftest import Dequantized
from tests.models.test_transformers_backend import PROMPTS, generate, greedy, make_backend, record_sampling

INT8 = {"quantize": "int8"}


@pytest.fixture(scope="module")
def tiny_int8(tiny_llama: Path) -> Iterator[TransformersBackend]:
    backend = make_backend(tiny_llama, max_batch_size=8, backend_options=INT8)
    yield backend
    backend.close()


def _linears(backend: TransformersBackend) -> tuple[int, int, int]:
    """(int8 layers alone, int8 layers sharing a product, nn.Linear layers left)."""
    modules = list(backend._model().model.modules())
    products = {id(m.shared.product) for m in modules if isinstance(m, Int8Slice)}
    alone = [m for m in modules if isinstance(m, Int8Linear) and id(m) not in products]
    shared = [m for m in modules if isinstance(m, Int8Slice)]
    calibrated = all(m.outlier_index is not None for m in alone) and all(
        m.shared.product.outlier_index is not None for m in shared
    )
    assert calibrated or not (alone or shared), "some int8 layers have no float outlier channels"
    return len(alone), len(shared), sum(isinstance(m, torch.nn.Linear) for m in modules)


def test_every_linear_layer_runs_in_int8_with_float_outlier_channels(tiny_int8: TransformersBackend) -> None:
    alone, shared, left = _linears(tiny_int8)
    layers = tiny_int8._model().model.config.num_hidden_layers
    assert shared == 5 * layers  # q, k, v share one product and gate, up another: they read the same input
    assert alone == 2 * layers + 1  # o and down per layer, and the LM head
    assert left == 0


def test_int8_greedy_is_deterministic_for_a_fixed_batch(tiny_int8: TransformersBackend) -> None:
    params = greedy(16)
    alone = {key: generate(tiny_int8, {key: (text, params)})[key].text for key, text in PROMPTS.items()}
    again = {key: generate(tiny_int8, {key: (text, params)})[key].text for key, text in PROMPTS.items()}
    together = generate(tiny_int8, {key: (text, params) for key, text in PROMPTS.items()})
    together_again = generate(tiny_int8, {key: (text, params) for key, text in PROMPTS.items()})
    assert alone == again
    assert {key: run.text for key, run in together.items()} == {key: run.text for key, run in together_again.items()}
    assert all(run.n_tokens == 16 for run in together.values())


def test_int8_logits_follow_the_float_model(
    tiny_llama: Path, tiny_int8: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = make_backend(tiny_llama, max_batch_size=8)
    try:
        seen_float = record_sampling(reference, monkeypatch)
        generate(reference, {"a": (PROMPTS["c"], greedy(1))})
        seen_int8 = record_sampling(tiny_int8, monkeypatch)
        generate(tiny_int8, {"a": (PROMPTS["c"], greedy(1))})
    finally:
        reference.close()
    want = torch.from_numpy(seen_float[0].logits[0])
    got = torch.from_numpy(seen_int8[0].logits[0])
    assert not torch.equal(got, want)  # the products really are different
    assert torch.corrcoef(torch.stack([got, want]))[0, 1] > 0.99


def test_int8_asks_for_float32_and_refuses_other_dtypes(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_load, "cpu_has_amx", lambda: True)  # where auto would otherwise pick bfloat16
    backend = make_backend(tiny_llama, backend_options={**INT8, "dtype": "auto"})
    try:
        assert backend._model().dtype == torch.float32
        assert _linears(backend)[1] > 0
    finally:
        backend.close()
    with pytest.raises(ModelLoadError, match="float32 only"):
        make_backend(tiny_llama, backend_options={**INT8, "dtype": "bfloat16"})
    with pytest.raises(ModelLoadError, match="quantize='int4' is not one of"):
        make_backend(tiny_llama, backend_options={"quantize": "int4"})


def test_quantize_none_keeps_float_products(tiny_llama: Path) -> None:
    backend = make_backend(tiny_llama, backend_options={"quantize": "none"})
    try:
        assert _linears(backend)[:2] == (0, 0)
        assert _linears(backend)[2] > 0
    finally:
        backend.close()


def test_smollm2_in_int8_answers_and_is_deterministic_for_a_fixed_batch(smollm2_dequantized: Dequantized) -> None:
    """Greedy int8 repeats itself for the same batch. Unlike float32 it is not batch-invariant: rounding each
    activation row magnifies the float noise of attention over another span into other tokens (documented)."""
    backend = make_backend(smollm2_dequantized.checkpoint, max_batch_size=4, backend_options=INT8)
    try:
        params = GenerationParams(max_new_tokens=24, use_chat_template=True)
        questions = {
            "capital": "What is the capital of France?",
            "colours": "Name three colours.",
            "hello": "Say hello.",
        }
        alone = generate(backend, {"capital": (questions["capital"], params)})["capital"].text
        first = generate(backend, {key: (text, params) for key, text in questions.items()})
        second = generate(backend, {key: (text, params) for key, text in questions.items()})
    finally:
        backend.close()
    assert "Paris" in alone
    assert {key: run.text for key, run in first.items()} == {key: run.text for key, run in second.items()}
    assert all(run.text for run in first.values())
