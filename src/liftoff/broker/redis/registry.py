"""The gateway's view of the shared reader registry in Redis, turned into broker events.

Every gateway polls ``liftoff:readers`` and the readers' hashes a few times a second and compares them with the
previous poll: a new registration, a reader that became live or dead, a new heartbeat, or a reader deleted through
another gateway becomes the same event the embedded broker would send. Heartbeat ages are measured on this
gateway's monotonic clock (when a heartbeat *changed*), so hosts' clocks need not agree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from liftoff.broker.base import BrokerEvents
from liftoff.broker.redis.common import ReaderEntry, reader_ids, reader_key
from liftoff.core.clock import monotonic
from liftoff.core.frames import MAX_QUIET_MS, LoadedFrame

logger = logging.getLogger(__name__)


@dataclass
class Seen:
    """What the last poll showed of one reader."""

    entry: ReaderEntry
    groups: tuple[str, ...]
    consumer_name: str
    heard: float = field(default_factory=monotonic)  # when its heartbeat last changed (this gateway's clock)
    quiet_until: float = 0.0  # the end of a silence it announced (HeartbeatFrame.quiet_ms)

    def silent_for(self, now: float) -> float:
        """Seconds since it was last heard from, not counting a silence it announced."""
        return now - max(self.heard, self.quiet_until)


async def snapshot(client: aioredis.Redis) -> dict[str, ReaderEntry]:
    """Every registered reader (two round trips)."""
    ids = await reader_ids(client)
    if not ids:
        return {}
    async with client.pipeline(transaction=False) as pipe:
        for reader_id in ids:
            pipe.hgetall(reader_key(reader_id))
        rows = await pipe.execute()
    entries = {}
    for reader_id, fields in zip(ids, rows, strict=True):
        entry = ReaderEntry.parse(fields)
        if entry is not None:
            entries[reader_id] = entry
    return entries


class RegistryMirror:
    """The readers this gateway has seen in Redis, and the events their changes make."""

    def __init__(self, on_gone: Callable[[str, str], None]) -> None:
        self.seen: dict[str, Seen] = {}
        self._on_gone = on_gone  # (reader_id, reason): the broker's handling of this gateway's requests

    def live(self, reader_id: str) -> bool:
        """Whether the reader is registered and live."""
        seen = self.seen.get(reader_id)
        return seen is not None and seen.entry.state == "live"

    def live_in(self, group: str) -> bool:
        """Whether any live reader serves ``group``."""
        return any(s.entry.state == "live" and group in s.groups for s in self.seen.values())

    def apply(self, entries: dict[str, ReaderEntry], events: BrokerEvents) -> None:
        """Compare a new snapshot with the last one and send the differences as events."""
        for reader_id, entry in entries.items():
            before = self.seen.get(reader_id)
            if before is None or before.entry.register != entry.register:
                self._registered(reader_id, entry, events)
            else:
                self._changed(reader_id, before, entry, events)
        for reader_id in [rid for rid in self.seen if rid not in entries]:
            seen = self.seen.pop(reader_id)
            if seen.entry.state != "dead":
                self._on_gone(reader_id, "the reader was deleted")
            events.on_reader_removed(reader_id)

    def forget(self) -> None:
        """Redis was lost: nothing seen is known any more (readers register again when it is back)."""
        self.seen.clear()

    def _registered(self, reader_id: str, entry: ReaderEntry, events: BrokerEvents) -> None:
        register = entry.register_frame()
        self.seen[reader_id] = Seen(entry, tuple(register.info.consumer_groups), register.info.consumer_name)
        events.on_reader_register(register)
        self._state_event(reader_id, entry, events)

    def _changed(self, reader_id: str, before: Seen, entry: ReaderEntry, events: BrokerEvents) -> None:
        old = before.entry
        before.entry = entry
        if entry.heartbeat != old.heartbeat:
            before.heard = monotonic()
            heartbeat = entry.heartbeat_frame()
            if heartbeat is not None and heartbeat.quiet_ms > 0:  # a long task announced: its silence is not death
                before.quiet_until = before.heard + min(heartbeat.quiet_ms, MAX_QUIET_MS) / 1000.0
            if heartbeat is not None:
                events.on_reader_heartbeat(reader_id, heartbeat)
        if entry.state != old.state:
            self._state_event(reader_id, entry, events)

    def _state_event(self, reader_id: str, entry: ReaderEntry, events: BrokerEvents) -> None:
        if entry.state == "live":
            loaded = entry.loaded_frame() or LoadedFrame(model_type="CAUSAL", capacity=1)
            events.on_reader_loaded(reader_id, loaded)
        elif entry.state == "dead":
            self._on_gone(reader_id, entry.error or "the reader is dead")
            if entry.why == "load_failed":
                events.on_reader_load_failed(reader_id, entry.error)
            else:
                events.on_reader_lost(reader_id, entry.error or "the reader is dead")
