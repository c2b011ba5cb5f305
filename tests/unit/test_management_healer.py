"""``liftoff.management.healer``: what the gateway does when a reader it started fails (processes faked: the real
ones are in tests/integration/test_restarts.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from liftoff.broker.base import BrokerSettings, GatewayBroker
from liftoff.config.models import ReaderConfig
from liftoff.core.frames import LoadedFrame, RequestFrame
from liftoff.core.types import ReaderState
from liftoff.management import healer as healer_module
from liftoff.management.healer import Healer
from liftoff.management.registry import ReaderRecord, ReaderRegistry, info_for
from liftoff.management.restarts import RestartLimits
from liftoff.management.supervisor import SpawnSettings, Supervisor

FAST = RestartLimits(max_restarts=2, window_s=60.0, first_delay_s=0.05, max_delay_s=0.2, stable_s=60.0)
KILLED = -9


class FakeBroker(GatewayBroker):
    """Records evictions and settled groups."""

    def __init__(self) -> None:
        super().__init__(BrokerSettings("gw", frozenset(), 10, 1, 500, 1000))
        self.evicted: list[str] = []
        self.settled: list[str] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def submit(self, frame: RequestFrame, queue_deadline: float) -> None:
        del frame, queue_deadline

    def abort(self, request_id: str) -> None:
        del request_id

    def evict_reader(self, reader_id: str, reason: str) -> None:
        self.evicted.append(reader_id)

    def stop_reader(self, reader_id: str, reason: str) -> None:
        del reader_id, reason

    def settle(self, group: str) -> None:
        self.settled.append(group)

    def queue_depth(self, group: str | None = None) -> int:
        return 0

    def in_flight(self, group: str | None = None) -> int:
        return 0


class FakeSupervisor(Supervisor):
    """Processes that exist only as pids; the test says when one exits."""

    def __init__(self) -> None:
        settings = SpawnSettings("127.0.0.1:1", "embedded", "INFO", "text", 1000, 8, "/tmp", 1.0)
        super().__init__(settings, lambda reader_id, pid, code: None)
        self.running: dict[str, int] = {}
        self.spawned: list[str] = []
        self.stopped: list[tuple[str, bool]] = []
        self.healer: Healer | None = None
        self._next_pid = 100

    async def spawn(self, reader_id: str, config: ReaderConfig) -> int:
        self._next_pid += 1
        self.running[reader_id] = self._next_pid
        self.spawned.append(reader_id)
        return self._next_pid

    def pid(self, reader_id: str) -> int | None:
        return self.running.get(reader_id)

    async def wait_exit(self, reader_id: str, within_s: float) -> bool:
        await asyncio.sleep(within_s)
        return reader_id not in self.running

    async def stop(self, reader_id: str, grace_s: float, *, final: bool = True) -> None:
        self.stopped.append((reader_id, final))
        if reader_id in self.running:
            self.exit(reader_id, -15, report=not final)

    def exit(self, reader_id: str, code: int, *, report: bool = True) -> None:
        pid = self.running.pop(reader_id)
        if report and self.healer is not None:
            self.healer.on_process_exit(reader_id, pid, code)


Parts = tuple[Healer, FakeSupervisor, FakeBroker, ReaderRegistry]


@pytest.fixture
async def parts() -> AsyncIterator[Parts]:
    registry, broker, supervisor = ReaderRegistry(), FakeBroker(), FakeSupervisor()
    healer = Healer(registry, broker, supervisor, FAST)
    supervisor.healer = healer
    broker.holding = healer.holds
    yield healer, supervisor, broker, registry
    registry.closing = True
    await healer.shutdown()
    supervisor.running.clear()
    await healer.join()


async def start(parts: Parts, reader_id: str = "r1", **options: object) -> None:
    """Create a reader as the manager does, and make it live."""
    healer, supervisor, _, registry = parts
    config = ReaderConfig.model_validate({"model_name": "echo", "device": "cpu", "consumer_group": "g", **options})
    registry.add(ReaderRecord(reader_id=reader_id, config=config, info=info_for(config), managed=True))
    healer.adopt(reader_id, config, await supervisor.spawn(reader_id, config))
    registry.on_reader_loaded(reader_id, LoadedFrame(model_type="CAUSAL", capacity=1))
    healer.on_reader_loaded(reader_id)


async def until(predicate: Callable[[], object], within_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_crashed_reader_is_restarted_with_the_same_id_and_is_loading(parts: Parts) -> None:
    healer, supervisor, broker, registry = parts
    await start(parts)
    supervisor.exit("r1", KILLED)
    record = registry.get("r1")
    assert record is not None
    assert record.state is ReaderState.DEAD
    assert record.error == "the reader process was killed by SIGKILL; restarting in 0.05 s"
    assert broker.evicted == ["r1"]
    assert healer.holds("g")  # its group keeps its waiting requests meanwhile
    assert healer.view("r1")["next_restart_ms"] is not None
    await until(lambda: supervisor.spawned == ["r1", "r1"])
    assert record.state is ReaderState.LOADING
    assert record.info.pids == [supervisor.running["r1"]]
    assert record.error is None
    assert healer.restart_counts() == {"r1": 1}
    assert healer.view("r1")["last_exit"] == "the reader process was killed by SIGKILL"
    assert broker.settled == []


async def test_after_the_limit_the_reader_stays_dead_and_its_group_settles(parts: Parts) -> None:
    healer, supervisor, broker, registry = parts
    await start(parts)
    for restarts in (1, 2):
        supervisor.exit("r1", 70)
        await until(lambda: healer.restart_counts()["r1"] == restarts)  # noqa: B023 (waited for at once)
    supervisor.exit("r1", 70)
    record = registry.get("r1")
    assert record is not None
    assert record.error is not None
    assert record.error.startswith("crash loop: restarted 2 times within 60 s")
    assert not healer.holds("g")
    assert broker.settled == ["g"]
    await asyncio.sleep(0.3)
    assert supervisor.spawned.count("r1") == 3


async def test_no_restart_for_a_reader_deleted_or_a_gateway_stopping_while_it_was_due(parts: Parts) -> None:
    healer, supervisor, broker, registry = parts
    await start(parts, "deleted")
    await start(parts, "stopping")
    supervisor.exit("deleted", KILLED)
    supervisor.exit("stopping", KILLED)
    registry.remove("deleted")
    healer.forget("deleted")
    assert broker.settled == ["g"]
    registry.closing = True
    await healer.shutdown()
    await asyncio.sleep(0.2)
    assert supervisor.spawned == ["deleted", "stopping"]
    assert not healer.holds("g")  # nothing buffers while the gateway stops


async def test_a_lost_reader_whose_process_lingers_is_stopped_and_restarted(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(healer_module, "LOST_GRACE_S", 0.05)
    healer, supervisor, _, registry = parts
    await start(parts)
    registry.on_reader_lost("r1", "silent for 600 ms with requests in flight")
    healer.on_reader_lost("r1")
    await until(lambda: supervisor.stopped == [("r1", False)])
    record = registry.get("r1")
    assert record is not None
    assert record.error is not None
    # SIGTERM is a clean exit, but the gateway stopped it because it had declared it dead: a failure.
    assert record.error.startswith("silent for 600 ms with requests in flight; its process was killed by SIGTERM")
    await until(lambda: supervisor.spawned == ["r1", "r1"])


async def test_a_clean_exit_is_not_restarted_on_failure_and_an_old_process_is_ignored(parts: Parts) -> None:
    healer, supervisor, broker, registry = parts
    await start(parts)
    old_pid = supervisor.running["r1"]
    healer.on_process_exit("r1", old_pid - 50, KILLED)  # a process of an earlier life of this reader id
    assert broker.evicted == []
    supervisor.exit("r1", 0)
    record = registry.get("r1")
    assert record is not None
    assert record.error == (
        "the reader process exited with code 0 (a clean stop) (not restarted: restart_policy is on-failure)"
    )
    await asyncio.sleep(0.2)
    assert supervisor.spawned == ["r1"]


async def test_buffer_requests_makes_a_group_hold(parts: Parts) -> None:
    healer, _, _, registry = parts
    config = ReaderConfig(model_name="echo", device="cpu", consumer_group=["side"], buffer_requests=True)
    registry.add(ReaderRecord(reader_id="headless", config=config, info=info_for(config)))
    assert healer.holds("side")
    assert not healer.holds("g")
    registry.remove("headless")
    assert not healer.holds("side")


async def test_on_a_shared_broker_a_lost_reader_that_registers_again_keeps_its_process(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(healer_module, "SHARED_LOST_GRACE_S", 0.05)
    healer, supervisor, broker, registry = parts
    broker.shared = True
    await start(parts, "back")
    await start(parts, "frozen")
    for reader_id in ("back", "frozen"):
        registry.on_reader_lost(reader_id, "no heartbeat for 3.1 s (3 missed)")
        healer.on_reader_lost(reader_id)
    registry.restarting("back")  # it registered again by itself (Redis): loading, then live
    await until(lambda: ("frozen", False) in supervisor.stopped)
    await asyncio.sleep(0.1)
    assert supervisor.stopped == [("frozen", False)]
    assert "back" in supervisor.running
    await until(lambda: supervisor.spawned.count("frozen") == 2)
