"""What checking a key costs: two Liftoff gateways, one without keys and one with ``api_keys``, run at once, and
the load generator of bench/gateway.py alternates short ``POST /generate`` phases between them (``--concurrency``
keep-alive clients, the keyed one sending ``Authorization: Bearer``), starting each pair with the other gateway, so
that both see the same machine at almost the same time. On a machine shared with other work a single long run of
each (``bench/gateway.py`` with and without ``--api-key``) moves by more than the cost measured; paired short
phases and the median of their ratios do not.

Reported: each phase's requests/s, the median of the paired ratios (keyed / open) of requests/s and of requests per
second of gateway CPU (the target: at least 0.95), and the run's command, date and machine. Every process it starts
is stopped at the end, as in bench/gateway.py::

    .venv/bin/python bench/gateway_keys.py                  # 12 pairs of 3 s phases after 1 s of warm-up
    .venv/bin/python bench/gateway_keys.py --pairs 20 --duration 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from common.gateways import SHORT_GENERATE, start_echo_liftoff
from common.load import Phase, Settings, run_async, run_phase
from common.procs import terminate_on_sigterm
from common.report import run_lines, run_meta

KEY = "bench-key-0123456789abcdefghij"
TARGET = 0.95


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--pairs", type=int, default=12, help="Phase pairs (open, keyed) to run (12).")
    parser.add_argument("--duration", type=float, default=3.0, help="Seconds measured per phase (3).")
    parser.add_argument("--warmup", type=float, default=1.0, help="Seconds of warm-up per phase (1).")
    parser.add_argument("--concurrency", type=int, default=64, help="Clients of each phase (64).")
    return parser.parse_args(argv)


def start(name: str, key: str, workdir: Path, args: argparse.Namespace, stack: contextlib.ExitStack) -> Phase:
    """A gateway with one echo reader (``api_keys`` = ``key`` when given) and its phase."""
    managed, ports = start_echo_liftoff(workdir, stack, readers=1, api_key=key)
    cpu = {"client": [os.getpid()], "gateway": [managed.pid], "readers": managed.track_children()}
    return Phase(name, name, ports["port"], "/generate", SHORT_GENERATE, args.concurrency, None, cpu, api_key=key)


def measure(args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    """(requests/s, gateway CPU %) of every phase, by gateway."""
    settings = Settings(args.warmup, args.duration, 30.0)
    with tempfile.TemporaryDirectory(prefix="liftoff-bench-keys-") as tmp, contextlib.ExitStack() as stack:
        phases = {}
        for name, key in (("open", ""), ("keyed", KEY)):
            (Path(tmp) / name).mkdir()
            phases[name] = start(name, key, Path(tmp) / name, args, stack)
        results: dict[str, list[tuple[float, float]]] = {"open": [], "keyed": []}
        for index in range(args.pairs):
            for name in ("open", "keyed") if index % 2 == 0 else ("keyed", "open"):
                outcome: dict[str, Any] = run_async(run_phase(phases[name], settings))
                if outcome["errors"]:
                    raise RuntimeError(f"{name}: {outcome['errors']} errors: {outcome['error_kinds']}")
                results[name].append((outcome["requests_per_s"], outcome["cpu"]["gateway"]))
        return results


def report(results: dict[str, list[tuple[float, float]]], meta: dict[str, Any]) -> list[str]:
    pairs = list(zip(results["open"], results["keyed"], strict=True))
    ratio = statistics.median(keyed[0] / open_[0] for open_, keyed in pairs)
    per_cpu = statistics.median((keyed[0] / keyed[1]) / (open_[0] / open_[1]) for open_, keyed in pairs)
    mark = "PASS" if min(ratio, per_cpu) >= TARGET else "MISS"
    return [
        f"open  requests/s: {[round(rps) for rps, _ in results['open']]}",
        f"keyed requests/s: {[round(rps) for rps, _ in results['keyed']]}",
        f"median keyed/open requests/s: {ratio:.3f}; per second of gateway CPU: {per_cpu:.3f} "
        f"(target >= {TARGET}): {mark}",
        *run_lines(meta),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = run_meta(pairs=args.pairs, duration_s=args.duration, concurrency=args.concurrency)
    with terminate_on_sigterm():
        results = measure(args)
    meta["loadavg_after"] = [round(value, 2) for value in os.getloadavg()]
    print("\n".join(report(results, meta)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
