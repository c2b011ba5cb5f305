"""The transformers backend on CUDA: the continuous-batching contract of the CPU tests, on the GPU, in float32 and
bfloat16 (``device: cuda``), and driven by the reader's engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch

from liftoff.backends.base import BackendContext
from liftoff.backends.resolve import ResolvedModel
from liftoff.backends.transformers.backend import TransformersBackend
from liftoff.config.models import ReaderConfig
from liftoff.core.types import GenerationParams
from tests.models.test_transformers_backend import PROMPTS, Run, drain, generate, greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def drain_steps(backend: TransformersBackend, steps: int) -> dict[str, Run]:
    """Run ``steps`` steps; what each request produced so far."""
    runs: dict[str, Run] = {}
    for _ in range(steps):
        for out in backend.step():
            run = runs.setdefault(out.request_id, Run())
            run.pieces.append(out.text)
            run.n_tokens += out.n_tokens
            if out.finish_reason is not None:
                run.final = out
    return runs


def cuda_backend(path: Path, dtype: str, **fields: Any) -> TransformersBackend:
    options = {"dtype": dtype, "prefix_cache": False}
    config = ReaderConfig.model_validate({"model_name": "tiny", "device": "cuda", "max_batch_size": 8,
                                          "backend_options": options, **fields})  # fmt: skip
    context = BackendContext(repository_path=path.parent, model=ResolvedModel("tiny", path, "hf"))
    backend = TransformersBackend(config, context)
    backend.load(lambda fraction: None)
    return backend


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def cuda(request: pytest.FixtureRequest, cuda_tiny_llama: Path) -> Any:
    backend = cuda_backend(cuda_tiny_llama, request.param)
    yield backend
    backend.close()


def test_the_model_and_its_cache_live_on_the_gpu(cuda: TransformersBackend) -> None:
    loaded = cuda._model()
    parameter = next(loaded.model.parameters())
    assert parameter.device.type == "cuda"
    assert parameter.dtype == loaded.dtype
    generate(cuda, {"x": (PROMPTS["a"], greedy(4))})
    assert torch.cuda.memory_allocated() > 0


def test_greedy_is_deterministic_and_batched_equals_alone(cuda: TransformersBackend) -> None:
    alone = {rid: generate(cuda, {rid: (text, greedy(16))})[rid].text for rid, text in PROMPTS.items()}
    again = {rid: generate(cuda, {rid: (text, greedy(16))})[rid].text for rid, text in PROMPTS.items()}
    together = generate(cuda, {rid: (text, greedy(16)) for rid, text in PROMPTS.items()})
    assert again == alone
    assert {rid: run.text for rid, run in together.items()} == alone
    assert all(run.n_tokens == 16 for run in together.values())


def test_float32_on_the_gpu_gives_the_cpus_greedy_tokens(cuda: TransformersBackend, cuda_tiny_llama: Path) -> None:
    if cuda._model().dtype != torch.float32:
        pytest.skip("bfloat16 rounds differently from the CPU's float32")
    from tests.models.test_transformers_backend import make_backend

    cpu = make_backend(cuda_tiny_llama, max_batch_size=8)
    try:
        on_cpu = generate(cpu, {rid: (text, greedy(16)) for rid, text in PROMPTS.items()})
    finally:
        cpu.close()
    on_gpu = generate(cuda, {rid: (text, greedy(16)) for rid, text in PROMPTS.items()})
    assert {r: run.text for r, run in on_gpu.items()} == {r: run.text for r, run in on_cpu.items()}


def test_sampling_with_a_seed_is_reproducible_on_the_gpu(cuda: TransformersBackend) -> None:
    params = GenerationParams(max_new_tokens=16, ignore_eos=True, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    first = generate(cuda, {"s": (PROMPTS["b"], params)})["s"].text
    assert generate(cuda, {"s": (PROMPTS["b"], params)})["s"].text == first


def test_abort_frees_the_slot_and_the_others_continue(cuda: TransformersBackend) -> None:
    expected = generate(cuda, {"keep": (PROMPTS["a"], greedy(20))})["keep"].text
    cuda.admit("keep", PROMPTS["a"], greedy(20))
    cuda.admit("drop", PROMPTS["b"], greedy(20))
    runs = drain_steps(cuda, 3)
    cuda.abort("drop")
    drain(cuda, runs)
    assert cuda.active() == 0
    assert runs["keep"].text == expected
