"""``liftoff.management.registry.ReaderRegistry``: states, heartbeats, and the status views built from them."""

from __future__ import annotations

import asyncio

import pytest

from liftoff.config.models import ReaderConfig
from liftoff.core.clock import monotonic
from liftoff.core.frames import HeartbeatFrame, LoadedFrame, RegisterFrame
from liftoff.core.types import ReaderState
from liftoff.management.registry import MISSED_HEARTBEATS, ReaderRecord, ReaderRegistry, info_for

INFO_KEYS = {"consumer_groups", "consumer_name", "device", "model_name", "model_type", "pids"}


def config(groups: str = "primary", **fields: object) -> ReaderConfig:
    return ReaderConfig.model_validate({"model_name": "echo", "device": "cpu", "consumer_group": groups, **fields})


def register_frame(reader_id: str, groups: str = "primary", interval_ms: int = 1000, **fields: object) -> RegisterFrame:
    cfg = config(groups, **fields)
    return RegisterFrame(
        reader_id=reader_id,
        info=info_for(cfg, consumer_name=f"{reader_id}@host:1", pids=[1234]),
        config=cfg.public_dict(),
        heartbeat_interval_ms=interval_ms,
    )


def loaded(capacity: int = 4, notes: list[str] | None = None) -> LoadedFrame:
    return LoadedFrame(model_type="CAUSAL", capacity=capacity, notes=notes or [])


@pytest.fixture
def registry() -> ReaderRegistry:
    return ReaderRegistry()


def live_reader(registry: ReaderRegistry, reader_id: str, groups: str = "primary") -> None:
    registry.on_reader_register(register_frame(reader_id, groups))
    registry.on_reader_loaded(reader_id, loaded())


# ---- states -------------------------------------------------------------------------------------------------------


def test_register_creates_a_loading_record(registry: ReaderRegistry) -> None:
    registry.on_reader_register(register_frame("r1", "a,b", interval_ms=250, access_token="secret"))
    record = registry.get("r1")
    assert record is not None
    assert record.state is ReaderState.LOADING
    assert record.heartbeat_interval_ms == 250
    assert record.info.consumer_groups == ["a", "b"]
    assert record.config.consumer_group == ["a", "b"]
    assert record.config.access_token is None  # the masked '***' is not taken as a token
    assert registry.count(ReaderState.LOADING) == 1


def test_loaded_makes_a_reader_live(registry: ReaderRegistry) -> None:
    registry.on_reader_register(register_frame("r1"))
    registry.on_reader_loaded("r1", LoadedFrame(model_type="EMBEDDING", capacity=6, notes=["n1"]))
    record = registry.get("r1")
    assert record is not None
    assert record.state is ReaderState.LIVE
    assert record.capacity == 6
    assert record.notes == ["n1"]
    assert record.info.model_type == "EMBEDDING"
    assert record.progress == 1.0
    assert registry.has_live("primary")


def test_load_failure_makes_a_reader_dead_with_reason(registry: ReaderRegistry) -> None:
    registry.on_reader_register(register_frame("r1"))
    registry.on_reader_load_failed("r1", "out of memory")
    record = registry.get("r1")
    assert record is not None
    assert record.state is ReaderState.DEAD
    assert record.error == "model failed to load: out of memory"
    assert record.info.pids == []
    assert not registry.has_live("primary")


def test_lost_reader_is_dead_and_keeps_the_first_reason(registry: ReaderRegistry) -> None:
    live_reader(registry, "r1")
    registry.on_reader_lost("r1", "connection closed")
    registry.on_reader_lost("r1", "second reason")
    record = registry.get("r1")
    assert record is not None
    assert record.state is ReaderState.DEAD
    assert record.error == "connection closed"


def test_reregistering_a_dead_reader_makes_it_loading_again(registry: ReaderRegistry) -> None:
    live_reader(registry, "r1")
    registry.on_reader_lost("r1", "gone")
    registry.on_reader_register(register_frame("r1"))
    record = registry.get("r1")
    assert record is not None
    assert record.state is ReaderState.LOADING
    assert record.error is None
    assert record.info.pids == [1234]


def test_register_attaches_to_a_record_made_at_spawn(registry: ReaderRegistry) -> None:
    spawned = ReaderRecord(reader_id="r1", config=config("x"), info=info_for(config("x")), managed=True)
    registry.add(spawned)
    registry.on_reader_register(register_frame("r1", "x"))
    assert registry.get("r1") is spawned
    assert spawned.managed
    assert spawned.info.consumer_name == "r1@host:1"


def test_events_for_unknown_readers_are_ignored(registry: ReaderRegistry) -> None:
    registry.on_reader_loaded("ghost", loaded())
    registry.on_reader_lost("ghost", "x")
    registry.on_reader_heartbeat("ghost", HeartbeatFrame(timestamp_ms=1))
    assert registry.records == {}


def test_heartbeat_updates_the_record(registry: ReaderRegistry) -> None:
    registry.on_reader_register(register_frame("r1"))
    record = registry.get("r1")
    assert record is not None
    record.last_seen = monotonic() - 100
    registry.on_reader_heartbeat("r1", HeartbeatFrame(timestamp_ms=1_700_000_000_000, active=2, progress=0.4))
    assert record.last_heartbeat_ms == 1_700_000_000_000
    assert record.active == 2
    assert record.progress == 0.4
    assert monotonic() - record.last_seen < 5
    registry.on_reader_heartbeat("r1", HeartbeatFrame(timestamp_ms=1_700_000_000_001))
    assert record.progress == 0.4  # a negative progress means "not reported"


def test_an_unhealthy_reader_is_dead_until_it_says_it_can_serve(registry: ReaderRegistry) -> None:
    live_reader(registry, "r1")
    registry.on_reader_heartbeat("r1", HeartbeatFrame(timestamp_ms=1, unhealthy="upstream down: ConnectError"))
    record = registry.get("r1")
    assert record is not None
    assert record.state is ReaderState.DEAD
    assert record.error == "unhealthy: upstream down: ConnectError"
    assert not registry.has_live("primary")
    assert "r1" in registry.status([])["dead_readers"]
    registry.on_reader_heartbeat("r1", HeartbeatFrame(timestamp_ms=2))
    assert record.state is ReaderState.LIVE
    assert record.error is None
    assert registry.has_live("primary")


def test_a_reader_that_dies_while_unhealthy_stays_dead(registry: ReaderRegistry) -> None:
    live_reader(registry, "r1")
    registry.on_reader_heartbeat("r1", HeartbeatFrame(timestamp_ms=1, unhealthy="upstream down"))
    registry.on_reader_lost("r1", "the reader disconnected")
    record = registry.get("r1")
    assert record is not None
    assert record.error == "the reader disconnected"
    registry.on_reader_heartbeat("r1", HeartbeatFrame(timestamp_ms=2))  # a late heartbeat does not revive it
    assert record.state is ReaderState.DEAD


def test_remove(registry: ReaderRegistry) -> None:
    live_reader(registry, "r1")
    removed = registry.remove("r1")
    assert removed is not None
    assert removed.reader_id == "r1"
    assert registry.get("r1") is None
    assert registry.remove("r1") is None


# ---- liveness -------------------------------------------------------------------------------------------------------


def test_overdue_after_missed_heartbeats(registry: ReaderRegistry) -> None:
    registry.on_reader_register(register_frame("slow", interval_ms=1000))
    registry.on_reader_register(register_frame("fresh", interval_ms=1000))
    registry.on_reader_register(register_frame("fast", interval_ms=100))
    now = monotonic()
    registry.records["slow"].last_seen = now - MISSED_HEARTBEATS * 1.0 - 0.5
    registry.records["fresh"].last_seen = now - MISSED_HEARTBEATS * 1.0 + 0.5
    registry.records["fast"].last_seen = now - 0.5  # 5 periods of 100 ms
    overdue = dict(registry.overdue(now))
    assert set(overdue) == {"slow", "fast"}
    assert overdue["slow"] == pytest.approx(MISSED_HEARTBEATS + 0.5)


def test_dead_readers_are_never_overdue(registry: ReaderRegistry) -> None:
    registry.on_reader_register(register_frame("r1"))
    registry.records["r1"].last_seen = monotonic() - 1000
    registry.mark_dead("r1", "gone")
    assert registry.overdue(monotonic()) == []


# ---- views ----------------------------------------------------------------------------------------------------------


def test_status_shape(registry: ReaderRegistry) -> None:
    live_reader(registry, "live1", "a")
    registry.on_reader_register(register_frame("loading1", "b"))
    live_reader(registry, "dead1", "c")
    registry.on_reader_lost("dead1", "gone")
    status = registry.status(["primary", "a"])
    assert set(status) == {"dead_readers", "last_heartbeat", "live_readers", "loading_readers", "reserved_consumers"}
    assert list(status["live_readers"]) == ["live1"]
    assert list(status["loading_readers"]) == ["loading1"]
    assert list(status["dead_readers"]) == ["dead1"]
    assert status["reserved_consumers"] == ["primary", "a"]
    info = status["live_readers"]["live1"]
    assert set(info) == INFO_KEYS
    assert info["consumer_groups"] == ["a"]
    assert info["pids"] == [1234]
    assert status["dead_readers"]["dead1"]["pids"] == []
    assert set(status["last_heartbeat"]) == {"live1", "loading1", "dead1"}
    for beat in status["last_heartbeat"].values():
        assert set(beat) == {"heartbeat_timestamp", "heartbeat_wait_interval"}
        assert type(beat["heartbeat_timestamp"]) is int
        assert type(beat["heartbeat_wait_interval"]) is int
    assert status["last_heartbeat"]["live1"]["heartbeat_wait_interval"] == 1000


def test_status_of_empty_registry(registry: ReaderRegistry) -> None:
    assert registry.status([]) == {
        "dead_readers": {},
        "last_heartbeat": {},
        "live_readers": {},
        "loading_readers": {},
        "reserved_consumers": [],
    }


def test_masked_status_hides_pids_and_names(registry: ReaderRegistry) -> None:
    live_reader(registry, "live1", "a")
    registry.on_reader_register(register_frame("loading1"))
    live_reader(registry, "dead1")
    registry.mark_dead("dead1", "x")
    masked = registry.masked_status()
    assert set(masked) == {"live_readers", "dead_readers"}
    assert list(masked["live_readers"]) == ["live1"]
    assert list(masked["dead_readers"]) == ["dead1"]
    assert masked["live_readers"]["live1"] == {
        "consumer_groups": ["a"],
        "device": "cpu",
        "model_name": "echo",
        "model_type": "CAUSAL",
    }


def test_reader_groups_excludes_dead_and_marks_ready(registry: ReaderRegistry) -> None:
    live_reader(registry, "live1", "a,b")
    registry.on_reader_register(register_frame("loading1", "a"))
    live_reader(registry, "dead1", "a,c")
    registry.mark_dead("dead1", "x")
    groups = registry.reader_groups()
    assert set(groups) == {"a", "b"}
    assert {entry["reader_id"]: entry["ready"] for entry in groups["a"]} == {"live1": True, "loading1": False}
    assert [entry["reader_id"] for entry in groups["b"]] == ["live1"]
    assert set(groups["a"][0]) == {"reader_id", "device", "model_name", "model_type", "pids", "ready"}


def test_group_queries(registry: ReaderRegistry) -> None:
    live_reader(registry, "r1", "a")
    registry.on_reader_register(register_frame("r2", "b"))
    assert registry.groups() == ["a", "b"]
    assert registry.has_live("a")
    assert not registry.has_live("b")
    assert registry.knows("b")
    assert not registry.knows("zzz")
    assert (registry.count(ReaderState.LIVE), registry.count(ReaderState.LOADING)) == (1, 1)


def test_detail_view(registry: ReaderRegistry) -> None:
    registry.on_reader_register(register_frame("r1", access_token="secret"))
    registry.on_reader_loaded("r1", loaded(capacity=3, notes=["note"]))
    record = registry.get("r1")
    assert record is not None
    detail = record.detail()
    assert detail["state"] == "live"
    assert detail["capacity"] == 3
    assert detail["notes"] == ["note"]
    assert set(detail) >= INFO_KEYS
    assert detail["config"]["model_name"] == "echo"


# ---- change notification ----------------------------------------------------------------------------------------


async def test_wait_changed_wakes_on_a_state_change(registry: ReaderRegistry) -> None:
    waiter = asyncio.create_task(registry.wait_changed(5))
    await asyncio.sleep(0)
    registry.on_reader_register(register_frame("r1"))
    await asyncio.wait_for(waiter, 1)


async def test_wait_changed_times_out_quietly(registry: ReaderRegistry) -> None:
    started = monotonic()
    await registry.wait_changed(0.05)
    assert monotonic() - started >= 0.04


# ---- restarts and buffering ----------------------------------------------------------------------------------------


def test_a_restarting_reader_is_loading_from_scratch(registry: ReaderRegistry) -> None:
    live_reader(registry, "r1")
    registry.set_dead("r1", "killed; restarting in 1 s")
    record = registry.records["r1"]
    assert (record.state, record.error, record.info.pids) == (ReaderState.DEAD, "killed; restarting in 1 s", [])
    registry.restarting("r1")
    assert (record.state, record.error, record.capacity, record.progress) == (ReaderState.LOADING, None, 0, 0.0)
    assert not registry.overdue(monotonic())  # it has its heartbeats' worth of time to register


def test_set_dead_replaces_the_reason_and_a_load_failure_is_the_best_one(registry: ReaderRegistry) -> None:
    live_reader(registry, "r1")
    registry.mark_dead("r1", "the reader disconnected")
    registry.mark_dead("r1", "ignored: the first reason stays")
    assert registry.records["r1"].error == "the reader disconnected"
    registry.on_reader_load_failed("r1", "no such file")  # heard after its exit, still the reason shown
    assert registry.records["r1"].error == "model failed to load: no such file"


def test_buffer_requests_makes_a_readers_groups_buffer(registry: ReaderRegistry) -> None:
    registry.on_reader_register(register_frame("r1", "a,b", buffer_requests=True))
    registry.on_reader_register(register_frame("r2", "c"))
    assert [registry.buffering(group) for group in ("a", "b", "c", "d")] == [True, True, False, False]
