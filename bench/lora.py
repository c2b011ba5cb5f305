"""Throughput with LoRA adapters in the mix, against no adapter: both backends in process, llama-server beside them.

One reader (backend) holds ``--adapters`` (8) PEFT adapters over the model, rank ``--rank`` (16) on q_proj,
k_proj, v_proj and o_proj, made here with random weights (the cost of applying an adapter does not depend on what
it learnt). For each concurrency ``c`` (8 and 32) and each number ``k`` of distinct adapters in the mix (0, 1, 4,
8) it admits ``c`` different chat prompts of about ``--prompt-tokens`` tokens at once, request ``i`` with adapter
``i % k`` (none when ``k`` is 0), exactly ``--new-tokens`` output tokens each (greedy), steps until all have
finished and reports output tokens per second over the whole run (prefill included; no prefix cache, so every
run prefills its prompts in full), and its ratio to the
no-adapter figure of the same run. The settings alternate, ``--repeats`` times each, and the best run of each
counts (the machine may be shared: the best is the least disturbed).

``--engines`` (default all three): ``transformers`` (the dequantized model, ``--dtype``, ``--quantize``),
``llamacpp`` (the GGUF itself; the PEFT adapters are converted to GGUF once by llama.cpp's converter, cached in
``--repository-path``) and ``llama-server`` (the peer: the same GGUF and the same converted adapters, asked over
HTTP; bench/lora_peer.py). Both Liftoff engines run without prefix cache; llama-server without prompt cache.

Run it from the repository root::

    .venv/bin/python bench/lora.py                                  # SmolLM2 float32, c = 8 and 32
    .venv/bin/python bench/lora.py --quantize int8 --repeats 3
    .venv/bin/python bench/lora.py --engines llamacpp llama-server  # the GGUF engines only

The default model is the bundled SmolLM2-135M-Instruct GGUF, dequantized once into ``--repository-path``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from genbench_peers import DEFAULT_PEERS_DIR, ensure_llama_server
from liftoff.backends.base import BackendContext, GenerativeBackend
from liftoff.backends.llamacpp.backend import LlamaCppBackend
from liftoff.backends.llamacpp.lora import CACHE_DIR
from liftoff.backends.resolve import resolve_model
from liftoff.backends.transformers.backend import TransformersBackend
from liftoff.config.models import ReaderConfig
from liftoff.core.types import GenerationParams
from lora_peer import llama_server_loras
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


Runner = Callable[[list[str], int, int], Result]
ENGINES = ("transformers", "llamacpp", "llama-server")


def run(backend: GenerativeBackend, prompts: list[str], new_tokens: int, distinct: int) -> Result:
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="bundled alias or GGUF")
    parser.add_argument("--repository-path", type=Path, default=Path.home() / ".cache" / "liftoff" / "bench-repo")
    parser.add_argument("--peers-dir", type=Path, default=DEFAULT_PEERS_DIR, help="where llama-server is built")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--dtype", default="float32", help="the transformers engine's dtype")
    parser.add_argument("--quantize", default="none", help="the transformers engine's quantize: none or int8")
    parser.add_argument("--threads", type=int, default=0, help="threads of every engine (0: every CPU)")
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--mixes", default="0,1,4,8", help="distinct adapters in the mix")
    parser.add_argument("--adapters", type=int, default=8, help="adapters the reader holds")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    return parser.parse_args(argv)


def load(
    engine: type[GenerativeBackend], args: argparse.Namespace, context: BackendContext, loras: str, slots: int
) -> GenerativeBackend:
    """A backend of ``engine`` holding the adapters ``loras``, without prefix cache (see below), loaded."""
    # No prefix cache: the runs repeat the same prompts, and a cached prompt would be reused by the next run only
    # under the same adapter, which would favour the no-adapter runs.
    options: dict[str, Any] = {"prefix_cache": False}
    if engine is TransformersBackend:
        options |= {"dtype": args.dtype, "quantize": args.quantize}
    if args.threads:
        options["n_threads"] = args.threads
    config = ReaderConfig(model_name=args.model, device="cpu", max_batch_size=slots, backend_options=options,
                          loras=loras, max_loras=max(max(int(m) for m in args.mixes.split(",")), 1))  # fmt: skip
    backend = engine(config, context)
    started = time.perf_counter()
    backend.load(lambda fraction: None)
    print(f"{engine.name}: loaded with {args.adapters} adapters in {time.perf_counter() - started:.1f} s")
    return backend


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = [int(s) for s in args.concurrency.split(",")]
    mixes = [int(m) for m in args.mixes.split(",")]
    model = resolve_model(args.model, args.repository_path)
    context = BackendContext(repository_path=args.repository_path, model=model)
    runners: dict[str, Runner] = {}
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        names = {"dtype": args.dtype}  # the model's layer names and sizes, for the adapters
        plain = TransformersBackend(ReaderConfig(model_name=args.model, device="cpu", backend_options=names), context)
        plain.load(lambda fraction: None)
        paths = make_adapters(plain._model().model, Path(scratch), args.adapters, args.rank)
        plain.close()
        loras = ",".join(str(path) for path in paths)
        engines: dict[str, GenerativeBackend] = {}
        for name, engine in (("transformers", TransformersBackend), ("llamacpp", LlamaCppBackend)):
            if name in args.engines or (name == "llamacpp" and "llama-server" in args.engines):
                engines[name] = load(engine, args, context, loras, max(sizes))
                stack.callback(engines[name].close)
                if name in args.engines:
                    runners[name] = lambda p, n, k, b=engines[name]: run(b, p, n, k)
        prompts = make_prompts(next(iter(engines.values())), max(sizes), args.prompt_tokens)  # type: ignore[arg-type]
        if "llama-server" in args.engines:
            cpp = engines["llamacpp"]
            converted = [next((args.repository_path / CACHE_DIR).glob(f"{path.name}-*.gguf")) for path in paths]
            binary = ensure_llama_server(args.peers_dir)
            server = stack.enter_context(llama_server_loras(binary, model.path, converted, Path(scratch),
                                                            args.threads or 2, max(sizes)))  # fmt: skip
            templated = [cpp.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                         for p in prompts]  # fmt: skip
            runners["llama-server"] = lambda p, n, k: server.run(templated[: len(p)], n, k)
            print(f"llama-server: {server.flags}, the {args.adapters} adapters as converted for llamacpp")
        measure(runners, prompts, sizes, mixes, args)


def measure(runners: dict[str, Runner], prompts: list[str], sizes: list[int], mixes: list[int],
            args: argparse.Namespace) -> None:  # fmt: skip
    """Every engine, concurrency and mix, alternating, ``--repeats`` times; the best of each, as a table."""
    print(f"prompts: about {args.prompt_tokens} tokens, {args.new_tokens} new, best of {args.repeats}; "
          f"{args.adapters} adapters of rank {args.rank} on {', '.join(TARGETS)}")  # fmt: skip
    for runner in runners.values():
        runner(prompts[:2], 4, 2)  # warm up
    best: dict[tuple[str, int, int], float] = {}
    for _ in range(args.repeats):
        for size in sizes:
            for mix in mixes:
                for name, runner in runners.items():
                    rate = runner(prompts[:size], args.new_tokens, mix).rate
                    best[name, size, mix] = max(best.get((name, size, mix), 0.0), rate)
    header = "".join(f" {name + ' tok/s':>19} {'ratio':>5}" for name in runners)
    print(f"{'c':>3} {'adapters':>8}{header}")
    for size in sizes:
        for mix in mixes:
            cells = ""
            for name in runners:
                rate, base = best[name, size, mix], best.get((name, size, 0), float("nan"))
                cells += f" {rate:>19.1f} {rate / base:>5.2f}"
            print(f"{size:>3} {mix:>8}{cells}", flush=True)


if __name__ == "__main__":
    main()
