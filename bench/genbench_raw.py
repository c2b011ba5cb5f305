"""The engine limits for ``bench/generation.py``: batched greedy decode loops in-process, no server.

``python bench/genbench_raw.py ENGINE --model PATH --prompts FILE --batch 1 8 32`` prints one JSON object with,
for each batch size, aggregate output tokens/s (all output tokens over the time of prefill plus decode), the time
to each sequence's first token and the gaps between its tokens. Engines:

- ``llamacpp``: the raw llama.cpp loop (offline-models.md §2a): one context with ``n_seq_max = batch``, every
  prompt prefilled by one ``llama_decode``, then one ``llama_decode`` per step for every sequence, greedy on the
  logits with end-of-generation masked. ``bench/llamacpp_engine.py``'s ``run_raw`` (and its context and batch
  helpers) when it imports, else the loop in this file.
- ``torch``: a raw torch loop on the dequantized bf16 checkpoint: left-padded prefill, then one forward per step
  with the KV cache, greedy with EOS masked.
- ``liftoff-llamacpp`` / ``liftoff-transformers``: Liftoff's backend itself (``create_backend`` as the reader
  does it, ``max_batch_size = batch``), driven as the reader's engine drives it: admit every prompt, then
  ``step()`` until all have finished (what ``bench/llamacpp_engine.py`` and ``bench/transformers_engine.py`` call
  the engine loop). Prompts are user messages with ``use_chat_template``.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "src"))

# A run: (model, prompts, new tokens) -> {"seconds", "tokens", "first_s": [per sequence], "gaps_s": [...]}
RunBatch = Callable[[Path, list[str], int], dict[str, Any]]


def _drop_log(level: int, text: bytes, user_data: int | None) -> None:
    """llama.cpp's log callback: drop its messages."""


_QUIET = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(_drop_log)


def _steps_result(started: float, steps: list[float], batch: int) -> dict[str, Any]:
    """A lockstep loop's timings: every sequence gets its first token at the end of the prefill."""
    return {"seconds": steps[-1] - started, "tokens": batch * len(steps), "first_s": [steps[0] - started] * batch,
            "gaps_s": [b - a for a, b in itertools.pairwise(steps)]}  # fmt: skip


# ---- raw llama.cpp -----------------------------------------------------------------------------------------------


def llamacpp_own(model_path: Path, prompts: list[str], new_tokens: int) -> dict[str, Any]:
    """The raw loop written here on the low-level bindings."""
    import llama_cpp as lc
    import numpy as np

    lc.llama_backend_init()
    lc.llama_log_set(_QUIET, None)
    model = lc.llama_model_load_from_file(str(model_path).encode(), lc.llama_model_default_params())
    vocab = lc.llama_model_get_vocab(model)
    n_vocab, eos = lc.llama_vocab_n_tokens(vocab), lc.llama_vocab_eos(vocab)
    tokens = [_lc_tokenize(vocab, prompt) for prompt in prompts]
    n, total = len(prompts), sum(len(t) for t in tokens)
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = max(max(len(t) for t in tokens) + new_tokens + 8, 256) * n
    cparams.n_batch, cparams.n_seq_max, cparams.kv_unified = max(total, 512), n, False
    cparams.n_threads = cparams.n_threads_batch = 2
    ctx = lc.llama_init_from_model(model, cparams)
    batch = lc.llama_batch_init(max(total, n), 0, 1)
    try:
        started = time.perf_counter()
        rows = [(tok, pos, seq, pos == len(t) - 1) for seq, t in enumerate(tokens) for pos, tok in enumerate(t)]
        positions, steps = [len(t) for t in tokens], []
        for step in range(new_tokens):
            for i, row in enumerate(rows):
                _lc_add(batch, i, *row)
            batch.n_tokens = len(rows)
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            logits = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(n, n_vocab))
            logits[:, eos] = -np.inf
            chosen = logits.argmax(axis=1)
            steps.append(time.perf_counter())
            rows = [(int(chosen[seq]), positions[seq] + step, seq, True) for seq in range(n)]
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    return _steps_result(started, steps, n)


def _lc_tokenize(vocab: Any, text: str) -> list[int]:
    import llama_cpp as lc

    raw = text.encode()
    buffer = (lc.llama_token * (len(raw) + 8))()
    count = lc.llama_tokenize(vocab, raw, len(raw), buffer, len(buffer), False, True)
    if count < 0:
        raise RuntimeError("llama_tokenize failed")
    return list(buffer[:count])


def _lc_add(batch: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq
    batch.logits[i] = 1 if logits else 0


def llamacpp_theirs(module: Any) -> RunBatch:
    """``bench/llamacpp_engine.py``'s raw loop on our prompts (it reports the first token and the total time)."""
    from liftoff.backends.llamacpp.native import NativeBatch, NativeModel

    def run(model_path: Path, prompts: list[str], new_tokens: int) -> dict[str, Any]:
        model = NativeModel(model_path, lambda _: None)
        ids = [model.tokenize(p, add_special=False, parse_special=True) for p in prompts]
        n_batch = max(512, sum(len(i) for i in ids))
        per_seq = max(max(len(i) for i in ids) + new_tokens + 8, 256)
        ctx = module.raw_context(model, len(ids), per_seq, 2, n_batch)
        try:
            result = module.run_raw(model, ctx, NativeBatch(n_batch, len(ids)), ids, new_tokens)
        finally:
            import llama_cpp

            llama_cpp.llama_free(ctx)
            model.close()
        step = (result.wall_s - result.first_s) / max(new_tokens - 1, 1)
        return {"seconds": result.wall_s, "tokens": result.tokens, "first_s": [result.first_s] * len(ids),
                "gaps_s": [step] * (new_tokens - 1)}  # fmt: skip

    return run


# ---- raw torch ---------------------------------------------------------------------------------------------------


def torch_loop(model_path: Path, prompts: list[str], new_tokens: int) -> dict[str, Any]:
    """Greedy decode of ``prompts`` together with transformers + torch (bf16, KV cache)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    model.train(False)
    eos = model.generation_config.eos_token_id
    eos_ids = eos if isinstance(eos, list) else [eos]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = enc["attention_mask"]
    with torch.inference_mode():
        started = time.perf_counter()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True)
        steps: list[float] = []
        for step in range(new_tokens):
            logits = out.logits[:, -1, :].float()
            logits[:, eos_ids] = -float("inf")
            chosen = logits.argmax(dim=-1, keepdim=True)
            steps.append(time.perf_counter())
            if step == new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(chosen)], dim=-1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=chosen, attention_mask=mask, position_ids=positions,
                        past_key_values=out.past_key_values, use_cache=True)  # fmt: skip
    return _steps_result(started, steps, len(prompts))


# ---- Liftoff's own backend loop ----------------------------------------------------------------------------------


def backend_loop(backend_name: str, repository: Path, options: dict[str, str] | None = None) -> RunBatch:
    """Liftoff's backend, created and driven as the reader does (a new backend per batch size is not needed:
    the backend is cached per capacity)."""
    cache: dict[int, Any] = {}

    def run(model_path: Path, prompts: list[str], new_tokens: int) -> dict[str, Any]:
        from liftoff.core.types import GenerationParams

        backend = cache.get(len(prompts)) or _load_backend(backend_name, repository, len(prompts), cache, options)
        params = GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_chat_template=True)
        started = time.perf_counter()
        for index, prompt in enumerate(prompts):
            backend.admit(f"r{index}", prompt, params)
        last: dict[str, float] = {}
        first, gaps, tokens = [], [], 0
        while backend.active():
            for out in backend.step():
                now = time.perf_counter()
                if out.error is not None:
                    raise RuntimeError(f"{backend_name}: {out.error}")
                if out.n_tokens:
                    previous = last.get(out.request_id)
                    if previous is None:
                        first.append(now - started)
                    else:
                        gaps.append(now - previous)
                    last[out.request_id] = now
                if out.finish_reason is not None:
                    tokens += out.completion_tokens
        return {"seconds": time.perf_counter() - started, "tokens": tokens, "first_s": first, "gaps_s": gaps}

    return run


def _load_backend(
    backend_name: str, repository: Path, capacity: int, cache: dict[int, Any], options: dict[str, str] | None = None
) -> Any:
    from liftoff.backends.base import BackendContext
    from liftoff.backends.registry import create_backend
    from liftoff.config.models import ReaderConfig

    for old in cache.values():
        old.close()
    cache.clear()
    config = ReaderConfig(model_name="smollm2-135m-instruct", device="cpu", max_batch_size=capacity,
                          backend=backend_name, backend_options=dict(options or {}))  # fmt: skip
    backend = create_backend(config, BackendContext(repository_path=repository))
    backend.load(lambda _: None)
    cache[capacity] = backend
    return backend


# ---- measuring ---------------------------------------------------------------------------------------------------


def key_values(entries: list[str], flag: str) -> dict[str, str]:
    """``KEY=VALUE`` command-line entries as a mapping; anything else stops the run, naming ``flag``."""
    options = {}
    for entry in entries:
        key, sep, value = str(entry).partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} takes KEY=VALUE, not {entry!r}")
        options[key] = value
    return options


def pick(engine: str, repository: Path, options: dict[str, str] | None = None) -> tuple[RunBatch, str]:
    """The loop for ``engine`` and where it comes from."""
    if engine == "torch":
        return torch_loop, "genbench_raw.torch_loop (bf16, KV cache, greedy)"
    if engine.startswith("liftoff-"):
        name = engine.removeprefix("liftoff-")
        shown = "".join(f", {key}: {value}" for key, value in (options or {}).items())
        return backend_loop(name, repository, options), f"liftoff.backends {name} admit/step loop, in-process{shown}"
    try:
        module = importlib.import_module("llamacpp_engine")
        return llamacpp_theirs(module), "bench/llamacpp_engine.py run_raw (ITL: mean decode step)"
    except Exception as exc:  # missing or broken: the loop in this file
        return llamacpp_own, f"genbench_raw.llamacpp_own (llamacpp_engine unusable: {exc!r})"


def _pct(values: list[float], pct: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))] * 1000 if ordered else None


def measure(run: RunBatch, model: Path, prompts: list[str], batch: int, new_tokens: int, rounds: int) -> dict[str, Any]:
    """One warm-up round, then ``rounds`` measured rounds with other prompts; the mean throughput."""
    results = []
    for index in range(rounds + 1):
        chosen = [prompts[(index * batch + i) % len(prompts)] for i in range(batch)]
        result = run(model, chosen, new_tokens)
        if index:
            results.append(result)
    rates = [r["tokens"] / r["seconds"] for r in results]
    first = [s for r in results for s in r["first_s"]]
    gaps = [s for r in results for s in r["gaps_s"]]
    return {"batch": batch, "rounds": rounds, "tokens_per_s": sum(rates) / len(rates), "tokens_per_s_rounds": rates,
            "ttft_p50_ms": _pct(first, 50), "ttft_p99_ms": _pct(first, 99), "itl_p50_ms": _pct(gaps, 50),
            "itl_p99_ms": _pct(gaps, 99), "sequences": batch * rounds,
            "exact": sum(r["tokens"] == batch * new_tokens for r in results) * batch}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", choices=["llamacpp", "torch", "liftoff-llamacpp", "liftoff-transformers"])
    parser.add_argument("--model", type=Path, required=True, help="GGUF file (llamacpp) or checkpoint dir (torch).")
    parser.add_argument("--prompts", type=Path, required=True, help='JSON {"rendered": [...], "user": [...]}.')
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="backend_options entry.")
    parser.add_argument("--repository", type=Path, default=Path("~/.cache/liftoff/bench-repository").expanduser())
    args = parser.parse_args(argv)
    prompts = json.loads(args.prompts.read_text())
    texts = prompts["user"] if args.engine.startswith("liftoff-") else prompts["rendered"]
    options = key_values(args.option, "--option")
    run, source = pick(args.engine, args.repository, options)
    results = {}
    for batch in args.batch:
        results[str(batch)] = measure(run, args.model, texts, batch, args.new_tokens, args.rounds)
        print(f"[raw] {args.engine} batch {batch}: {results[str(batch)]['tokens_per_s']:.1f} tok/s",
              file=sys.stderr, flush=True)  # fmt: skip
    print(json.dumps({"engine": args.engine, "source": source, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
