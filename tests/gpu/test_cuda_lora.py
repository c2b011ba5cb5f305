"""LoRA adapters on CUDA (issue 18): the adapters' matrices live on the GPU with the model, a batch that mixes two
adapters and the base model gives what each request gives alone (float32), and the logits are PEFT's on the same
GPU. The adapters are made here by PEFT itself, with random (non-zero) weights, over the tiny Llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch

from tests.gpu.test_cuda_transformers import cuda_backend
from tests.models.test_transformers_backend import PROMPTS, generate, greedy

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

RECIPES = {"one": {"r": 4, "lora_alpha": 8}, "two": {"r": 8, "lora_alpha": 4, "use_rslora": True}}


@pytest.fixture(scope="module")
def adapters(cuda_tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two PEFT adapters of other ranks and scales on q_proj and v_proj, random A and B (seeded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("cuda-loras")
    paths = {}
    for seed, (name, recipe) in enumerate(RECIPES.items()):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(cuda_tiny_llama, dtype=torch.float32)
        config = LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, **recipe)  # type: ignore[arg-type]
        get_peft_model(model, config).save_pretrained(root / name)
        paths[name] = root / name
    return paths


def _loras(adapters: dict[str, Path]) -> str:
    return ",".join(f"{name}={path}" for name, path in adapters.items())


def test_mixed_batches_on_the_gpu_equal_each_request_alone(cuda_tiny_llama: Path, adapters: dict[str, Path]) -> None:
    import msgspec

    backend = cuda_backend(cuda_tiny_llama, "float32", loras=_loras(adapters))
    try:
        assert backend.lora is not None
        buffers = [buffer for module in backend._model().model.modules() for buffer in module.buffers(recurse=False)]
        assert buffers
        assert all(buffer.device.type == "cuda" for buffer in buffers)
        text = PROMPTS["a"]
        requests = {f"{lora}-{index}": lora for index, lora in enumerate(["one", "two", None, "one"])}

        def params(lora: str | None) -> Any:
            return msgspec.structs.replace(greedy(16), lora_id=lora)

        alone = {rid: generate(backend, {rid: (text, params(lora))})[rid].text for rid, lora in requests.items()}
        together = generate(backend, {rid: (text, params(lora)) for rid, lora in requests.items()})
    finally:
        backend.close()
    assert {rid: run.text for rid, run in together.items()} == alone
    assert alone["one-0"] == alone["one-3"]


def test_the_logits_on_the_gpu_are_pefts(cuda_tiny_llama: Path, adapters: dict[str, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from liftoff.backends.transformers.lora import attach_loras
    from liftoff.config.models import ReaderConfig

    ids = torch.tensor([[1, 15, 27, 300, 41, 9, 77]], device="cuda")
    model = AutoModelForCausalLM.from_pretrained(cuda_tiny_llama, dtype=torch.float32).to("cuda")
    config = ReaderConfig(model_name="tiny", device="cuda", loras=_loras(adapters))
    lora = attach_loras(model, config, cuda_tiny_llama.parent)
    assert lora is not None
    with torch.inference_mode():
        lora.select([1, 2, 0])
        mixed = model(input_ids=ids.repeat(3, 1)).logits
    reference = AutoModelForCausalLM.from_pretrained(cuda_tiny_llama, dtype=torch.float32).to("cuda")
    with torch.inference_mode():
        base = reference(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(reference, adapters["one"], adapter_name="one")
    peft_model.load_adapter(adapters["two"], adapter_name="two")
    expected = {}
    with torch.inference_mode():
        for name in RECIPES:
            peft_model.set_adapter(name)
            expected[name] = peft_model(input_ids=ids).logits
    assert (mixed[2] - base[0]).abs().max().item() < 1e-4  # + 0.0, in a batch of 3 (other GPU kernels than 1's)
    assert (mixed[0] - expected["one"][0]).abs().max().item() < 1e-3
    assert (mixed[1] - expected["two"][0]).abs().max().item() < 1e-3
    assert (expected["one"][0] - base[0]).abs().max().item() > 1e-2  # the adapters do change the logits
