"""llama.cpp backend loop benchmark: the backend's own admit/step loop against a bare low-level llama.cpp loop.

What it measures, in-process (no server, no engine thread), with the bundled SmolLM2-135M-Instruct GGUF:

* ``engine``: ``LlamaCppBackend`` driven the way the reader's engine drives it: admit every prompt, then call
  ``step()`` until every sequence has finished; ``min_new_tokens = max_new_tokens`` so each makes exactly that
  many tokens.
* ``raw``: the reference loop of docs/offline-models §2a written directly on the bindings: one context with
  ``n_seq_max = N``, every prompt prefilled by one ``llama_decode``, then one ``llama_decode`` per step with one
  token per sequence and a greedy argmax over ``llama_get_logits`` (end-of-generation tokens masked), the same
  thread count and context size as the engine.

Both use the same prompts (``--prompt-tokens`` tokens each, a different text per sequence). It prints output
tokens per second over the whole run (prefill included), the time to the first token, and the decode rate
(output tokens after the first / time after the first), for each batch size, and the ratio engine / raw.

Run it from the repository root::

    .venv/bin/python bench/llamacpp_engine.py                          # batches 1, 8, 32; 2 threads
    .venv/bin/python bench/llamacpp_engine.py --batch 8 --repeat 3 --mode engine

The machine must be otherwise idle for the figures to mean anything (this one has 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as llama
import numpy as np

from liftoff.backends.base import BackendContext
from liftoff.backends.llamacpp.backend import LlamaCppBackend
from liftoff.backends.llamacpp.native import NativeBatch, NativeModel
from liftoff.backends.resolve import ResolvedModel, resolve_model
from liftoff.config.models import ReaderConfig
from liftoff.core.types import GenerationParams

TEXT = (
    "The harbour town woke slowly: fishing boats knocked against the pier, gulls argued over the nets, and the "
    "baker on the corner pulled the first loaves from an oven older than anyone could remember. Up the hill, the "
    "lighthouse keeper wrote the night's log in a careful hand, noting the wind, the fog that came and went, and "
    "a ship that had passed without answering the lamp. Children ran down to the water before school, daring "
    "each other to touch the cold waves, while their parents opened shutters and argued about the weather. "
)


@dataclass
class Result:
    """One run: wall time, time to the first token, output tokens."""

    wall_s: float
    first_s: float
    tokens: int

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s

    def decode_tok_s(self, batch: int) -> float:
        return (self.tokens - batch) / max(self.wall_s - self.first_s, 1e-9)


def make_prompts(model: NativeModel, batch: int, length: int) -> list[str]:
    """``batch`` different prompts of about ``length`` tokens (windows into a long text)."""
    ids = model.tokenize(TEXT * 4, add_special=False, parse_special=False)
    windows = [ids[(7 * i) % (len(ids) - length) :][:length] for i in range(batch)]
    return [model.detokenize(window, render_special=False) for window in windows]


def run_engine(backend: LlamaCppBackend, texts: list[str], new_tokens: int) -> Result:
    params = GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    start = time.perf_counter()
    first = 0.0
    for index, text in enumerate(texts):
        backend.admit(f"r{index}", text, params)
    tokens = 0
    while backend.active():
        outputs = backend.step()
        tokens += sum(out.n_tokens for out in outputs)
        if not first and tokens:
            first = time.perf_counter() - start
    return Result(time.perf_counter() - start, first, tokens)


def run_raw(model: NativeModel, ctx: int, batch: NativeBatch, prompts: list[list[int]], new_tokens: int) -> Result:
    n = len(prompts)
    memory = llama.llama_get_memory(ctx)
    for seq in range(n):
        llama.llama_memory_seq_rm(memory, seq, -1, -1)
    eog = np.array(model.eog, dtype=np.int64)
    start = time.perf_counter()
    row = 0
    for seq, prompt in enumerate(prompts):
        row = batch.put_span(row, prompt, 0, seq, last_logits=True)
    batch.struct.n_tokens = row
    assert llama.llama_decode(ctx, batch.struct) == 0
    first = time.perf_counter() - start
    positions = [len(p) for p in prompts]
    tokens = 0
    for step in range(new_tokens):
        logits = np.ctypeslib.as_array(llama.llama_get_logits(ctx), shape=(n, model.n_vocab)).copy()
        logits[:, eog] = -np.inf
        picks = np.argmax(logits, axis=1)
        tokens += n
        if step == new_tokens - 1:
            break
        batch.token[:n] = picks
        batch.pos[:n] = positions
        batch.seq_ptr[:n] = batch.seq_address[:n]
        batch.logits[:n] = 1
        batch.struct.n_tokens = n
        assert llama.llama_decode(ctx, batch.struct) == 0
        positions = [p + 1 for p in positions]
    return Result(time.perf_counter() - start, first, tokens)


def raw_context(model: NativeModel, n_seq: int, per_seq: int, threads: int, n_batch: int) -> int:
    params = llama.llama_context_default_params()
    params.n_ctx = per_seq * n_seq
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = n_seq
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = False
    params.no_perf = True
    ctx: int = llama.llama_init_from_model(model.pointer, params)
    return ctx


def bench_batch(args: argparse.Namespace, resolved: ResolvedModel, model: NativeModel, n: int) -> None:
    """Both loops on the same prompts, their repeats interleaved (so a busy moment hits both alike)."""
    texts = make_prompts(model, n, args.prompt_tokens)
    prompts = [model.tokenize(text, add_special=True, parse_special=False) for text in texts]
    per_seq = args.max_sequence_length
    runners: dict[str, Callable[[], Result]] = {}
    closers: list[Callable[[], None]] = []
    if args.mode in ("engine", "both"):
        options: dict[str, object] = {"n_threads": args.threads}
        if args.chunk:
            options["prefill_chunk_size"] = args.chunk
        if args.prefill_per_step:
            options["prefill_tokens_per_step"] = args.prefill_per_step
        config = ReaderConfig(
            model_name=resolved.name,
            device="cpu",
            max_batch_size=n,
            max_sequence_length=per_seq,
            backend_options=options,
        )
        backend = LlamaCppBackend(config, BackendContext(model=resolved))
        backend.load(lambda _: None)
        run_engine(backend, texts[:1], 4)  # warm-up
        runners["engine"] = lambda: run_engine(backend, texts, args.new_tokens)
        closers.append(backend.close)
    if args.mode in ("raw", "both"):
        n_batch = max(512, sum(len(p) for p in prompts))
        ctx = raw_context(model, n, per_seq, args.threads, n_batch)
        batch = NativeBatch(n_batch, n)
        run_raw(model, ctx, batch, prompts[:1], 4)
        runners["raw"] = lambda: run_raw(model, ctx, batch, prompts, args.new_tokens)
        closers.append(lambda: llama.llama_free(ctx))
    results: dict[str, list[Result]] = {mode: [] for mode in runners}
    for _ in range(args.repeat):
        for mode, runner in runners.items():
            results[mode].append(runner())
    for close in closers:
        close()
    for mode, runs in results.items():
        best = max(runs, key=lambda r: r.tok_s)
        print(
            f"batch {n:3d} {mode:6s}: {best.tok_s:7.1f} tok/s (median {statistics.median(r.tok_s for r in runs):7.1f})"
            f"  first token {best.first_s * 1000:7.1f} ms  decode {best.decode_tok_s(n):7.1f} tok/s",
            flush=True,
        )
    if len(results) == 2:
        engine = max(r.tok_s for r in results["engine"])
        raw = max(r.tok_s for r in results["raw"])
        print(f"batch {n:3d} engine/raw (best of {args.repeat}): {engine / raw:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--mode", choices=["engine", "raw", "both"], default="both")
    parser.add_argument("--chunk", type=int, default=0, help="prefill_chunk_size (default: the backend's)")
    parser.add_argument("--prefill-per-step", type=int, default=0, help="prefill_tokens_per_step")
    args = parser.parse_args()
    resolved = resolve_model("smollm2-135m-instruct", Path.home() / "artefacts")
    model = NativeModel(resolved.path, lambda _: None)
    print(f"model {resolved.path.name}, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens each, ")
    print(f"n_threads={args.threads}, max_sequence_length={args.max_sequence_length}")
    for n in args.batch:
        bench_batch(args, resolved, model, n)
    model.close()


if __name__ == "__main__":
    main()
