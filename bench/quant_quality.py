"""How far each reduced-precision path moves SmolLM2-135M's next-token distributions from float32.

The reference is the bundled Q4_1 GGUF dequantized to float32 (what the transformers backend loads). For each
of a few chat prompts it generates 64 greedy tokens in float32, then scores that whole sequence (teacher forcing)
with each path and compares the next-token distributions at the 64 generated positions:

- ``int8``: the transformers backend's ``quantize: int8`` (:mod:`liftoff.backends.transformers.quant`), and the same
  without its float outlier channels (no calibration);
- ``bfloat16``: the same weights in bf16 (what ``transformers serve`` runs in the generation benchmark);
- ``llama.cpp``: the GGUF itself through llama-cpp-python (Q4_1 weights x Q8_1 activations: what the llamacpp
  backend and ``llama-server`` run).

It prints the top-1 agreement with float32 and the mean KL(float32 || path), both over all scored positions.
Run from the repository root (about a minute)::

    .venv/bin/python bench/quant_quality.py
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from liftoff.backends.resolve import resolve_model
from liftoff.backends.transformers.convert import ensure_dequantized
from liftoff.backends.transformers.load import load_causal_lm
from liftoff.backends.transformers.quant import calibration_ids, quantize_linears

PROMPTS = [
    "Explain why the sky is blue.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "List three uses of copper.",
    "How do airplanes fly?",
    "Tell me a short story about a robot.",
    "What is 17 times 23?",
    "Give advice for a job interview.",
]
Scorer = Callable[[torch.Tensor], torch.Tensor]  # token ids [1, n] -> log-probabilities [n, vocab]


def torch_scorer(model: torch.nn.Module) -> Scorer:
    def score(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=ids).logits[0].float().log_softmax(-1)

    return score


def llama_scorer(gguf: Path) -> Scorer:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, logits_all=True, n_threads=2, verbose=False)

    def score(ids: torch.Tensor) -> torch.Tensor:
        llm.reset()
        llm.eval(ids[0].tolist())
        return torch.tensor(np.array(llm.scores[: ids.shape[1]])).log_softmax(-1)

    return score


def compare(sequences: list[tuple[torch.Tensor, int, torch.Tensor]], scorer: Scorer) -> tuple[float, float]:
    """(top-1 agreement, mean KL) of ``scorer`` against the float32 log-probabilities."""
    agree = total = 0
    divergence = 0.0
    for ids, start, reference in sequences:
        scored = scorer(ids)[start - 1 : -1]
        divergence += float((reference.exp() * (reference - scored)).sum(-1).sum())
        agree += int((reference.argmax(-1) == scored.argmax(-1)).sum())
        total += reference.shape[0]
    return agree / total, divergence / total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository-path", type=Path, default=Path.home() / ".cache" / "liftoff" / "bench-repo")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    gguf = resolve_model("smollm2-135m-instruct", args.repository_path).path
    path = ensure_dequantized(gguf, args.repository_path, torch.float32)
    loaded = load_causal_lm(path, dtype=torch.float32, device=torch.device("cpu"))
    model, tokenizer = loaded.model, loaded.tokenizer
    sequences = []
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = torch.tensor([tokenizer(str(text), add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        sequences.append((out, ids.shape[1], torch_scorer(model)(out)[ids.shape[1] - 1 : -1]))
    paths: dict[str, Callable[[], Scorer]] = {
        "int8 (quantize: int8)": lambda: _int8(model, calibration_ids(loaded)),
        "int8, no float channels": lambda: _int8(model, None),
        "bfloat16": lambda: torch_scorer(copy.deepcopy(model).to(torch.bfloat16)),
        "llama.cpp Q4_1 x Q8_1": lambda: llama_scorer(gguf),
    }
    positions = sum(ref.shape[0] for _, _, ref in sequences)
    print(f"{len(PROMPTS)} prompts, {positions} scored positions; reference: float32 dequantized from {gguf.name}")
    print(f"{'path':<34} {'top-1 agreement':>16} {'mean KL':>9}")
    for name, make in paths.items():
        started = time.perf_counter()
        agreement, divergence = compare(sequences, make())
        print(f"{name:<34} {agreement:>16.3f} {divergence:>9.4f}   ({time.perf_counter() - started:.0f} s)")


def _int8(model: torch.nn.Module, ids: list[int] | None) -> Scorer:
    quantized = copy.deepcopy(model)
    quantize_linears(quantized, ids)
    return torch_scorer(quantized)


if __name__ == "__main__":
    main()
