"""The reader registry: every reader the gateway knows, its state (loading, live, dead) and heartbeats.

It is fed by broker events (register, loaded, heartbeat, lost) and by the supervisor (spawned, exited), and it
answers the questions of the dispatcher (is a group live?) and of the management API (``/status``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from liftoff.config.loras import lora_names
from liftoff.config.models import ReaderConfig
from liftoff.core.clock import monotonic, now_ms
from liftoff.core.frames import HeartbeatFrame, LoadedFrame, RegisterFrame
from liftoff.core.types import ReaderInfo, ReaderState

logger = logging.getLogger(__name__)

MISSED_HEARTBEATS = 3


@dataclass
class ReaderRecord:
    """What the gateway knows about one reader."""

    reader_id: str
    config: ReaderConfig
    info: ReaderInfo
    state: ReaderState = ReaderState.LOADING
    managed: bool = False
    heartbeat_interval_ms: int = 1000
    last_heartbeat_ms: int = field(default_factory=now_ms)
    last_seen: float = field(default_factory=monotonic)
    progress: float = 0.0
    active: int = 0
    capacity: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    state_since_ms: int = field(default_factory=now_ms)
    stats: dict[str, float] = field(default_factory=dict)  # the reader's running totals (its last heartbeat's)
    unhealthy: bool = False  # dead only because it said it cannot serve (its upstream is down): it may come back
    lora_changed_at: float = 0.0  # when a change of its adapters was answered (heartbeats sent before may follow)

    def lora_change_fresh(self) -> bool:
        """Whether its adapters changed so recently that a heartbeat may still tell the ones before (under Redis a
        heartbeat and an answer travel apart): such heartbeats do not undo the change."""
        return monotonic() - self.lora_changed_at < 3 * self.heartbeat_interval_ms / 1000.0

    def set_state(self, state: ReaderState, error: str | None = None) -> None:
        """Move to ``state``; a dead reader keeps the reason."""
        self.state = state
        self.state_since_ms = now_ms()
        if error is not None:
            self.error = error
        if state is ReaderState.DEAD:
            self.info.pids = []

    def detail(self) -> dict[str, Any]:
        """The Liftoff-specific view of ``GET /reader/{id}``."""
        return {
            "reader_id": self.reader_id,
            "state": self.state.value,
            "error": self.error,
            "notes": list(self.notes),
            "managed": self.managed,
            "capacity": self.capacity,
            "active_requests": self.active,
            "loading_progress": self.progress,
            "last_heartbeat_ms": self.last_heartbeat_ms,
            "state_since_ms": self.state_since_ms,
            **_info_dict(self.info),
            "config": self.config.public_dict(),
        }


def _info_dict(info: ReaderInfo) -> dict[str, Any]:
    return _with_loras(info, {
        "consumer_groups": list(info.consumer_groups),
        "consumer_name": info.consumer_name,
        "device": info.device,
        "model_name": info.model_name,
        "model_type": info.model_type,
        "pids": list(info.pids),
    })  # fmt: skip


def _with_loras(info: ReaderInfo, shown: dict[str, Any]) -> dict[str, Any]:
    """``shown`` with the reader's ``loras`` (the newest ReaderInfo's optional field) when it has adapters."""
    if info.loras is not None:
        shown["loras"] = info.loras
    return shown


def info_for(config: ReaderConfig, consumer_name: str = "", pids: list[int] | None = None) -> ReaderInfo:
    """The initial ``ReaderInfo`` of a reader that has not registered yet."""
    return ReaderInfo(
        consumer_groups=list(config.consumer_group),
        consumer_name=consumer_name,
        device=config.device,
        model_name=config.model_name,
        model_type="CAUSAL",
        pids=list(pids or []),
        loras=lora_names(config.loras),
    )


class ReaderRegistry:
    """All readers by id, with change notification for long-polling health checks."""

    def __init__(self) -> None:
        self.records: dict[str, ReaderRecord] = {}
        self.closing = False
        self._live_types: dict[str, frozenset[str]] = {}  # group → live model types; cleared on every change
        self._changed = asyncio.Event()

    # ---- changes ------------------------------------------------------------------------------------------------

    def _touch(self) -> None:
        self._live_types.clear()
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, within_s: float) -> None:
        """Wait until any reader changes state, or ``within_s`` seconds."""
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), within_s)
        except TimeoutError:
            return

    def add(self, record: ReaderRecord) -> None:
        """Track a reader (replacing any record with the same id)."""
        self.records[record.reader_id] = record
        self._touch()

    def remove(self, reader_id: str) -> ReaderRecord | None:
        """Forget a reader."""
        record = self.records.pop(reader_id, None)
        self._touch()
        return record

    def get(self, reader_id: str) -> ReaderRecord | None:
        """The record of a reader, if known."""
        return self.records.get(reader_id)

    # ---- broker events ------------------------------------------------------------------------------------------

    def on_reader_register(self, frame: RegisterFrame) -> None:
        """A reader connected: create its record (headless) or attach to the one made at spawn time."""
        record = self.records.get(frame.reader_id)
        if record is None:
            config = ReaderConfig.model_validate(_config_from_wire(frame.config))
            record = ReaderRecord(reader_id=frame.reader_id, config=config, info=frame.info)
            self.records[frame.reader_id] = record
            logger.info("reader %s registered from %s", frame.reader_id, frame.info.consumer_name)
        record.info = frame.info
        record.heartbeat_interval_ms = frame.heartbeat_interval_ms
        record.last_heartbeat_ms = now_ms()
        record.last_seen = monotonic()
        record.error = None
        record.unhealthy = False
        if record.state is not ReaderState.LOADING:
            record.set_state(ReaderState.LOADING)
        self._touch()

    def on_reader_loaded(self, reader_id: str, frame: LoadedFrame) -> None:
        """The reader is live."""
        record = self.records.get(reader_id)
        if record is None:
            return
        record.info.model_type = frame.model_type
        record.capacity = frame.capacity
        record.notes = list(frame.notes)
        record.progress = 1.0
        record.set_state(ReaderState.LIVE)
        logger.info("reader %s is live (%s, capacity %d)", reader_id, record.info.model_name, frame.capacity)
        self._touch()

    def on_reader_load_failed(self, reader_id: str, reason: str) -> None:
        """The reader's model failed to load: it is dead, with that reason (the best account of its death, even if
        its process's exit was heard first)."""
        self.set_dead(reader_id, f"model failed to load: {reason}")

    def on_reader_heartbeat(self, reader_id: str, frame: HeartbeatFrame) -> None:
        """Record a heartbeat."""
        record = self.records.get(reader_id)
        if record is not None:
            record.last_heartbeat_ms = frame.timestamp_ms
            record.last_seen = monotonic()
            record.active = frame.active
            if frame.stats:
                record.stats = frame.stats
            if frame.progress >= 0:
                record.progress = frame.progress
            if (
                frame.loras is not None
                and (frame.loras or None) != record.info.loras
                and not record.lora_change_fresh()
            ):
                self.set_loras(reader_id, frame.loras.split(",") if frame.loras else [], changed=False)
            self._on_health(record, frame.unhealthy)

    def _on_health(self, record: ReaderRecord, unhealthy: str) -> None:
        """A live reader that says it cannot serve goes to ``dead_readers`` with the reason (so routing, health
        checks and /status see it), and back to ``live_readers`` when it says it can again."""
        if unhealthy and record.state is ReaderState.LIVE:
            logger.warning("reader %s cannot serve: %s", record.reader_id, unhealthy)
            record.unhealthy = True
            record.set_state(ReaderState.DEAD, error=f"unhealthy: {unhealthy}")
            self._touch()
        elif not unhealthy and record.unhealthy and record.state is ReaderState.DEAD:
            logger.info("reader %s can serve again", record.reader_id)
            record.unhealthy = False
            record.error = None
            record.set_state(ReaderState.LIVE)
            self._touch()

    def set_loras(self, reader_id: str, names: list[str], *, changed: bool = True) -> None:
        """The reader's LoRA adapters are ``names``: it answered a change (POST or DELETE /reader/{id}/loras), or
        its heartbeat says so (``changed`` False: the heartbeats catch up with a change another gateway made, or
        one whose answer came too late)."""
        record = self.records.get(reader_id)
        if record is not None:
            record.info.loras = ",".join(names) or None
            if changed:
                record.lora_changed_at = monotonic()
            self._touch()

    def on_reader_lost(self, reader_id: str, reason: str) -> None:
        """The reader's link is gone."""
        self.mark_dead(reader_id, reason)

    def mark_dead(self, reader_id: str, reason: str) -> None:
        """Move a reader to ``dead_readers`` (keeping the first reason)."""
        record = self.records.get(reader_id)
        if record is None or (record.state is ReaderState.DEAD and not record.unhealthy):
            return
        record.unhealthy = False  # dead for good now: no heartbeat brings it back
        log = logger.info if self.closing else logger.warning
        log("reader %s is dead: %s", reader_id, reason)
        record.set_state(ReaderState.DEAD, error=reason)
        self._touch()

    def set_dead(self, reader_id: str, reason: str) -> None:
        """Make a reader dead with ``reason``, replacing an earlier one (a fuller account: its process's exit, the
        restart that is due, the crash loop that ended the restarts)."""
        record = self.records.get(reader_id)
        if record is None:
            return
        self.mark_dead(reader_id, reason)
        record.error = reason
        self._touch()

    def restarting(self, reader_id: str) -> None:
        """The gateway starts the reader's process again: it is loading, from scratch."""
        record = self.records.get(reader_id)
        if record is None:
            return
        record.info.pids = []
        record.capacity = record.active = 0
        record.progress = 0.0
        record.notes = []
        record.stats = {}
        record.last_seen = monotonic()  # it has its heartbeats' worth of time to register
        record.last_heartbeat_ms = now_ms()
        record.error = None
        record.set_state(ReaderState.LOADING)
        self._touch()

    # ---- liveness -----------------------------------------------------------------------------------------------

    def overdue(self, now: float) -> list[tuple[str, float]]:
        """Readers (not dead) whose last heartbeat is older than ``MISSED_HEARTBEATS`` periods."""
        late = []
        for record in self.records.values():
            if record.state is ReaderState.DEAD:
                continue
            silent = now - record.last_seen
            if silent > MISSED_HEARTBEATS * record.heartbeat_interval_ms / 1000.0:
                late.append((record.reader_id, silent))
        return late

    # ---- queries ------------------------------------------------------------------------------------------------

    def has_live(self, group: str) -> bool:
        """Whether any live reader serves ``group``."""
        return bool(self.live_model_types(group))

    def live_model_types(self, group: str) -> frozenset[str]:
        """The ``model_type`` of every live reader of ``group`` (cached until a reader changes)."""
        types = self._live_types.get(group)
        if types is None:
            types = self._live_types[group] = frozenset(
                r.info.model_type
                for r in self.records.values()
                if r.state is ReaderState.LIVE and group in r.info.consumer_groups
            )
        return types

    def buffering(self, group: str) -> bool:
        """Whether a reader of ``group`` has ``buffer_requests``: the group then keeps requests while no reader
        of it is live, as a reserved group does."""
        return any(r.config.buffer_requests and group in r.info.consumer_groups for r in self.records.values())

    def knows(self, group: str) -> bool:
        """Whether any reader (in any state) serves ``group``."""
        return any(group in r.info.consumer_groups for r in self.records.values())

    def live_loras(self, group: str) -> list[str]:
        """The LoRA adapter names of the live readers of ``group``, sorted."""
        names = {
            name
            for r in self.records.values()
            if r.state is ReaderState.LIVE and group in r.info.consumer_groups and r.info.loras
            for name in r.info.loras.split(",")
        }
        return sorted(names)

    def groups(self) -> list[str]:
        """Every consumer group any reader serves."""
        return sorted({g for r in self.records.values() for g in r.info.consumer_groups})

    def count(self, state: ReaderState) -> int:
        """Number of readers in ``state``."""
        return sum(1 for r in self.records.values() if r.state is state)

    def status(self, reserved: list[str]) -> dict[str, Any]:
        """The ``status`` object of the management ``/status`` (takeoff-spec §2.2.1)."""
        by_state: dict[ReaderState, dict[str, Any]] = {state: {} for state in ReaderState}
        heartbeats = {}
        for record in self.records.values():
            by_state[record.state][record.reader_id] = _info_dict(record.info)
            heartbeats[record.reader_id] = {
                "heartbeat_timestamp": int(record.last_heartbeat_ms),
                "heartbeat_wait_interval": int(record.heartbeat_interval_ms),
            }
        return {
            "dead_readers": by_state[ReaderState.DEAD],
            "last_heartbeat": heartbeats,
            "live_readers": by_state[ReaderState.LIVE],
            "loading_readers": by_state[ReaderState.LOADING],
            "reserved_consumers": list(reserved),
        }

    def masked_status(self) -> dict[str, dict[str, Any]]:
        """``live_readers`` and ``dead_readers`` without pids or consumer names (inference ``/status``)."""
        masked: dict[str, dict[str, Any]] = {"live_readers": {}, "dead_readers": {}}
        for record in self.records.values():
            key = {ReaderState.LIVE: "live_readers", ReaderState.DEAD: "dead_readers"}.get(record.state)
            if key is not None:
                masked[key][record.reader_id] = _with_loras(record.info, {
                    "consumer_groups": list(record.info.consumer_groups),
                    "device": record.info.device,
                    "model_name": record.info.model_name,
                    "model_type": record.info.model_type,
                })  # fmt: skip
        return masked

    def reader_groups(self) -> dict[str, list[dict[str, Any]]]:
        """``GET /reader_groups``: group → readers (loading and live), with ``ready`` for live ones."""
        groups: dict[str, list[dict[str, Any]]] = {}
        for record in self.records.values():
            if record.state is ReaderState.DEAD:
                continue
            entry = _with_loras(record.info, {
                "reader_id": record.reader_id,
                "device": record.info.device,
                "model_name": record.info.model_name,
                "model_type": record.info.model_type,
                "pids": list(record.info.pids),
                "ready": record.state is ReaderState.LIVE,
            })  # fmt: skip
            for group in record.info.consumer_groups:
                groups.setdefault(group, []).append(dict(entry))
        return groups


def _config_from_wire(config: dict[str, Any]) -> dict[str, Any]:
    data = dict(config)
    if data.get("access_token") == "***":
        data.pop("access_token")
    return data
