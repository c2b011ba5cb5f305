"""``liftoff.management.prune``: readers this gateway did not start are forgotten when dead too long and dropped
when loading too long (stopped); its own readers stay until they are deleted."""

from __future__ import annotations

from liftoff.config.models import ReaderConfig
from liftoff.core.clock import now_ms
from liftoff.core.types import ReaderState
from liftoff.management.prune import PruneAfter, prune_once
from liftoff.management.registry import ReaderRecord, ReaderRegistry, info_for

AFTER = PruneAfter(dead_s=60, loading_s=600)


def record(registry: ReaderRegistry, reader_id: str, state: ReaderState, age_s: float, managed: bool = False) -> None:
    config = ReaderConfig(model_name="echo", device="cpu")
    entry = ReaderRecord(reader_id=reader_id, config=config, info=info_for(config), managed=managed)
    entry.set_state(state)
    entry.state_since_ms = now_ms() - int(age_s * 1000)
    registry.add(entry)


def test_dead_and_stuck_registrations_are_pruned_others_kept() -> None:
    registry = ReaderRegistry()
    record(registry, "dead-long", ReaderState.DEAD, 61)
    record(registry, "dead-recent", ReaderState.DEAD, 30)
    record(registry, "loading-long", ReaderState.LOADING, 601)
    record(registry, "loading-recent", ReaderState.LOADING, 10)
    record(registry, "live-long", ReaderState.LIVE, 10_000)
    record(registry, "ours-dead-long", ReaderState.DEAD, 10_000, managed=True)
    record(registry, "ours-loading-long", ReaderState.LOADING, 10_000, managed=True)
    forgotten: list[tuple[str, str]] = []
    stopped: list[tuple[str, str]] = []
    acted = prune_once(registry, AFTER, lambda *args: forgotten.append(args), lambda *args: stopped.append(args))
    assert acted == ["dead-long", "loading-long"]
    assert forgotten == [("dead-long", "dead for 61 s (dead_reader_retention_s)")]
    assert stopped == [("loading-long", "still loading after 601 s (reader_load_timeout_s)")]
    assert registry.records["loading-long"].state is ReaderState.DEAD  # then forgotten as a dead one
    assert registry.records["loading-long"].error == stopped[0][1]
