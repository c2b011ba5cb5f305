"""Throughput of the transformers backend's own loop (admit/step, in process, no server) against HF ``generate``.

For each batch size it admits that many different chat prompts of about ``--prompt-tokens`` tokens at once, with
exactly ``--new-tokens`` output tokens each (``min_new_tokens = max_new_tokens``, greedy), steps until every
sequence has finished, and reports output tokens per second over the whole run (prefill included). The peer is
``model.generate`` of the same model object on the same prompt ids (left-padded, static batch, greedy,
``min_new_tokens = max_new_tokens``). The two alternate, ``--repeats`` times each, and the best run of each
counts (the machine may be shared: the best is the least disturbed).

Run it from the repository root::

    .venv/bin/python bench/transformers_engine.py                          # SmolLM2 bf16, batch 1, 8, 32
    .venv/bin/python bench/transformers_engine.py --batch-sizes 32 --repeats 3 --dtype float32
    .venv/bin/python bench/transformers_engine.py --model /path/to/checkpoint --skip-hf

The default model is the bundled SmolLM2-135M-Instruct GGUF, dequantized once into ``--repository-path``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from liftoff.backends.base import BackendContext
from liftoff.backends.resolve import resolve_model
from liftoff.backends.transformers.backend import TransformersBackend
from liftoff.config.models import ReaderConfig
from liftoff.core.types import GenerationParams

TOPICS = [
    "the history of the printing press",
    "how bees communicate",
    "the water cycle",
    "why the sky is blue",
    "the rules of chess",
    "how volcanoes form",
    "the life of a lighthouse keeper",
    "baking sourdough bread",
    "the first moon landing",
    "how a bicycle stays upright",
    "the migration of whales",
    "a day in a medieval market",
]
FILLER = (
    "Please be precise and concrete, give examples a curious student would enjoy, avoid jargon where you can, "
    "and explain every step of your reasoning so that the answer could be checked by someone else later on. "
)


@dataclass
class Result:
    seconds: float
    cpu_seconds: float
    tokens: int

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    @property
    def cpu_rate(self) -> float:
        return self.tokens / self.cpu_seconds


def make_prompts(backend: TransformersBackend, count: int, target: int) -> list[str]:
    """``count`` different user messages whose chat-templated prompts are about ``target`` tokens long."""
    prompts = []
    for index in range(count):
        text = f"Question {index}: write a short essay about {TOPICS[index % len(TOPICS)]}. "
        while len(backend.tokenize(text + FILLER, use_chat_template=True)) <= target:
            text += FILLER
        words = (text + FILLER).split(" ")
        while len(backend.tokenize(text, use_chat_template=True)) < target and words:
            text += words.pop(0) + " "
        prompts.append(text)
    return prompts


def run_backend(backend: TransformersBackend, prompts: list[str], new_tokens: int) -> Result:
    params = GenerationParams(min_new_tokens=new_tokens, max_new_tokens=new_tokens, use_chat_template=True)
    produced = 0
    start, cpu = time.perf_counter(), time.process_time()
    for index, prompt in enumerate(prompts):
        backend.admit(f"r{index}", prompt, params)
    while backend.active():
        for out in backend.step():
            if out.finish_reason is not None:
                produced += out.completion_tokens
    return Result(time.perf_counter() - start, time.process_time() - cpu, produced)


def run_generate(backend: TransformersBackend, prompts: list[str], new_tokens: int) -> Result:
    loaded = backend._model()
    tokenizer, model = loaded.tokenizer, loaded.model
    rendered = [
        backend.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts
    ]
    tokenizer.padding_side = "left"
    start, cpu = time.perf_counter(), time.process_time()
    batch = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(loaded.device)
    with torch.inference_mode():
        output = model.generate(
            **batch,
            do_sample=False,
            min_new_tokens=new_tokens,
            max_new_tokens=new_tokens,
            pad_token_id=loaded.pad_id,
        )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return Result(seconds, cpu_seconds, (output.shape[1] - batch["input_ids"].shape[1]) * len(prompts))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="bundled alias, checkpoint dir or GGUF")
    parser.add_argument("--repository-path", type=Path, default=Path.home() / ".cache" / "liftoff" / "bench-repo")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", default="auto", help="backend_options quantize: auto, int8 or none")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every CPU)")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-hf", action="store_true", help="do not run HF generate")
    args = parser.parse_args(argv)

    sizes = [int(s) for s in args.batch_sizes.split(",")]
    options: dict[str, Any] = {"dtype": args.dtype, "quantize": args.quantize}
    if args.threads:
        options["n_threads"] = args.threads
    config = ReaderConfig(model_name=args.model, device="cpu", max_batch_size=max(sizes), backend_options=options)
    model = resolve_model(args.model, args.repository_path)
    backend = TransformersBackend(config, BackendContext(repository_path=args.repository_path, model=model))
    started = time.perf_counter()
    backend.load(lambda fraction: None)
    seconds = time.perf_counter() - started
    print(f"loaded {model.path.name} ({args.dtype}, {torch.get_num_threads()} threads) in {seconds:.1f} s")
    prompts = make_prompts(backend, max(sizes), args.prompt_tokens)
    lengths = [len(backend.tokenize(p, use_chat_template=True)) for p in prompts]
    average = statistics.mean(lengths)
    print(f"prompts: {average:.0f} tokens on average ({min(lengths)}-{max(lengths)}), {args.new_tokens} new")
    run_backend(backend, prompts[:2], 4)  # warm up both paths
    if not args.skip_hf:
        run_generate(backend, prompts[:2], 4)

    print(f"{'batch':>5} {'liftoff tok/s':>14} {'generate tok/s':>15} {'ratio':>6}   per CPU-second: liftoff, generate")
    for size in sizes:
        ours: list[Result] = []
        peer: list[Result] = []
        for _ in range(args.repeats):
            ours.append(run_backend(backend, prompts[:size], args.new_tokens))
            if not args.skip_hf:
                peer.append(run_generate(backend, prompts[:size], args.new_tokens))
        best = max(r.rate for r in ours)
        peer_best = max((r.rate for r in peer), default=float("nan"))
        cpu = max(r.cpu_rate for r in ours)
        peer_cpu = max((r.cpu_rate for r in peer), default=float("nan"))
        print(
            f"{size:>5} {best:>14.1f} {peer_best:>15.1f} {best / peer_best:>6.2f}   {cpu:>8.1f} {peer_cpu:>8.1f}",
            flush=True,
        )
    backend.close()


if __name__ == "__main__":
    main()
