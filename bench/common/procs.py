"""The processes a bench starts, and the CPU they use.

A bench must never leave a server behind, even when it is interrupted or killed: every server runs in its own
session (Ctrl-C reaches the bench only, which then stops them in order), gets SIGTERM if the bench dies
(``die_with_parent``), and is stopped by ``Managed.stop``, which also ends any reader it leaves behind.
``terminate_on_sigterm`` makes SIGTERM take the same path as Ctrl-C. The CPU accounting reads ``/proc``, to
report where the time of a measurement window went and how much of the machine someone else used.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from common.log import log

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when this script dies (even by SIGKILL).

    A ``preexec_fn`` for every server and child process a bench starts, so that none outlives a bench that was
    killed before it could stop them."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Managed:
    """One server process this script started; :meth:`stop` ends it and any child it leaves behind."""

    def __init__(self, name: str, command: list[str], cwd: Path, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.children: set[int] = set()
        self.exit_code: int | None = None
        self.stop_s = 0.0
        self.leftovers: list[int] = []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log_path.open("ab") as out:
            self.process = subprocess.Popen(  # its own session: Ctrl-C reaches this script only
                command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True,
                preexec_fn=die_with_parent,
            )  # fmt: skip
        log(f"started {name} (pid {self.process.pid}): {shlex.join(command)}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")

    def track_children(self) -> list[int]:
        """Remember the current children (readers), to check that they end with their parent."""
        kids = children_of(self.pid)
        self.children.update(kids)
        return kids

    def stop(self, timeout: float = 40.0) -> None:
        """SIGTERM, wait, SIGKILL if needed; then SIGKILL any remembered child still running."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.track_children()
            started = time.monotonic()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {timeout:.0f} s of SIGTERM: SIGKILL")
                self.process.kill()
                self.process.wait()
            self.stop_s = time.monotonic() - started
        self.exit_code = self.process.returncode
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in self.children) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.leftovers = [pid for pid in self.children if alive(pid)]
        for pid in self.leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log(f"stopped {self.name}: exit code {self.exit_code} after {self.stop_s:.1f} s; leftovers {self.leftovers}")

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def log_problems(self) -> list[str]:
        """Log lines at WARNING or above, and tracebacks."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        marks = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")
        return [line for line in text.splitlines() if any(mark in line for mark in marks)]


def wait_for(server: Managed, ready: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``ready`` until true; fail if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.check_running()
        with contextlib.suppress(OSError, ValueError):
            if ready():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} was not ready within {timeout:.0f} s:\n{server.log_tail()}")


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM ends the script like Ctrl-C does, so that the servers are stopped."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- CPU accounting ----------------------------------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (0 if it is gone)."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    values = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS


def cpu_snapshot(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each group of pids, of the whole machine (``machine``), and the clock (``wall``):
    two snapshots make a window for :func:`cpu_usage`."""
    snapshot = {name: sum(process_cpu_s(pid) for pid in pids) for name, pids in groups.items()}
    snapshot["machine"] = machine_busy_s()
    snapshot["wall"] = time.monotonic()
    return snapshot


def cpu_usage(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Percent of one core used by each group over the window; ``other`` is the rest of the machine's load."""
    wall = max(after["wall"] - before["wall"], 1e-9)
    used = {name: (after[name] - before[name]) / wall * 100 for name in before if name not in ("wall", "machine")}
    used["other"] = max(0.0, (after["machine"] - before["machine"]) / wall * 100 - sum(used.values()))
    return used
