"""``liftoff.management.heartbeats``: the sweep declares overdue readers dead and evicts them, once."""

from __future__ import annotations

import asyncio
import contextlib

from liftoff.config.models import ReaderConfig
from liftoff.core.clock import monotonic
from liftoff.core.types import ReaderState
from liftoff.management.heartbeats import sweep_forever, sweep_once
from liftoff.management.registry import MISSED_HEARTBEATS, ReaderRecord, ReaderRegistry, info_for


def registry_with(*reader_ids: str) -> ReaderRegistry:
    registry = ReaderRegistry()
    config = ReaderConfig(model_name="echo", device="cpu")
    for reader_id in reader_ids:
        registry.add(
            ReaderRecord(reader_id=reader_id, config=config, info=info_for(config), heartbeat_interval_ms=1000)
        )
    return registry


def test_sweep_evicts_only_overdue_readers() -> None:
    registry = registry_with("late", "fine")
    registry.records["late"].last_seen = monotonic() - 10
    evicted: list[tuple[str, str]] = []
    assert sweep_once(registry, lambda reader_id, reason: evicted.append((reader_id, reason))) == ["late"]
    ((reader_id, reason),) = evicted
    assert reader_id == "late"
    assert f"({MISSED_HEARTBEATS} missed)" in reason
    assert reason.startswith("no heartbeat for 10.")
    assert registry.records["late"].state is ReaderState.DEAD
    assert registry.records["late"].error == reason
    assert registry.records["fine"].state is ReaderState.LOADING


def test_sweep_does_not_evict_twice() -> None:
    registry = registry_with("late")
    registry.records["late"].last_seen = monotonic() - 10
    evicted: list[str] = []
    sweep_once(registry, lambda reader_id, _: evicted.append(reader_id))
    assert sweep_once(registry, lambda reader_id, _: evicted.append(reader_id)) == []
    assert evicted == ["late"]


def test_sweep_with_nothing_overdue() -> None:
    registry = registry_with("a", "b")
    evicted: list[str] = []
    assert sweep_once(registry, lambda reader_id, _: evicted.append(reader_id)) == []
    assert evicted == []


async def test_sweep_forever_with_zero_interval_never_checks() -> None:
    registry = registry_with("late")
    registry.records["late"].last_seen = monotonic() - 10
    evicted: list[str] = []
    await asyncio.wait_for(sweep_forever(registry, 0, lambda reader_id, _: evicted.append(reader_id)), 1)
    assert evicted == []


async def test_sweep_forever_sweeps_periodically() -> None:
    registry = registry_with("late")
    registry.records["late"].last_seen = monotonic() - 10
    evicted: list[str] = []
    task = asyncio.create_task(sweep_forever(registry, 0.01, lambda reader_id, _: evicted.append(reader_id)))
    try:
        for _ in range(200):
            if evicted:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert evicted == ["late"]
