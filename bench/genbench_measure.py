"""Measuring for ``bench/generation.py`` on a machine that others may share: wait for quiet, run a phase, account
the CPU of client, server and everyone else, and repeat a phase that someone else's job disturbed."""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.load import run_async
from common.log import log
from common.procs import cpu_snapshot, cpu_usage, die_with_parent, machine_busy_s
from genbench_load import LoadSettings, PromptCycle, run_load, summarize
from genbench_servers import Running

RAW_LABELS = {"llamacpp": "raw llama.cpp loop", "torch": "raw torch loop",
              "liftoff-llamacpp": "Liftoff llamacpp backend loop (no server)",
              "liftoff-transformers": "Liftoff transformers backend loop (no server)"}  # fmt: skip


def wait_quiet(limit_s: float, what: str) -> dict[str, float]:
    """Wait up to ``limit_s`` for a 3 s stretch in which the whole machine uses under a quarter of one core."""
    if limit_s <= 0:
        return {}
    started = time.monotonic()
    busy = 0.0
    while True:
        before = machine_busy_s()
        time.sleep(3.0)
        busy = (machine_busy_s() - before) / 3.0 * 100
        if busy < 25 or time.monotonic() - started >= limit_s:
            break
    waited = time.monotonic() - started
    log(f"{what}: machine busy {busy:.0f} % of a core after waiting {waited:.0f} s for quiet")
    return {"quiet_wait_s": round(waited, 1), "busy_before_pct": round(busy, 1)}


def with_retries(what: str, args: argparse.Namespace, attempt: Any) -> dict[str, Any]:
    """``attempt()`` until other processes used at most ``--max-other-cpu`` during it (``--retries`` more at
    most); the last result, with ``attempts`` and ``noisy``."""
    result: dict[str, Any] = {}
    for index in range(args.retries + 1):
        quiet = wait_quiet(args.quiet_wait, what)
        result = attempt() | quiet
        other = float((result.get("cpu") or {}).get("other") or 0.0)
        result |= {"attempts": index + 1, "noisy": other > args.max_other_cpu}
        if not result["noisy"] or "error" in result:
            break
        log(f"{what}: other processes used {other:.0f} % of a core (> {args.max_other_cpu:g} %): " +
            ("again" if index < args.retries else "keeping it, marked noisy"))  # fmt: skip
    return result


# ---- servers -----------------------------------------------------------------------------------------------------


def probe(running: Running, prompt: str, timeout_s: float) -> dict[str, Any]:
    """One request before the load (a lazy model load happens here); its stream, summarized."""
    settings = LoadSettings(1, 0.0, None, 1, timeout_s, 0)
    window = run_async(run_load(running.api, PromptCycle([prompt]), settings, lambda: None))
    stream = window.streams[-1] if window.streams else None
    if stream is None:
        return {"error": "no answer"}
    return {"status": stream.status, "error": stream.error, "tokens": stream.tokens,
            "events": len(stream.token_times), "seconds": (stream.end_ns - stream.start_ns) / 1e9}  # fmt: skip


def one_phase(running: Running, prompts: PromptCycle, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    """One closed-loop phase at ``concurrency``, with the CPU use of its measured window."""
    per_client = None if args.duration else (args.requests_per_client or max(3, math.ceil(40 / concurrency)))
    settings = LoadSettings(concurrency, args.warmup, args.duration, per_client, args.timeout, args.new_tokens,
                            drain=not args.cut)  # fmt: skip
    groups = {"client": [os.getpid()], "server": running.pids()}
    marks: dict[str, dict[str, float]] = {}
    mode = f"{args.duration:g} s" if args.duration else f"{per_client} requests per client"
    log(f"{running.label} c={concurrency}: warm-up, then {mode}")

    def mark() -> None:
        marks["t0"] = cpu_snapshot(groups)

    window = run_async(run_load(running.api, prompts, settings, mark))
    result = summarize(window, settings) | {"prompt_repeats": prompts.repeats, "requests_per_client": per_client}
    if "t0" in marks:
        result["cpu"] = cpu_usage(marks["t0"], cpu_snapshot(groups))
    log(f"{running.label} c={concurrency}: {json.dumps(result, default=str)}")
    running.server.check_running()
    if running.upstream is not None:
        running.upstream.check_running()
    return result


def measure_server(running: Running, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The probe, then one phase per concurrency (repeated when disturbed)."""
    cycle = PromptCycle(prompts)
    first = probe(running, cycle.next(), args.timeout)
    log(f"{running.label}: probe {first}")
    phases = {
        str(c): with_retries(f"{running.label} c={c}", args, lambda c=c: one_phase(running, cycle, c, args))
        for c in args.concurrency
    }
    return {"label": running.label, "notes": running.notes, "probe": first, "phases": phases}


# ---- the raw and backend loops -----------------------------------------------------------------------------------


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raw_batch(engine: str, model: Path, prompts_file: Path, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """``bench/genbench_raw.py`` at one batch size in a child process, with the CPU the rest of the machine used."""
    script = Path(__file__).resolve().parent / "genbench_raw.py"
    command = [sys.executable, str(script), engine, "--model", str(model), "--prompts", str(prompts_file),
               "--new-tokens", str(args.new_tokens), "--rounds", str(args.raw_rounds), "--repository",
               str(args.repository), "--batch", str(batch)]  # fmt: skip
    if engine == "liftoff-transformers":
        command += [f"--option={entry}" for entry in args.transformers_option]
    log(f"{RAW_LABELS[engine]} batch {batch}: {shlex.join(command)}")
    wall, busy, child, own = time.monotonic(), machine_busy_s(), _children_cpu_s(), _self_cpu_s()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.raw_timeout, check=False,
                              start_new_session=True, preexec_fn=die_with_parent)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"took over {args.raw_timeout:g} s"}
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr[-2000:]}"}
    seconds = max(time.monotonic() - wall, 1e-9)
    used = {"loop": (_children_cpu_s() - child) / seconds * 100, "client": (_self_cpu_s() - own) / seconds * 100}
    used["other"] = max(0.0, (machine_busy_s() - busy) / seconds * 100 - used["loop"] - used["client"])
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    result: dict[str, Any] = outcome["results"][str(batch)] | {"source": outcome["source"], "cpu": used}
    log(f"{RAW_LABELS[engine]} batch {batch}: {json.dumps(result, default=str)}")
    return result


def run_raw(engine: str, model: Path, prompts_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every batch size of one loop (each repeated when disturbed)."""
    results = {}
    for batch in args.concurrency:
        what = f"{RAW_LABELS[engine]} batch {batch}"
        results[str(batch)] = with_retries(what, args, lambda b=batch: raw_batch(engine, model, prompts_file, b, args))
    sources = {str(r["source"]) for r in results.values() if r.get("source")}
    errors = [r["error"] for r in results.values() if "error" in r]
    outcome: dict[str, Any] = {"label": RAW_LABELS[engine], "source": "; ".join(sorted(sources)),
                               "results": {b: r for b, r in results.items() if "error" not in r}}  # fmt: skip
    if errors:
        outcome["error"] = errors[0]
    return outcome
