"""The report of ``bench/generation.py``: one markdown table (rows: servers; columns: per concurrency), the issue's
targets marked PASS or MISS, and the run's command, machine and date."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.report import num, run_lines

ROW_ORDER = ["liftoff-llamacpp", "liftoff-transformers", "liftoff-echo", "llama-server", "liftoff-api",
             "transformers-serve", "raw-llamacpp", "raw-torch", "engine-llamacpp", "engine-transformers"]  # fmt: skip
RAW_OF_BACKEND = {"liftoff-llamacpp": "raw-llamacpp", "liftoff-transformers": "raw-torch"}


def _pair(a: float | None, b: float | None) -> str:
    return "n/a" if a is None else f"{num(a)} / {num(b)}"


def phase(results: dict[str, Any], key: str, concurrency: int) -> dict[str, Any] | None:
    """A server's figures at one concurrency (a raw loop's at that batch size), in one shape."""
    result = results.get(key) or {}
    if "phases" in result:
        found: dict[str, Any] | None = result["phases"].get(str(concurrency))
        return found
    raw = (result.get("results") or {}).get(str(concurrency))
    if raw is None:
        return None
    return {**raw, "requests": raw["sequences"], "errors": 0}


def _cells(figures: dict[str, Any] | None) -> list[str]:
    if figures is None:
        return ["—"] * 4
    counts = f"{figures['requests']} / {figures['errors']} / {figures['exact']}"
    rate = num(figures["tokens_per_s"], 1) + (" †" if figures.get("noisy") else "")
    ttft = _pair(figures["ttft_p50_ms"], figures["ttft_p99_ms"])
    return [rate, ttft, _pair(figures["itl_p50_ms"], figures["itl_p99_ms"]), counts]


def table(results: dict[str, Any], concurrency: list[int]) -> list[str]:
    head = ["Server"]
    for c in concurrency:
        head += [f"c={c} tok/s", f"c={c} TTFT p50 / p99 ms", f"c={c} ITL p50 / p99 ms", f"c={c} req / err / exact"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|--:" * (len(head) - 1) + "|"]
    for key in [k for k in ROW_ORDER if k in results] + [k for k in results if k not in ROW_ORDER]:
        result = results[key]
        if "error" in result and "phases" not in result:
            lines.append(f"| {result.get('label', key)} | failed: {_short(result['error'])} |" + " |" * (len(head) - 2))
            continue
        cells = [cell for c in concurrency for cell in _cells(phase(results, key, c))]
        lines.append(f"| {result.get('label', key)} | " + " | ".join(cells) + " |")
    return lines


def _short(text: str) -> str:
    return " ".join(str(text).split())[:160].replace("|", "/")


# ---- targets -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One target of the issue: Liftoff's best backend on ``measure`` at ``concurrency`` against a reference."""

    name: str
    concurrency: int
    measure: str  # "tokens_per_s" (higher is better) or "ttft_p50_ms" (lower is better)
    reference: str  # a result key; "raw" means the raw loop of the backend used
    factor: float


CHECKS = [
    Check("c=1 tokens/s >= 1.0x llama-server", 1, "tokens_per_s", "llama-server", 1.0),
    Check("c=32 tokens/s >= 2x llama-server", 32, "tokens_per_s", "llama-server", 2.0),
    Check("c=32 tokens/s >= 1.5x transformers serve", 32, "tokens_per_s", "transformers-serve", 1.5),
    Check("c=32 tokens/s >= 0.8x the raw loop of the backend used", 32, "tokens_per_s", "raw", 0.8),
    Check("c=8 TTFT p50 <= llama-server's", 8, "ttft_p50_ms", "llama-server", 1.0),
    Check("c=8 TTFT p50 <= transformers serve's", 8, "ttft_p50_ms", "transformers-serve", 1.0),
]


def _liftoff_keys(results: dict[str, Any]) -> list[str]:
    return [key for key in results if key.startswith("liftoff-") and key not in ("liftoff-echo", "liftoff-api")]


def evaluate(check: Check, results: dict[str, Any]) -> dict[str, Any]:
    """The best Liftoff backend for ``check`` (the one with the best ratio to its reference) and the verdict."""
    best: dict[str, Any] | None = None
    for key in _liftoff_keys(results):
        ref_key = RAW_OF_BACKEND.get(key, "") if check.reference == "raw" else check.reference
        mine, ref = phase(results, key, check.concurrency), phase(results, ref_key, check.concurrency)
        if not mine or not ref or mine.get(check.measure) is None or not ref.get(check.measure):
            continue
        clean = not mine.get("errors") and mine.get("exact") == mine.get("requests")
        noisy = bool(mine.get("noisy") or ref.get("noisy"))
        value, reference = mine[check.measure], ref[check.measure]
        if check.measure == "ttft_p50_ms":
            ratio, passed = reference / max(value, 1e-9), value <= reference * check.factor
        else:
            ratio, passed = value / reference, value >= reference * check.factor
        if best is None or (clean, ratio) > (best["clean"], best["ratio"]):
            best = {"backend": key, "reference": ref_key, "value": value, "reference_value": reference,
                    "ratio": ratio, "passed": passed and clean, "clean": clean, "noisy": noisy}  # fmt: skip
    return {"check": check.name, **(best or {"passed": None})}


API_TOKENS = Check("API reader: c=32 tokens/s >= 0.95x llama-server's", 32, "tokens_per_s", "llama-server", 0.95)
API_TTFT_ADDED_MS = 5.0


def api_checks(results: dict[str, Any], concurrency: list[int]) -> list[str]:
    """The API reader's overhead: throughput against llama-server at c=32, TTFT p50 added at every concurrency
    (the target is at c=1, where it is not lost in the queueing of 32 streams)."""
    if "liftoff-api" not in results or "llama-server" not in results:
        return []
    lines = ["| API reader target | Liftoff API reader | llama-server | Difference | Result |", "|---|--:|--:|--:|---|"]
    mine, ref = phase(results, "liftoff-api", 32), phase(results, "llama-server", 32)
    if mine and ref and ref.get("tokens_per_s"):
        ratio = mine["tokens_per_s"] / ref["tokens_per_s"]
        lines.append(f"| {API_TOKENS.name} | {num(mine['tokens_per_s'], 1)} | {num(ref['tokens_per_s'], 1)} | "
                     f"{ratio:.3f}x | {'PASS' if ratio >= API_TOKENS.factor else 'MISS'} |")  # fmt: skip
    for c in concurrency:
        mine, ref = phase(results, "liftoff-api", c), phase(results, "llama-server", c)
        if not mine or not ref or mine.get("ttft_p50_ms") is None or ref.get("ttft_p50_ms") is None:
            continue
        added = mine["ttft_p50_ms"] - ref["ttft_p50_ms"]
        verdict = ("PASS" if added <= API_TTFT_ADDED_MS else "MISS") if c == 1 else "(reported)"
        lines.append(f"| c={c} TTFT p50 added <= {API_TTFT_ADDED_MS:g} ms | {num(mine['ttft_p50_ms'], 1)} ms | "
                     f"{num(ref['ttft_p50_ms'], 1)} ms | {added:+.1f} ms | {verdict} |")  # fmt: skip
    return lines


def checks_table(checks: list[dict[str, Any]]) -> list[str]:
    lines = ["| Target | Liftoff backend used | Liftoff | Reference | Ratio | Result |", "|---|---|--:|--:|--:|---|"]
    for c in checks:
        if c["passed"] is None:
            lines.append(f"| {c['check']} | — | — | — | — | n/a (not measured) |")
            continue
        unit = " ms" if "TTFT" in c["check"] else ""
        ratio = f"{c['ratio']:.2f}" + (" (ref/Liftoff)" if unit else "")
        verdict = ("PASS" if c["passed"] else "MISS") + ("" if c["clean"] else " (errors or wrong lengths)")
        verdict += " (noisy †)" if c["noisy"] else ""
        lines.append(f"| {c['check']} | {c['backend'].removeprefix('liftoff-')} | {num(c['value'], 1)}{unit} | "
                     f"{num(c['reference_value'], 1)}{unit} ({c['reference']}) | {ratio} | "
                     f"{verdict} |")  # fmt: skip
    return lines


# ---- the whole report --------------------------------------------------------------------------------------------


def notes(results: dict[str, Any]) -> list[str]:
    """Per server: settings, probe, how it stopped, CPU noise, problems seen."""
    lines = []
    for key, result in results.items():
        label = result.get("label", key)
        if "source" in result:
            lines.append(f"- {label}: {result['source']}" + (f"; error: {_short(result['error'])}"
                                                               if "error" in result else ""))  # fmt: skip
            for batch, figures in (result.get("results") or {}).items():
                cpu = figures.get("cpu") or {}
                lines.append(f"  - batch {batch}: CPU loop {num(cpu.get('loop'))} %, other {num(cpu.get('other'))} %"
                             f"; tries {figures.get('attempts', 1)}")  # fmt: skip
            continue
        parts = [result.get("notes", "")]
        if "exit_code" in result:
            parts.append(f"stopped with exit code {result['exit_code']} in {result['stop_s']:.1f} s")
        if result.get("log_problems"):
            parts.append(f"{len(result['log_problems'])} warning/error log lines, first: "
                         f"`{_short(result['log_problems'][0])}`")  # fmt: skip
        lines.append(f"- {label}: " + "; ".join(p for p in parts if p))
        for c, figures in (result.get("phases") or {}).items():
            lines.extend(_phase_notes(label, c, figures))
    return lines


def _phase_notes(label: str, concurrency: str, figures: dict[str, Any]) -> list[str]:
    cpu = figures.get("cpu") or {}
    extra = [f"prompt tokens {num(figures.get('prompt_tokens'), 1)}",
             f"tokens per stream {num(figures.get('server_tokens_per_stream'), 1)} (server) / "
             f"{num(figures.get('events_per_stream'), 1)} (events)",
             f"CPU client {num(cpu.get('client'))} %, server {num(cpu.get('server'))} %, "
             f"other {num(cpu.get('other'))} %", f"tries {figures.get('attempts', 1)}"]  # fmt: skip
    if figures.get("problems"):
        extra.append(f"problems {figures['problems']}")
    if figures.get("warmup_problems"):
        extra.append(f"warm-up problems {figures['warmup_problems']}")
    return [f"  - c={concurrency}: " + "; ".join(extra)]


def report(results: dict[str, Any], meta: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    checks = [evaluate(check, results) for check in CHECKS]
    prompt = meta["prompt_tokens"]
    lines = [
        *table(results, meta["concurrency"]),
        "",
        "TTFT: request written → first token event (raw loops: the batch's prefill). ITL: gaps between token events",
        "(raw loops: decode step). req / err / exact: requests that ended in the window / with an error / that",
        f"delivered exactly {meta['new_tokens']} tokens (raw loops: sequences). †: other processes used more than",
        f"{meta.get('max_other_cpu', 25):g} % of a core during that measurement, on every try (noisy).",
        "",
        *checks_table(checks),
        "",
        *api_checks(results, meta["concurrency"]),
        "",
        *run_lines(meta),
        f"- Load: {meta['mode']} after a warm-up of at least {meta['warmup_s']:g} s; prompts "
        f"{prompt['min']}-{prompt['max']} tokens after the chat template (mean {prompt['mean']:.1f}); "
        f"{meta['new_tokens']} output tokens each",
        *notes(results),
    ]
    return lines, checks
