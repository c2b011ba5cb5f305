"""Pruning: readers this gateway did not start (headless ones, or another gateway's on a shared broker) are
forgotten when they have been dead for ``dead_reader_retention_s``, and stopped when they are still loading after
``reader_load_timeout_s`` (a stop, not a mere disconnect, which a headless reader would answer by registering
again at once: it exits, and whatever runs it decides whether it starts again).

Without this, every registration that ever happened would stay in ``/status`` and in memory: a reader that was
killed, or one that connected and never loaded. The readers this gateway started stay until they are deleted, as
in Takeoff: there are at most ``max_readers`` of them, and their record says why they died.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from liftoff.core.clock import now_ms
from liftoff.core.types import ReaderState
from liftoff.management.registry import ReaderRegistry

logger = logging.getLogger(__name__)

PRUNE_EVERY_S = 5.0


@dataclass(frozen=True)
class PruneAfter:
    """How long a reader this gateway did not start may stay dead, or loading."""

    dead_s: float
    loading_s: float


def prune_once(registry: ReaderRegistry, after: PruneAfter, forget: Callable[[str, str], None],
               stop: Callable[[str, str], None], now: int | None = None) -> list[str]:  # fmt: skip
    """Forget readers dead too long and stop those loading too long; return the ids acted on."""
    now = now_ms() if now is None else now
    acted = []
    for record in list(registry.records.values()):
        if record.managed:
            continue
        age_s = (now - record.state_since_ms) / 1000.0
        if record.state is ReaderState.DEAD and age_s > after.dead_s:
            forget(record.reader_id, f"dead for {age_s:.0f} s (dead_reader_retention_s)")
            acted.append(record.reader_id)
        elif record.state is ReaderState.LOADING and age_s > after.loading_s:
            reason = f"still loading after {age_s:.0f} s (reader_load_timeout_s)"
            registry.mark_dead(record.reader_id, reason)
            stop(record.reader_id, reason)
            acted.append(record.reader_id)
    return acted


async def prune_forever(registry: ReaderRegistry, after: PruneAfter, forget: Callable[[str, str], None],
                        stop: Callable[[str, str], None]) -> None:  # fmt: skip
    """Run :func:`prune_once` every few seconds until cancelled."""
    while True:
        await asyncio.sleep(min(PRUNE_EVERY_S, after.dead_s, after.loading_s))
        prune_once(registry, after, forget, stop)
