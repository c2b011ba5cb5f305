"""The heartbeat sweep: every ``heartbeat_check_interval`` seconds, readers that missed their heartbeats are
declared dead and evicted from the broker (their unstarted requests go to other readers)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from liftoff.core.clock import monotonic
from liftoff.management.registry import MISSED_HEARTBEATS, ReaderRegistry

logger = logging.getLogger(__name__)

Evict = Callable[[str, str], None]


async def sweep_forever(registry: ReaderRegistry, interval_s: float, evict: Evict) -> None:
    """Run the sweep until cancelled; ``interval_s`` of 0 means never check (Takeoff's semantics)."""
    if interval_s <= 0:
        return
    while True:
        await asyncio.sleep(interval_s)
        sweep_once(registry, evict)


def sweep_once(registry: ReaderRegistry, evict: Evict) -> list[str]:
    """Declare overdue readers dead; return their ids."""
    dead = []
    for reader_id, silent in registry.overdue(monotonic()):
        reason = f"no heartbeat for {silent:.1f} s ({MISSED_HEARTBEATS} missed)"
        registry.mark_dead(reader_id, reason)
        evict(reader_id, reason)
        dead.append(reader_id)
    return dead
