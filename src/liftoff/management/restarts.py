"""Restart bookkeeping of one reader the gateway started: its ``restart_policy``, the exponential backoff between
restarts and the crash-loop limit.

It does no I/O and takes the clock as an argument, so the rules are tested alone; the reader manager acts on its
answers (spawns the process again, or leaves the reader dead with the verdict as its reason).

Rules: a failure (a non-zero exit, a death by signal, or a process the gateway stopped because it declared the
reader dead) is restarted unless the policy is ``never``; a clean exit (code 0) only with ``always``; a model that
failed to load never (a wrong path or a bad file fails the same way again). The n-th restart within
``window_s`` waits ``first_delay_s * 2**(n-1)`` (at most ``max_delay_s``); when ``max_restarts`` restarts already
happened within the window, the reader is in a crash loop and stays dead. A reader that stayed live for
``stable_s`` before failing starts counting afresh.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from liftoff.core.exits import EXIT_CLEAN, EXIT_LOAD_FAILED

RestartPolicy = Literal["always", "on-failure", "never"]


@dataclass(frozen=True)
class RestartLimits:
    """How often and how soon readers are restarted (``reader_max_restarts``, ``reader_restart_window_s``)."""

    max_restarts: int = 5
    window_s: float = 600.0
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    stable_s: float = 60.0  # live this long before a failure: the earlier restarts are forgiven


class Phase(enum.Enum):
    """Where a supervised reader is in its life, as far as restarts go."""

    STARTING = "starting"  # its process was (re)started; not live yet
    LIVE = "live"
    LOST = "lost"  # its link is gone or it was declared dead; its process has not exited yet
    WAITING = "waiting"  # its process exited; a restart is due
    DOWN = "down"  # it stays dead (policy, crash loop, load failure, deleted)


class RestartBook:
    """The restart history and the next decision of one reader."""

    def __init__(self, policy: RestartPolicy, limits: RestartLimits) -> None:
        self.policy = policy
        self.limits = limits
        self.phase = Phase.STARTING
        self.restarts = 0  # every restart since the reader was created (the metric)
        self.last_exit: str | None = None  # the last exit in words, with why the gateway thought it died
        self.verdict: str | None = None  # why it stays dead (phase DOWN)
        self.due: float | None = None  # monotonic time of the next restart (phase WAITING)
        self.declared_dead = False  # the gateway stopped this process because it declared the reader dead
        self._recent: deque[float] = deque()  # monotonic times of the restarts that count towards the limit
        self._live_since: float | None = None

    # ---- events ------------------------------------------------------------------------------------------------

    def went_live(self, now: float) -> None:
        """The reader finished loading."""
        self.phase = Phase.LIVE
        self._live_since = now

    def lost(self) -> None:
        """The reader's link is gone (or it was declared dead); its process's exit decides what happens next."""
        if self.phase in (Phase.STARTING, Phase.LIVE):
            self.phase = Phase.LOST

    def exited(self, code: int, account: str, now: float) -> float | None:
        """The process exited (``account``: the exit in words). Seconds until the restart, or None: the reader
        stays dead, and ``verdict`` says why."""
        self.last_exit = account
        self.due = None
        failure = code != EXIT_CLEAN or self.declared_dead
        self.declared_dead = False
        stable = self._live_since is not None and now - self._live_since >= self.limits.stable_s
        self._live_since = None
        verdict = self._verdict(code, failure, account)
        if verdict is None:
            if stable:
                self._recent.clear()
            while self._recent and self._recent[0] <= now - self.limits.window_s:
                self._recent.popleft()
            if len(self._recent) >= self.limits.max_restarts:
                verdict = self._crash_loop(account)
        if verdict is not None:
            self.give_up(verdict)
            return None
        delay = min(self.limits.max_delay_s, self.limits.first_delay_s * 2.0 ** len(self._recent))
        self.phase = Phase.WAITING
        self.due = now + delay
        return delay

    def _verdict(self, code: int, failure: bool, account: str) -> str | None:
        """Why an exit is not restarted whatever the count (the policy, a load failure); None if it may be."""
        if code == EXIT_LOAD_FAILED:
            return f"{account} (not restarted: a model that fails to load would fail again)"
        if self.policy == "never" or (not failure and self.policy != "always"):
            return f"{account} (not restarted: restart_policy is {self.policy})"
        return None

    def _crash_loop(self, account: str) -> str:
        limits = self.limits
        if limits.max_restarts == 0:
            return f"{account} (not restarted: reader_max_restarts is 0)"
        return (f"crash loop: restarted {len(self._recent)} times within {limits.window_s:g} s "
                f"(reader_max_restarts); last failure: {account}")  # fmt: skip

    def restarted(self, now: float) -> None:
        """The process was started again."""
        self.restarts += 1
        self._recent.append(now)
        self.phase = Phase.STARTING
        self.due = None

    def give_up(self, verdict: str) -> None:
        """The reader stays dead, because ``verdict``."""
        self.phase = Phase.DOWN
        self.verdict = verdict
        self.due = None

    # ---- questions ---------------------------------------------------------------------------------------------

    def holds(self) -> bool:
        """Whether the reader's groups should keep their waiting requests: it is live, or on its way back (a
        restart is pending or loading). Not while it loads for the first time, nor once it stays dead."""
        if self.policy == "never" or self.phase is Phase.DOWN:
            return False
        return self.phase is not Phase.STARTING or self.restarts > 0

    def view(self, now: float, now_ms: int) -> dict[str, Any]:
        """The restart fields of ``GET /reader/{id}``; ``next_restart_ms`` is Unix epoch milliseconds."""
        due = None if self.due is None else now_ms + round(max(0.0, self.due - now) * 1000)
        return {"restart_policy": self.policy, "restarts": self.restarts, "last_exit": self.last_exit,
                "next_restart_ms": due}  # fmt: skip
