"""Throughput of the transformers backend with LoRA adapters in the mix (in process, no server), against no adapter.

One reader (backend) holds ``--adapters`` (8) PEFT adapters over the model, rank ``--rank`` (16) on q_proj,
k_proj, v_proj and o_proj, made here with random weights (the cost of applying an adapter does not depend on what
it learnt). For each concurrency ``c`` (8 and 32) and each number ``k`` of distinct adapters in the mix (0, 1, 4,
8) it admits ``c`` different chat prompts of about ``--prompt-tokens`` tokens at once, request ``i`` with adapter
``i % k`` (none when ``k`` is 0), exactly ``--new-tokens`` output tokens each (greedy), steps until all have
finished and reports output tokens per second over the whole run (prefill included; no prefix cache, so every
run prefills its prompts in full), and its ratio to the
no-adapter figure of the same run. The settings alternate, ``--repeats`` times each, and the best run of each
counts (the machine may be shared: the best is the least disturbed).

Run it from the repository root::

    .venv/bin/python bench/lora.py                                  # SmolLM2 float32, c = 8 and 32
    .venv/bin/python bench/lora.py --quantize int8 --repeats 3

The default model is the bundled SmolLM2-135M-Instruct GGUF, dequantized once into ``--repository-path``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from liftoff.backends.base import BackendContext
from liftoff.backends.hf_transformers import TransformersBackend
from liftoff.backends.resolve import resolve_model
from liftoff.config.models import ReaderConfig
from liftoff.core.types import GenerationParams
from transformers_engine import Result, make_prompts  # bench/transformers_engine.py (the script's directory)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_adapters(model: torch.nn.Module, root: Path, count: int, rank: int) -> list[Path]:
    """``count`` random PEFT LoRA adapters for ``model`` (rank ``rank`` on :data:`TARGETS`) under ``root``."""
    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(count):
        tensors = {}
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                size_in, size_out = int(module.in_features), int(module.out_features)
                key = f"base_model.model.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, size_in, generator=generator) / size_in**0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(size_out, rank, generator=generator) * 0.01
        path = root / f"adapter{index}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}
        (path / "adapter_config.json").write_text(json.dumps(config))
        paths.append(path)
    return paths


def run(backend: TransformersBackend, prompts: list[str], new_tokens: int, distinct: int) -> Result:
    """All ``prompts`` at once, request ``i`` with adapter ``i % distinct`` (none when ``distinct`` is 0)."""
    produced = 0
    start, cpu = time.perf_counter(), time.process_time()
    for index, prompt in enumerate(prompts):
        lora_id = f"adapter{index % distinct}" if distinct else None
        params = GenerationParams(min_new_tokens=new_tokens, max_new_tokens=new_tokens, use_chat_template=True,
                                  lora_id=lora_id)  # fmt: skip
        backend.admit(f"r{index}", prompt, params)
    while backend.active():
        for out in backend.step():
            if out.finish_reason is not None:
                produced += out.completion_tokens
    return Result(time.perf_counter() - start, time.process_time() - cpu, produced)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="bundled alias, checkpoint dir or GGUF")
    parser.add_argument("--repository-path", type=Path, default=Path.home() / ".cache" / "liftoff" / "bench-repo")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", default="none", help="backend_options quantize: none or int8")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every CPU)")
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--mixes", default="0,1,4,8", help="distinct adapters in the mix")
    parser.add_argument("--adapters", type=int, default=8, help="adapters the reader holds")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    sizes = [int(s) for s in args.concurrency.split(",")]
    mixes = [int(m) for m in args.mixes.split(",")]
    # No prefix cache: the runs repeat the same prompts, and a cached prompt would be reused by the next run only
    # under the same adapter, which would favour the no-adapter runs.
    options: dict[str, Any] = {"dtype": args.dtype, "quantize": args.quantize, "prefix_cache": False}
    if args.threads:
        options["n_threads"] = args.threads
    model = resolve_model(args.model, args.repository_path)
    context = BackendContext(repository_path=args.repository_path, model=model)
    with tempfile.TemporaryDirectory() as scratch:
        names = {"dtype": args.dtype}  # the model's layer names and sizes, for the adapters
        plain = TransformersBackend(ReaderConfig(model_name=args.model, device="cpu", backend_options=names), context)
        plain.load(lambda fraction: None)
        paths = make_adapters(plain._model().model, Path(scratch), args.adapters, args.rank)
        plain.close()
        loras = ",".join(str(path) for path in paths)
        config = ReaderConfig(model_name=args.model, device="cpu", max_batch_size=max(sizes), backend_options=options,
                              loras=loras, max_loras=max(max(mixes), 1))  # fmt: skip
        backend = TransformersBackend(config, context)
        started = time.perf_counter()
        backend.load(lambda fraction: None)
    print(f"loaded {model.path.name} ({args.dtype}, quantize {args.quantize}, {torch.get_num_threads()} threads) "
          f"with {args.adapters} adapters of rank {args.rank} on {', '.join(TARGETS)} "
          f"in {time.perf_counter() - started:.1f} s")  # fmt: skip
    prompts = make_prompts(backend, max(sizes), args.prompt_tokens)
    print(f"prompts: about {args.prompt_tokens} tokens, {args.new_tokens} new, best of {args.repeats}")
    run(backend, prompts[:2], 4, 2)  # warm up
    print(f"{'c':>3} {'adapters':>8} {'tok/s':>8} {'no-adapter tok/s':>17} {'ratio':>6}")
    for size in sizes:
        results: dict[int, list[Result]] = {mix: [] for mix in mixes}
        for _ in range(args.repeats):
            for mix in mixes:
                results[mix].append(run(backend, prompts[:size], args.new_tokens, mix))
        base = max(r.rate for r in results[0]) if 0 in results else float("nan")
        for mix in mixes:
            best = max(r.rate for r in results[mix])
            print(f"{size:>3} {mix:>8} {best:>8.1f} {base:>17.1f} {best / base:>6.2f}", flush=True)
    backend.close()


if __name__ == "__main__":
    main()
