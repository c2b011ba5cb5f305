"""Embedding throughput: Liftoff's ``/v1/embeddings`` under concurrent clients against sentence-transformers run
in process at its best batch size, on the bundled all-MiniLM-L6-v2 (CPU).

1. The peer, in this process before any server starts: ``SentenceTransformer.encode`` on batches of the same
   sentence at each of ``--batch-sizes``, timed over ``--duration`` seconds each (after one warm-up batch);
   the best batch size's sentences/s is the figure to match. That size is measured again after Liftoff's windows
   and the higher of the two figures counts (this machine's speed drifts by 10 % over minutes).
2. Liftoff: ``liftoff serve`` with one embedding reader (``max_batch_size`` = the peer's best batch size unless
   ``--max-batch-size``, and no more than the clients keep in flight; ``batch_duration_millis`` =
   ``--batch-duration-ms``), then ``--concurrency`` keep-alive
   clients (the load generator of ``bench/gateway.py``: asyncio, pre-built requests) each sending one input per
   request to ``/v1/embeddings``, for ``encoding_format`` base64 (the OpenAI SDK's default) and float.
   Embeddings/s = good answers/s x inputs per request. Target: at least 0.8x the peer.

The load generator shares the 2 CPUs with the gateway and the reader, while the peer has them to itself; the
report shows the CPU each process used during each window. Run from the repository root::

    .venv/bin/python bench/embeddings.py                       # defaults: 32 clients, 10 s windows
    .venv/bin/python bench/embeddings.py --duration 5 --json /tmp/embeddings.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common.gateways import launch_liftoff, liftoff_ports
from common.load import Phase, Settings, run_phase
from common.log import log
from common.report import machine_info

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."  # 16 tokens with [CLS] and [SEP]
TARGET = 0.8
GROUP = "embed"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32, help="clients sending requests to Liftoff")
    parser.add_argument("--inputs-per-request", type=int, default=1, help="texts in each request")
    parser.add_argument("--batch-sizes", default="8,16,32,64,128", help="the peer's batch sizes to try")
    parser.add_argument("--max-batch-size", type=int, default=0, help="the reader's (default: the peer's best)")
    parser.add_argument("--batch-duration-ms", type=int, default=10, help="the reader's batch_duration_millis")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per window")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up before each window")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--reader-log-level", default="INFO", help="DEBUG logs every batch the reader runs")
    parser.add_argument("--keep-log", type=Path, help="copy Liftoff's log here at the end")
    return parser.parse_args()


def peer(batch_sizes: list[int], duration_s: float) -> dict[int, float]:
    """sentences/s of ``SentenceTransformer.encode`` per batch size, in this process."""
    import torch
    from sentence_transformers import SentenceTransformer

    from liftoff.backends.resolve import resolve_model

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = SentenceTransformer(str(resolve_model("all-minilm-l6-v2", Path("/nonexistent")).path), device="cpu")
    rates: dict[int, float] = {}
    for size in batch_sizes:
        batch = [SENTENCE] * size
        model.encode(batch, batch_size=size)  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration_s:
            model.encode(batch, batch_size=size)
            done += size
        rates[size] = done / (time.perf_counter() - start)
        log(f"sentence-transformers batch {size}: {rates[size]:,.0f} sentences/s")
    del model
    gc.collect()
    return rates


def liftoff_config(ports: dict[str, int], workdir: Path, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    reader = {"model_name": "all-minilm-l6-v2", "device": "cpu", "consumer_group": GROUP, "max_batch_size": batch,
              "batch_duration_millis": args.batch_duration_ms, "log_level": args.reader_log_level}  # fmt: skip
    server = {**ports, "host": "127.0.0.1", "repository_path": str(workdir / "artefacts"), "shutdown_timeout_s": 10}
    return {"takeoff": {"server_config": server, "readers_config": {"minilm": reader}}}


def measure_liftoff(args: argparse.Namespace, batch: int) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    settings = Settings(args.warmup, args.duration, 30.0)
    with tempfile.TemporaryDirectory(prefix="liftoff-embed-") as tmp, contextlib.ExitStack() as stack:
        if args.keep_log:
            stack.callback(shutil.copy, Path(tmp) / "liftoff.log", args.keep_log)
        workdir = Path(tmp)
        ports = liftoff_ports()
        server = launch_liftoff(workdir, liftoff_config(ports, workdir, batch, args), ports, stack,
                                timeout=120)  # fmt: skip
        cpu = {"client": [os.getpid()], "gateway": [server.pid], "readers": server.track_children()}
        texts = [SENTENCE] * args.inputs_per_request
        for encoding in ("base64", "float"):
            payload = {"model": GROUP, "input": texts, "encoding_format": encoding}
            phase = Phase(f"liftoff_{encoding}", f"Liftoff /v1/embeddings ({encoding})", ports["openai_port"],
                          "/v1/embeddings", payload, args.concurrency, None, cpu, same_body=False)  # fmt: skip
            results[encoding] = asyncio.run(run_phase(phase, settings))
    return results


def report(args: argparse.Namespace, rates: dict[int, float], results: dict[str, dict[str, Any]], batch: int) -> None:
    best_size = max(rates, key=lambda size: rates[size])
    best = rates[best_size]
    print(f"\nEmbeddings, all-MiniLM-L6-v2 on CPU, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {json.dumps(machine_info())}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\n")
    head = "| system | setting | embeddings/s | vs peer | p50 ms | p99 ms | errors |"
    print(head + " CPU % of a core: client / gateway / reader |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for size, rate in rates.items():
        mark = " (best)" if size == best_size else ""
        print(f"| sentence-transformers in process | batch {size}{mark} | {rate:,.0f} | {rate / best:.2f} | | | | |")
    for encoding, result in results.items():
        rate = result["requests_per_s"] * args.inputs_per_request
        verdict = "PASS" if rate >= TARGET * best else "MISS"
        cpu = result["cpu"]
        used = " / ".join(f"{cpu.get(key, 0):.0f}" for key in ("client", "gateway", "readers"))
        print(f"| Liftoff /v1/embeddings | {encoding}, {args.concurrency} clients x {args.inputs_per_request} input, "
              f"max_batch_size {batch} | {rate:,.0f} | {rate / best:.2f} {verdict} | {result['p50_ms']:.1f} | "
              f"{result['p99_ms']:.1f} | {result['errors']} | {used} |")  # fmt: skip
    print(f"\nTarget: Liftoff >= {TARGET}x the peer's best ({best:,.0f} sentences/s at batch {best_size}).")


def main() -> None:
    args = parse_args()
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    rates = peer(sizes, args.duration)
    best = max(rates, key=lambda size: rates[size])  # but no larger than what the clients keep in flight
    batch = args.max_batch_size or min(best, args.concurrency * args.inputs_per_request)
    results = measure_liftoff(args, batch)
    again = peer([best], args.duration)[best]  # the machine drifts: the peer's best is measured again after
    rates[best] = max(rates[best], again)
    report(args, rates, results, batch)
    if args.json:
        args.json.write_text(json.dumps({"peer": rates, "liftoff": results, "max_batch_size": batch}, indent=2))


if __name__ == "__main__":
    main()
