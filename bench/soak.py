"""Soak benchmark: mixed traffic against the bundled models for a long time; nothing may fail and nothing may grow.

It starts ``liftoff serve`` (free loopback ports, its own process group, stopped at the end, also on Ctrl-C or
SIGTERM) with two readers: SmolLM2-135M-Instruct on llama.cpp in group ``primary`` and all-MiniLM-L6-v2 in group
``embed``. Then ``--concurrency`` closed-loop clients (httpx, asyncio) send, for ``--duration`` seconds, the
requests of a fixed mix (``--mix``), taken in one evenly spread cycle (code and judging in
``bench/soak_traffic.py``): ``/generate``, ``/generate_stream``, OpenAI chat (plain and streamed), ``/embed``,
``/v1/embeddings``, streams the client hangs up on after two events, and bad requests (malformed JSON, out-of-range
values, unknown groups, bodies over the limits), each sent in turn.

The report: requests/s, p50/p99 latency per kind (whole request; for streams, to the last event read), expected
errors (bad requests answered with their 4xx) and **unexpected errors** (5xx, hangs past ``--request-timeout``,
broken connections, wrong answers), then the RSS of the gateway and of each reader process sampled every
``--sample-interval`` seconds (10) and its growth from the first sample after ``--warmup`` to the last (target:
under 5 %). A reader whose pid changes (it died and was started again) is an unexpected error too. After the
traffic, one plain ``/generate`` must be answered within ``AFTER_TIMEOUT_S`` and every reader must still be live.

Run it from the repository root (the default is 10 minutes; see docs/benchmarks.md)::

    .venv/bin/python bench/soak.py
    .venv/bin/python bench/soak.py --duration 60 --warmup 20 --concurrency 4 --json /tmp/soak.json
    .venv/bin/python bench/soak.py --mix bad=0,cancel=0      # the other kinds only (weights over the default mix)

The exit code is 1 when there was an unexpected error or the server could not start, else 0 (RSS growth over the
target is reported as MISS, not an exit code: short runs are noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from common.gateways import launch_liftoff, liftoff_ports
from common.load import percentile_ms
from common.log import log
from common.procs import terminate_on_sigterm as stop_on_sigterm
from common.report import run_lines, run_meta
from soak_traffic import DEFAULT_MIX, Ledger, Plan, Target, bad_requests, run_traffic

HOST = "127.0.0.1"
LLM_READER, EMBED_READER = "llm", "minilm"
GROUP, EMBED_GROUP = "primary", "embed"
TARGET_GROWTH = 0.05
AFTER_TIMEOUT_S = 10.0


def liftoff_config(ports: dict[str, int], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The two bundled models, each in its group, with the server's default limits."""
    readers = {
        LLM_READER: {"model_name": "smollm2-135m-instruct", "device": "cpu", "consumer_group": GROUP,
                     "max_batch_size": args.batch_size, "backend_options": {"n_threads": args.llm_threads}},
        EMBED_READER: {"model_name": "all-minilm-l6-v2", "device": "cpu", "consumer_group": EMBED_GROUP,
                       "max_batch_size": 16, "batch_duration_millis": 10},
    }  # fmt: skip
    server = {**ports, "host": HOST, "repository_path": str(workdir / "artefacts"), "shutdown_timeout_s": 10}
    return {"takeoff": {"server_config": server, "readers_config": readers}}


# ---- memory ------------------------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    """Resident set size of ``pid`` in KiB (None once it is gone)."""
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reader_pids(management: str) -> dict[str, list[int]]:
    """Every live reader's pids, by reader id, from ``/status``."""
    status = httpx.get(f"{management}/status", timeout=5).json()["status"]
    return {reader_id: info["pids"] for reader_id, info in status["live_readers"].items()}


def sample(gateway_pid: int, management: str) -> dict[str, Any]:
    """One sample: seconds, then ``name -> [pid, RSS KiB]`` for the gateway and each live reader process."""
    processes = {"gateway": [gateway_pid, rss_kib(gateway_pid)]}
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        for reader_id, pids in reader_pids(management).items():
            for pid in pids:
                processes[reader_id if len(pids) == 1 else f"{reader_id}/{pid}"] = [pid, rss_kib(pid)]
    return {"t": time.monotonic(), "processes": processes}


async def sample_memory(gateway_pid: int, management: str, interval_s: float, samples: list[dict[str, Any]]) -> None:
    """Sample every ``interval_s`` until cancelled (the first right away)."""
    while True:
        samples.append(await asyncio.to_thread(sample, gateway_pid, management))
        await asyncio.sleep(interval_s)


def memory_figures(samples: list[dict[str, Any]], started: float, warmup_s: float) -> dict[str, dict[str, Any]]:
    """Per process: RSS at start, first after warm-up, last and max (MiB), growth, and pid changes."""
    figures: dict[str, dict[str, Any]] = {}
    names = {name for item in samples for name in item["processes"]}
    for name in sorted(names):
        seen = [(item["t"] - started, *item["processes"][name]) for item in samples if name in item["processes"]]
        values = [(t, pid, kib) for t, pid, kib in seen if kib is not None]
        after = [kib for t, _, kib in values if t >= warmup_s]
        first, last = (after[0], after[-1]) if len(after) >= 2 else (None, None)
        figures[name] = {
            "samples": len(values),
            "start_mib": values[0][2] / 1024 if values else None,
            "after_warmup_mib": first / 1024 if first else None,
            "last_mib": last / 1024 if last else None,
            "max_mib": max(kib for _, _, kib in values) / 1024 if values else None,
            "growth": (last - first) / first if first and last else None,
            "pids": sorted({pid for _, pid, _ in values}),
        }
    return figures


# ---- the run -----------------------------------------------------------------------------------------------------


def after_check(native: str, management: str, expected: set[str]) -> dict[str, Any]:
    """A plain request after the traffic, and the live readers: the server must still serve."""
    started = time.monotonic()
    try:
        response = httpx.post(f"{native}/generate", json={"text": "Hello", "max_new_tokens": 8},
                              timeout=AFTER_TIMEOUT_S)  # fmt: skip
        status: int | str = response.status_code
    except httpx.HTTPError as exc:
        status = f"{type(exc).__name__}: {exc}"
    seconds = time.monotonic() - started
    try:
        live = sorted(reader_pids(management))
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        live = [f"no /status: {exc}"]
    ok = status == 200 and set(live) == expected
    return {"generate_status": status, "generate_s": seconds, "live_readers": live, "ok": ok}


async def drive(plan: Plan, args: argparse.Namespace, gateway_pid: int, management: str) -> dict[str, Any]:
    """The traffic and the memory sampler side by side; the ledger and the samples."""
    ledger, samples = Ledger(), list[dict[str, Any]]()
    started = time.monotonic()
    sampler = asyncio.create_task(sample_memory(gateway_pid, management, args.sample_interval, samples))
    try:
        elapsed = await run_traffic(plan, args.concurrency, args.duration, args.seed, ledger)
    finally:
        sampler.cancel()
    samples.append(await asyncio.to_thread(sample, gateway_pid, management))  # the last, after the traffic
    return {"ledger": ledger, "elapsed_s": elapsed, "memory": memory_figures(samples, started, args.warmup),
            "samples": samples}  # fmt: skip


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, drive the traffic, check it still serves, stop it; the figures."""
    meta = run_meta(concurrency=args.concurrency, duration_s=args.duration, warmup_s=args.warmup, mix=args.mix,
                    max_new_tokens=args.max_new_tokens, request_timeout_s=args.request_timeout,
                    sample_interval_s=args.sample_interval)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="liftoff-soak-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        ports = liftoff_ports()
        server = launch_liftoff(workdir, liftoff_config(ports, workdir, args), ports, stack, timeout=args.start_timeout)
        native, openai = f"http://{HOST}:{ports['port']}", f"http://{HOST}:{ports['openai_port']}"
        management = f"http://{HOST}:{ports['management_port']}"
        target = Target(native, openai, GROUP, EMBED_GROUP, LLM_READER, args.max_new_tokens)
        plan = Plan(target, args.mix, bad_requests(target), args.request_timeout)
        outcome = asyncio.run(drive(plan, args, server.pid, management))
        outcome["after"] = after_check(native, management, {LLM_READER, EMBED_READER})
        stack.close()
        meta |= {"liftoff_exit": server.exit_code, "liftoff_log_problems": server.log_problems()[:50]}
    meta["loadavg_after"] = [round(value, 2) for value in os.getloadavg()]
    return {"meta": meta, **summarize(outcome)}


def summarize(outcome: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready figures: per kind, totals, unexpected errors, memory, the after-check."""
    ledger: Ledger = outcome["ledger"]
    kinds = {}
    for kind in sorted(ledger.outcomes):
        counts, latencies = ledger.outcomes[kind], ledger.latencies_ms.get(kind, [])
        kinds[kind] = {**{name: counts.get(name, 0) for name in ("ok", "expected", "unexpected")},
                       "p50_ms": _percentile(latencies, 50), "p99_ms": _percentile(latencies, 99)}  # fmt: skip
    total = sum(sum(counts.values()) for counts in ledger.outcomes.values())
    unexpected = dict(ledger.unexpected)
    restarted = [name for name, item in outcome["memory"].items() if len(item["pids"]) > 1]
    unexpected |= {f"reader {name}: restarted (pids changed)": 1 for name in restarted}
    if not outcome["after"]["ok"]:
        unexpected["after the run: the server did not serve"] = 1
    return {
        "elapsed_s": outcome["elapsed_s"],
        "requests": total,
        "requests_per_s": total / outcome["elapsed_s"] if outcome["elapsed_s"] else 0.0,
        "kinds": kinds,
        "unexpected_total": sum(unexpected.values()),
        "unexpected": unexpected,
        "unexpected_samples": ledger.samples,
        "differing_generations": dict(ledger.differing),
        "memory": outcome["memory"],
        "after": outcome["after"],
        "samples": outcome["samples"],
    }


def _percentile(values: list[float], pct: float) -> float | None:
    return percentile_ms([int(value * 1e6) for value in values], pct)


# ---- the report --------------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def report(result: dict[str, Any]) -> list[str]:
    meta = result["meta"]
    lines = [f"# Soak: {meta['duration_s']:g} s of mixed traffic, {meta['concurrency']} clients", "", *run_lines(meta)]
    lines += [f"- Mix (weights): {meta['mix']}; max_new_tokens {meta['max_new_tokens']}; request timeout "
              f"{meta['request_timeout_s']:g} s", ""]  # fmt: skip
    lines += ["| kind | ok | expected 4xx | unexpected | p50 ms | p99 ms |", "|---|--:|--:|--:|--:|--:|"]
    for kind, item in result["kinds"].items():
        lines.append(f"| {kind} | {item['ok']} | {item['expected']} | {item['unexpected']} | "
                     f"{_num(item['p50_ms'])} | {_num(item['p99_ms'])} |")  # fmt: skip
    verdict = "PASS" if result["unexpected_total"] == 0 else "FAIL"
    lines += [
        "",
        f"Requests: {result['requests']:,} in {result['elapsed_s']:.0f} s = "
        f"{result['requests_per_s']:.2f} requests/s; unexpected errors: {result['unexpected_total']} {verdict}",
    ]
    for key, count in sorted(result["unexpected"].items(), key=lambda item: -item[1]):
        sample = result["unexpected_samples"].get(key)
        lines.append(f"- {count} x {key}" + (f" (e.g. {sample!r})" if sample else ""))
    lines += [
        f"- generations unlike the first answer to the same prompt (not an error): {result['differing_generations']}"
    ]
    return lines + memory_lines(result) + after_lines(result)


def memory_lines(result: dict[str, Any]) -> list[str]:
    lines = ["", f"RSS (MiB), sampled every {result['meta']['sample_interval_s']:g} s; growth from the first "
             f"sample after {result['meta']['warmup_s']:g} s of warm-up to the last (target < {TARGET_GROWTH:.0%}):",
             "", "| process | pids | start | after warm-up | last | max | growth | result |",
             "|---|---|--:|--:|--:|--:|--:|---|"]  # fmt: skip
    for name, item in result["memory"].items():
        growth = item["growth"]
        mark = "n/a" if growth is None else ("PASS" if growth < TARGET_GROWTH else "MISS")
        lines.append(f"| {name} | {item['pids']} | {_num(item['start_mib'])} | {_num(item['after_warmup_mib'])} | "
                     f"{_num(item['last_mib'])} | {_num(item['max_mib'])} | "
                     f"{'n/a' if growth is None else f'{growth:+.1%}'} | {mark} |")  # fmt: skip
    return lines


def after_lines(result: dict[str, Any]) -> list[str]:
    after, meta = result["after"], result["meta"]
    return ["", f"After the traffic: /generate answered {after['generate_status']} in {after['generate_s']:.2f} s; "
            f"live readers {after['live_readers']}; liftoff exit code {meta['liftoff_exit']}; "
            f"{len(meta['liftoff_log_problems'])} warning/error log lines",
            *[f"  liftoff log: {line[:200]}" for line in meta["liftoff_log_problems"][:10]]]  # fmt: skip


# ---- main --------------------------------------------------------------------------------------------------------


def parse_mix(text: str) -> dict[str, int]:
    """``kind=weight,...`` over the default mix: named kinds take these weights; the others keep theirs."""
    mix = dict(DEFAULT_MIX)
    for item in filter(None, text.split(",")):
        kind, _, weight = item.partition("=")
        if kind not in mix or not weight.isdigit():
            raise argparse.ArgumentTypeError(f"{item!r}: expected kind=weight with kind in {sorted(mix)}")
        mix[kind] = int(weight)
    if not any(mix.values()):
        raise argparse.ArgumentTypeError("every weight is 0")
    return {kind: weight for kind, weight in mix.items() if weight}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before RSS growth is counted (60)")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients (8)")
    parser.add_argument("--mix", type=parse_mix, default=dict(DEFAULT_MIX), help=f"weights, e.g. bad=0 ({DEFAULT_MIX})")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per generation request (32)")
    parser.add_argument("--batch-size", type=int, default=8, help="max_batch_size of the llama.cpp reader (8)")
    parser.add_argument("--llm-threads", type=int, default=1,
                        help="llama.cpp threads (1: on 2 cores shared with MiniLM, the gateway and the clients, "
                        "two spinning threads stall whenever another process takes a core)")  # fmt: skip
    parser.add_argument("--request-timeout", type=float, default=60.0, help="no answer by then is a hang (60 s)")
    parser.add_argument("--sample-interval", type=float, default=10.0, help="seconds between RSS samples (10)")
    parser.add_argument("--start-timeout", type=float, default=180.0, help="seconds to wait for the readers (180)")
    parser.add_argument("--seed", type=int, default=14, help="seed of the clients' draws (14)")
    parser.add_argument("--json", type=Path, help="also write every figure (and every RSS sample) here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with stop_on_sigterm():
        try:
            result = soak(args)
        except RuntimeError as exc:
            log(f"failed: {exc}")
            return 1
        except KeyboardInterrupt:
            log("interrupted; the server was stopped")
            return 130
    print("\n".join(report(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 1 if result["unexpected_total"] else 0


if __name__ == "__main__":
    sys.exit(main())
