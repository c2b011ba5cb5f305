"""Time helpers: wall-clock milliseconds for wire timestamps, monotonic seconds for deadlines."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Unix epoch time in whole milliseconds."""
    return time.time_ns() // 1_000_000


def monotonic() -> float:
    """Monotonic seconds, for measuring intervals and local deadlines."""
    return time.monotonic()
