"""Generation benchmark on CPU: Liftoff against llama.cpp's ``llama-server``, ``transformers serve`` and the raw
batched decode loops, with SmolLM2-135M-Instruct (issue: real models).

Load: closed-loop streaming clients at each ``--concurrency`` (default 1, 8 and 32). Each request takes the next
of ``--prompts`` distinct prompts (no prompt is sent twice to a server, so that a prompt cache cannot skip a
prefill) of about ``--prompt-tokens`` tokens after the chat template (ChatML with SmolLM2's default system
prompt), and asks for exactly ``--new-tokens`` output tokens (64). Each client sends its next request when the
previous one ends. A phase warms up (at least ``--warmup`` seconds and until every client has finished one
request). Then each client sends ``--requests-per-client`` more (default max(3, ceil(40 / c))), and the window
ends when the first client has finished them: full load throughout, and at c=32, where requests run in lockstep
waves (all prefill, then all decode), whole waves, which a fixed window would alias. ``--duration`` measures a
fixed window instead (no request starts after it; the running ones finish, or are aborted with ``--cut``).

Per server and concurrency it reports aggregate output tokens/s (tokens received in the window / its length),
TTFT p50/p99 (request written -> first token event) and inter-token latency p50/p99 (gaps between token events)
of the requests that ended in the window, the request count, errors, and how many streams delivered exactly
``--new-tokens`` tokens by the server's own count (Liftoff: ``completion_tokens`` of the final
``event: metadata``, since a piece may stand for several tokens; peers: ``usage``, else content chunks). It
also accounts the CPU of client, server and everything else in each window, and repeats a measurement that
someone else's job disturbed (``--max-other-cpu``, ``--retries``; ``--quiet-wait`` waits for an idle machine).

Servers, each started on free loopback ports in its own process group and stopped at the end, also on Ctrl-C,
SIGTERM or an error:

1. Liftoff (``python -m liftoff serve --config cfg.yaml``): one reader ``smollm2-135m-instruct``, ``device: cpu``,
   ``max_batch_size: 32``, ``backend`` from ``--liftoff-backend`` (llamacpp and transformers: a separate server
   each; ``echo`` tests the plumbing). Requests: ``POST /generate_stream`` with ``use_chat_template``,
   ``min_new_tokens = max_new_tokens = 64`` and ``return_metadata``.
2. ``llama-server`` built from the llama-cpp-python 0.3.36 sdist (``bench/genbench_peers.py``; cached under
   ``--peers-dir``), same GGUF, ``-t 2 -np 32 -c 8192 --no-kv-unified``; ``/v1/chat/completions`` streamed with
   ``max_tokens``, ``ignore_eos`` and ``stream_options.include_usage``.
3. ``transformers serve --continuous-batching --dtype bfloat16`` from its own venv under ``--peers-dir``, on a
   dequantized SmolLM2 checkpoint; fixed length through its ``generation_config`` field (``min_new_tokens``).
4. ``liftoff-api``: Liftoff with an API reader (``device: api``, ``max_concurrency`` = ``--batch-size``) in front
   of a llama-server started as in 2, asked exactly what 2 is asked, on Liftoff's OpenAI port: the API reader's
   overhead (targets: c=32 output tokens/s >= 0.95x llama-server's, TTFT p50 at c=1 at most 5 ms more).
5. In-process loops, no server, at batch sizes equal to the concurrencies (``bench/genbench_raw.py``): the raw
   llama.cpp loop (``bench/llamacpp_engine.py``'s ``run_raw`` when it imports), a raw torch bf16 loop, and
   Liftoff's own backends driven by admit/step as the reader's engine drives them.

Then one markdown table (rows: servers; columns: per concurrency) and the issue's targets, each PASS or MISS,
with the Liftoff backend that does best on each: at c=1 Liftoff >= 1.0x llama-server; at c=32 >= 2x llama-server,
>= 1.5x transformers serve and >= 0.8x the raw loop of the backend used; TTFT p50 at c=8 no worse than either
peer. The exit code is 0 even when targets miss (1 if nothing could be measured, 130 on Ctrl-C).

Run it from the repository root (it builds/installs the peers on first use: about 4 + 2 minutes)::

    .venv/bin/python bench/generation.py --quiet-wait 120                 # everything (about 20 minutes)
    .venv/bin/python bench/generation.py --servers liftoff --liftoff-backend echo --concurrency 1 8 \\
        --duration 5 --warmup 1                                          # plumbing only
    .venv/bin/python bench/generation.py --servers llama-server raw-llamacpp --json /tmp/gen.json
    .venv/bin/python bench/generation.py --servers llama-server liftoff-api    # the API reader's overhead
    .venv/bin/python bench/generation.py --servers llama-server liftoff-api --interleave 3   # same, alternating
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "src"))

import genbench_peers as peers
from common.log import log
from common.procs import Managed, terminate_on_sigterm
from common.report import run_meta
from genbench_interleave import run_interleaved
from genbench_load import chat_render, make_prompts, token_counter
from genbench_measure import measure_server, run_raw
from genbench_raw import key_values
from genbench_report import report
from genbench_servers import (
    MODEL_ALIAS,
    Running,
    start_liftoff,
    start_liftoff_api,
    start_llama_server,
    start_transformers_serve,
)

SERVERS = ["liftoff", "llama-server", "liftoff-api", "transformers-serve", "raw-llamacpp", "raw-torch",
           "engine-llamacpp", "engine-transformers"]  # fmt: skip
RAW_ENGINES = {"raw-llamacpp": "llamacpp", "raw-torch": "torch", "engine-llamacpp": "liftoff-llamacpp",
               "engine-transformers": "liftoff-transformers"}  # fmt: skip


def resolve_gguf() -> Path:
    from liftoff.backends.resolve import resolve_model

    return resolve_model(MODEL_ALIAS, Path(tempfile.gettempdir())).path


def stopped(server: Managed, outcome: dict[str, Any]) -> dict[str, Any]:
    """Note how a stopped server stopped and what it logged."""
    outcome |= {"exit_code": server.exit_code, "stop_s": server.stop_s, "leftover_pids": server.leftovers,
                "log_problems": server.log_problems()[:20], "log": str(server.log_path)}  # fmt: skip
    return outcome


def run_server(key: str, start: Callable[[contextlib.ExitStack], Running], prompts: list[str],
               args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """Start, measure, stop one server; a server that fails is reported, not fatal."""
    with contextlib.ExitStack() as stack:  # stops the server on the way out, whatever happens
        try:
            running = start(stack)
        except RuntimeError as exc:
            log(f"{key}: could not start: {exc}")
            return {"label": key, "error": str(exc)[:2000]}
        try:
            outcome = measure_server(running, prompts, args)
        except RuntimeError as exc:
            log(f"{key}: failed: {exc}")
            outcome = {"label": running.label, "error": str(exc)[:2000]}
    return stopped(running.server, outcome)


# ---- main --------------------------------------------------------------------------------------------------------


def starters(args: argparse.Namespace, gguf: Path, workdir: Path) -> dict[str, Callable[[contextlib.ExitStack], Any]]:
    """How to start each server of ``--servers`` (builds and installs the peers on first use)."""
    plan: dict[str, Callable[[contextlib.ExitStack], Any]] = {}
    if "liftoff" in args.servers:
        for backend in args.liftoff_backend:

            def liftoff(stack: contextlib.ExitStack, b: str = backend) -> Running:
                options = backend_options(args) if b == "transformers" else {}
                return start_liftoff(b, workdir, args.repository, args.batch_size, args.new_tokens, stack, options)

            plan[f"liftoff-{backend}"] = liftoff
    if "llama-server" in args.servers or "liftoff-api" in args.servers:
        binary = peers.ensure_llama_server(args.peers_dir)
    threads = args.llama_threads
    if "llama-server" in args.servers and not args.interleave:
        plan["llama-server"] = lambda stack: start_llama_server(binary, gguf, workdir, args.new_tokens, stack,
                                                                threads)  # fmt: skip
    if "liftoff-api" in args.servers and not args.interleave:

        def liftoff_api(stack: contextlib.ExitStack) -> Running:
            upstream = start_llama_server(binary, gguf, workdir, args.new_tokens, stack, threads)
            return start_liftoff_api(upstream, workdir, args.batch_size, stack)

        plan["liftoff-api"] = liftoff_api
    if "transformers-serve" in args.servers:
        cli = peers.ensure_transformers_serve(args.peers_dir)
        checkpoint = tf_checkpoint(args, gguf)
        plan["transformers-serve"] = lambda stack: start_transformers_serve(
            cli, checkpoint, workdir, args.new_tokens, tf_serve_flags(args), stack
        )
    return plan


def backend_options(args: argparse.Namespace) -> dict[str, str]:
    """``--transformers-option KEY=VALUE`` entries as a ``backend_options`` mapping."""
    return key_values(args.transformers_option, "--transformers-option")


def tf_serve_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--cb-max-memory-percent", str(args.tf_serve_memory)] if args.tf_serve_memory > 0 else []
    return flags + [str(flag) for flag in args.tf_serve_arg]


def tf_checkpoint(args: argparse.Namespace, gguf: Path) -> Path:
    """Liftoff's own dequantized copy when its repository has one, else ours (made once)."""
    found = peers.find_dequantized([args.repository])
    return found if found is not None else peers.ensure_dequantized(args.peers_dir, gguf)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["HF_HUB_OFFLINE"] = "1"  # every model is local; the servers inherit this
    if args.duration:
        mode = f"{args.duration:g} s window"
    elif args.requests_per_client:
        mode = f"{args.requests_per_client} measured requests per client"
    else:
        mode = "max(3, ceil(40 / c)) measured requests per client"
    meta = run_meta(
        new_tokens=args.new_tokens,
        concurrency=args.concurrency,
        mode=mode,
        warmup_s=args.warmup,
        max_other_cpu=args.max_other_cpu,
    )
    gguf = resolve_gguf()
    made = make_prompts(args.prompts, args.prompt_tokens, token_counter(gguf))
    counts = [count for _, count in made]
    meta["prompt_tokens"] = {"min": min(counts), "max": max(counts), "mean": sum(counts) / len(counts)}
    prompts = [text for text, _ in made]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="liftoff-genbench-") as tmp:
        workdir = Path(tmp)
        for key, start in starters(args, gguf, workdir).items():
            results[key] = run_server(key, start, prompts, args)
            keep_log(key, results[key], args)
        if args.interleave:
            binary = peers.ensure_llama_server(args.peers_dir)
            results |= run_interleaved(binary, gguf, workdir, prompts, args)
        prompts_file = workdir / "prompts.json"
        prompts_file.write_text(json.dumps({"rendered": [chat_render(text) for text in prompts], "user": prompts}))
        for key in [s for s in args.servers if s in RAW_ENGINES]:
            model = tf_checkpoint(args, gguf) if key == "raw-torch" else gguf
            results[key] = run_raw(RAW_ENGINES[key], model, prompts_file, args)
    meta["loadavg_after"] = [round(value, 2) for value in os.getloadavg()]
    return {"meta": meta, "results": results}


def keep_log(key: str, result: dict[str, Any], args: argparse.Namespace) -> None:
    """Copy a server's log next to the JSON output (the work folder goes away)."""
    if args.json and result.get("log") and Path(result["log"]).exists():
        target = args.json.with_name(f"{args.json.stem}-{key}.log")
        target.write_bytes(Path(result["log"]).read_bytes())
        result["log"] = str(target)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=SERVERS, help="Which to run (all).")
    parser.add_argument(
        "--liftoff-backend",
        nargs="+",
        choices=["llamacpp", "transformers", "echo"],
        default=["llamacpp", "transformers"],
        help="Liftoff reader backends, one server each.",
    )
    parser.add_argument(
        "--transformers-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="A backend_options entry for Liftoff's transformers backend (server and in-process loop), e.g. "
        "quantize=int8; repeatable.",
    )
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32], help="Clients (1 8 32).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--duration", type=float, help="Measure a window of this many seconds per phase instead.")
    mode.add_argument(
        "--requests-per-client",
        type=int,
        help="Measured requests per client (default max(3, ceil(40 / concurrency))); the window ends "
        "when the first client has done them, so that lockstep waves are measured whole.",
    )
    parser.add_argument(
        "--cut",
        action="store_true",
        help="Abort the streams still running when the window ends (default: let them finish).",
    )
    parser.add_argument("--warmup", type=float, default=10.0, help="Minimum warm-up seconds per phase (10).")
    parser.add_argument("--new-tokens", type=int, default=64, help="Output tokens per request (64).")
    parser.add_argument("--prompt-tokens", type=int, default=100, help="Prompt tokens after the template (100).")
    parser.add_argument("--prompts", type=int, default=1024, help="Distinct prompts (1024).")
    parser.add_argument("--batch-size", type=int, default=32, help="Liftoff reader max_batch_size (32).")
    parser.add_argument("--timeout", type=float, default=300.0, help="A stream longer than this is an error.")
    parser.add_argument("--raw-rounds", type=int, default=2, help="Measured rounds per raw batch size (2).")
    parser.add_argument("--raw-timeout", type=float, default=900.0, help="Limit for one raw engine run (s).")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="Before each phase wait up to this long for the machine to be idle (0: don't).",
    )
    parser.add_argument(
        "--max-other-cpu",
        type=float,
        default=25.0,
        help="Repeat a measurement during which other processes used more than this percent of a core (25); "
        "the last try is kept and marked noisy.",
    )
    parser.add_argument("--retries", type=int, default=2, help="Repeats of a disturbed measurement at most (2).")
    parser.add_argument(
        "--tf-serve-memory",
        type=float,
        default=0.1,
        help="transformers serve --cb-max-memory-percent (0.1; 0: its default, 0.6 of the free "
        "memory on CPU, which it touches: over 11 GB here).",
    )
    parser.add_argument(
        "--tf-serve-arg",
        action="append",
        default=[],
        help="Extra flag for transformers serve (write --tf-serve-arg=--flag).",
    )
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="Measure llama-server and liftoff-api (in front of that same llama-server) in alternating phases, "
        "ROUNDS times per concurrency, and report the round with the median ratio: on a shared machine, "
        "load that comes and goes then falls on both alike (0: one after the other).",
    )
    parser.add_argument(
        "--llama-threads",
        type=int,
        default=2,
        help="llama-server's -t (2). 1 leaves a core to the client and, for liftoff-api, to Liftoff: on a 2-core "
        "machine the proxy otherwise takes its CPU from the engine, which in a real deployment runs elsewhere.",
    )
    parser.add_argument("--peers-dir", type=Path, default=peers.DEFAULT_PEERS_DIR, help="Peer builds and venvs.")
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("~/.cache/liftoff/bench-repository").expanduser(),
        help="Liftoff's repository_path (kept between runs: a dequantized copy is reused).",
    )
    parser.add_argument("--json", type=Path, help="Also write the figures to this JSON file.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with terminate_on_sigterm():
        try:
            outcome = benchmark(args)
        except RuntimeError as exc:
            log(f"failed: {exc}")
            return 1
        except KeyboardInterrupt:
            log("interrupted; the servers were stopped")
            return 130
    lines, checks = report(outcome["results"], outcome["meta"])
    print("\n".join(lines))
    if args.json:
        outcome["checks"] = checks
        args.json.write_text(json.dumps(outcome, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    measured = any("phases" in r or "results" in r for r in outcome["results"].values())
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
