"""What every bench report says about its run, and the report pieces several benches print.

A figure means little without the command that produced it, the date, the machine and how loaded it was before
and after (docs/benchmarks.md quotes reports unedited), so every bench records :func:`run_meta` at its start and
prints :func:`run_lines` in its report. The cells (``num``, ``mark``) and the CPU and error tables are shared so
that the gateway benches' reports read alike.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any


def run_lines(meta: dict[str, Any]) -> list[str]:
    """The command, date and machine of a run (``meta`` with ``machine_info()`` as ``machine``), as report lines."""
    machine = meta["machine"]
    return [
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}",
        f"- Machine: {machine['nproc']} CPUs ({machine['cpu']}), Python {machine['python']}, Linux "
        f"{machine['kernel']}; load average before {machine['loadavg']}, after {meta['loadavg_after']}",
    ]


def run_meta(**fields: Any) -> dict[str, Any]:
    """The command, date and machine of a run (what :func:`run_lines` shows), and the bench's own ``fields``."""
    return {
        "command": shlex.join(sys.orig_argv),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        **fields,
    }


def machine_info() -> dict[str, Any]:
    """CPUs this process may use, their model, Python, kernel and the load average now: what makes figures of
    different runs comparable, or not."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg": [round(value, 2) for value in os.getloadavg()],
    }


def num(value: float | None, digits: int = 0) -> str:
    """A figure with thousands separators, or ``n/a`` for a figure that could not be measured."""
    return "n/a" if value is None else f"{value:,.{digits}f}"


def mark(ok: bool) -> str:
    """A target's verdict: a missed target is reported, not an error (short runs on a shared machine are noisy)."""
    return "PASS" if ok else "MISS"


def cpu_table(results: dict[str, dict[str, Any]], columns: tuple[tuple[str, str], ...]) -> list[str]:
    """One row per phase, one column per process group (``columns``: key in the phase's ``cpu``, heading)."""
    rows = [
        "| Phase | " + " | ".join(heading for _, heading in columns) + " |",
        "|---|" + "--:|" * len(columns),
    ]
    for key, result in results.items():
        cpu = result["cpu"]
        cells = [cpu.get(name) for name, _ in columns]
        rows.append(f"| {key} | " + " | ".join("—" if c is None else f"{c:.0f} %" for c in cells) + " |")
    return rows


def error_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """The kinds of errors of each phase, during the warm-up and in the measurement window."""
    return [
        f"- {key} {name.replace('_', ' ')}: {result[name]}"
        for name in ("warmup_errors", "error_kinds")
        for key, result in results.items()
        if result[name]
    ]
