"""The API reader's overhead measured in alternation (``bench/generation.py --interleave ROUNDS``).

One llama-server runs; Liftoff's API reader fronts it. For each concurrency the same phase is measured against
llama-server directly and through Liftoff, ROUNDS times, in alternating order (direct first in even rounds), with
prompts never sent twice. Load that other jobs put on a shared machine comes and goes; measured this way it falls on
both sides alike, so the ratio of one round is meaningful where two separate runs minutes apart are not. The round
with the median throughput ratio is reported (both of its phases), and every round's ratio is kept in the notes.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path
from typing import Any

from common.log import log
from genbench_load import PromptCycle
from genbench_measure import one_phase, probe, with_retries
from genbench_servers import Running, start_liftoff_api, start_llama_server


def _ratio(direct: dict[str, Any], api: dict[str, Any]) -> float:
    rate = direct.get("tokens_per_s") or 0.0
    return float(api.get("tokens_per_s") or 0.0) / rate if rate else 0.0


def _rounds(direct: Running, api: Running, cycle: PromptCycle, c: int, args: argparse.Namespace) -> list[Any]:
    """ROUNDS pairs of phases at concurrency ``c``: (direct, api), the order alternating."""
    pairs = []
    for index in range(args.interleave):
        order = [direct, api] if index % 2 == 0 else [api, direct]
        got = {}
        for running in order:
            what = f"{running.label} c={c} round {index + 1}"
            got[running.key] = with_retries(what, args, lambda r=running: one_phase(r, cycle, c, args))
        pairs.append((got[direct.key], got[api.key]))
        log(f"c={c} round {index + 1}: liftoff-api / llama-server = {_ratio(*pairs[-1]):.3f}")
    return pairs


def run_interleaved(binary: Path, gguf: Path, workdir: Path, prompts: list[str],
                    args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """``{"llama-server": ..., "liftoff-api": ...}`` in the shape of ``measure_server``'s results."""
    with contextlib.ExitStack() as stack:
        direct = start_llama_server(binary, gguf, workdir, args.new_tokens, stack, args.llama_threads)
        api = start_liftoff_api(direct, workdir, args.batch_size, stack)
        cycle = PromptCycle(prompts)
        results: dict[str, Any] = {}
        for running in (direct, api):
            results[running.key] = {"label": running.label, "notes": running.notes, "phases": {},
                                    "probe": probe(running, cycle.next(), args.timeout)}  # fmt: skip
        ratios: dict[str, list[float]] = {}
        for c in args.concurrency:
            pairs = _rounds(direct, api, cycle, c, args)
            ratios[str(c)] = [round(_ratio(*pair), 3) for pair in pairs]
            middle = statistics.median_low(ratios[str(c)])
            chosen = next(pair for pair in pairs if round(_ratio(*pair), 3) == middle)
            results[direct.key]["phases"][str(c)], results[api.key]["phases"][str(c)] = chosen
        rounds = "; ".join(f"c={c}: {', '.join(f'{r:.3f}' for r in found)}" for c, found in ratios.items())
        results[api.key]["notes"] += f"; interleaved with llama-server, {args.interleave} rounds, ratios {rounds}"
        results[api.key]["interleaved_ratios"] = ratios
    return results
