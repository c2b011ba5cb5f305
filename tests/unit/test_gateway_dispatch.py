"""``liftoff.gateway.dispatch``: the per-request ``Collector`` and the ``Dispatcher`` routing frames to it."""

from __future__ import annotations

import asyncio

import pytest

from liftoff.broker.base import BrokerSettings, GatewayBroker
from liftoff.config.models import AppConfig, ReaderConfig
from liftoff.core.clock import monotonic
from liftoff.core.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    NoReadersAvailableError,
    NotFoundError,
    OverloadedError,
    RequestCancelledError,
    RequestTimeoutError,
    ShuttingDownError,
)
from liftoff.core.frames import ErrorFrame, FinalFrame, LoadedFrame, RequestFrame, TokenFrame
from liftoff.core.types import ReaderState, RequestKind
from liftoff.gateway.accounting import Accounting
from liftoff.gateway.dispatch import Collector, Dispatcher, Item, is_final, raise_if_error
from liftoff.gateway.metrics import GatewayMetrics
from liftoff.management.registry import ReaderRecord, ReaderRegistry, info_for


def token(request_id: str, seq: int, text: str = "x") -> TokenFrame:
    return TokenFrame(request_id=request_id, seq=seq, text=text)


def final(request_id: str, seq: int) -> FinalFrame:
    return FinalFrame(request_id=request_id, seq=seq, finish_reason="stop")


def texts(items: list[Item]) -> list[tuple[int, str]]:
    return [(item.index, item.frame.text) for item in items if isinstance(item.frame, TokenFrame)]


# ---- Collector --------------------------------------------------------------------------------------------------


async def test_next_returns_everything_pushed_so_far() -> None:
    collector = Collector(["a", "b"], monotonic() + 5)
    assert collector.push(0, token("a", 0, "one")) is False
    assert collector.push(1, token("b", 0, "uno")) is False
    assert collector.push(0, token("a", 1, " two")) is False
    assert texts(await collector.next()) == [(0, "one"), (1, "uno"), (0, " two")]
    assert not collector.pending


async def test_duplicate_token_frames_are_dropped() -> None:
    collector = Collector(["a"], monotonic() + 5)
    collector.push(0, token("a", 0, "one"))
    collector.push(0, token("a", 1, " two"))
    collector.push(0, token("a", 1, " two"))  # redelivered
    collector.push(0, token("a", 0, "one"))  # older still
    collector.push(0, token("a", 2, " three"))
    assert texts(await collector.next()) == [(0, "one"), (0, " two"), (0, " three")]


async def test_duplicates_are_tracked_per_prompt() -> None:
    collector = Collector(["a", "b"], monotonic() + 5)
    collector.push(0, token("a", 0, "a0"))
    collector.push(1, token("b", 0, "b0"))  # same seq, other prompt: kept
    assert texts(await collector.next()) == [(0, "a0"), (1, "b0")]


async def test_next_returns_empty_once_every_prompt_is_final() -> None:
    collector = Collector(["a", "b"], monotonic() + 5)
    collector.push(0, token("a", 0))
    assert collector.push(0, final("a", 1)) is True
    assert not collector.done
    assert collector.push(1, ErrorFrame(request_id="b", seq=0, error_type="timeout", message="late")) is True
    assert collector.done
    items = await collector.next()
    assert [type(item.frame) for item in items] == [TokenFrame, FinalFrame, ErrorFrame]
    assert await collector.next() == []
    assert await collector.next() == []


async def test_next_waits_for_frames_pushed_later() -> None:
    collector = Collector(["a"], monotonic() + 5)
    waiter = asyncio.create_task(collector.next())
    await asyncio.sleep(0)
    assert not waiter.done()
    collector.push(0, token("a", 0, "late"))
    assert texts(await asyncio.wait_for(waiter, 2)) == [(0, "late")]


async def test_deadline_raises_timeout() -> None:
    collector = Collector(["a"], monotonic() + 0.05)
    started = monotonic()
    with pytest.raises(RequestTimeoutError, match="deadline"):
        await collector.next()
    assert monotonic() - started >= 0.04


async def test_past_deadline_raises_at_once() -> None:
    collector = Collector(["a"], monotonic() - 1)
    with pytest.raises(RequestTimeoutError):
        await collector.next()


async def test_pending_frames_are_returned_even_after_the_deadline() -> None:
    collector = Collector(["a"], monotonic() - 1)
    collector.push(0, token("a", 0, "kept"))
    assert texts(await collector.next()) == [(0, "kept")]
    with pytest.raises(RequestTimeoutError):
        await collector.next()


async def test_cancel_wakes_a_waiting_next() -> None:
    collector = Collector(["a"], monotonic() + 30)
    waiter = asyncio.create_task(collector.next())
    await asyncio.sleep(0)
    collector.cancel()
    with pytest.raises(RequestCancelledError):
        await asyncio.wait_for(waiter, 2)
    assert collector.cancelled


async def test_cancel_before_next_raises() -> None:
    collector = Collector(["a"], monotonic() + 30)
    collector.cancel()
    with pytest.raises(RequestCancelledError):
        await collector.next()


def test_raise_if_error_and_is_final() -> None:
    raise_if_error(Item(0, token("a", 0)))
    raise_if_error(Item(0, final("a", 0)))
    error = ErrorFrame(request_id="a", seq=0, error_type="context_length_exceeded", message="too long")
    with pytest.raises(ContextLengthExceededError, match="too long"):
        raise_if_error(Item(0, error))
    assert is_final(final("a", 0))
    assert is_final(error)
    assert not is_final(token("a", 0))


# ---- Dispatcher -------------------------------------------------------------------------------------------------


class FakeBroker(GatewayBroker):
    """Records submissions and aborts; refuses requests whose text is 'overload'."""

    def __init__(self) -> None:
        super().__init__(
            BrokerSettings(
                gateway_id="gw",
                reserved_groups=frozenset({"primary"}),
                max_queued_requests=10,
                max_retries=1,
                reader_message_timeout_ms=500,
                heartbeat_interval_ms=1000,
            )
        )
        self.submitted: list[tuple[RequestFrame, float]] = []
        self.aborted: list[str] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def submit(self, frame: RequestFrame, queue_deadline: float) -> None:
        if frame.text == "overload":
            raise OverloadedError("queues are full")
        self.submitted.append((frame, queue_deadline))

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def evict_reader(self, reader_id: str, reason: str) -> None:
        del reader_id, reason

    def stop_reader(self, reader_id: str, reason: str) -> None:
        del reader_id, reason

    def settle(self, group: str) -> None:
        del group

    def queue_depth(self, group: str | None = None) -> int:
        return 0

    def in_flight(self, group: str | None = None) -> int:
        return 0


def add_reader(registry: ReaderRegistry, reader_id: str, group: str, *, live: bool, kind: str = "CAUSAL") -> None:
    config = ReaderConfig(model_name="echo", device="cpu", consumer_group=[group])
    registry.add(ReaderRecord(reader_id=reader_id, config=config, info=info_for(config)))
    if live:
        registry.on_reader_loaded(reader_id, LoadedFrame(model_type=kind, capacity=1))


def frames_for(group: str, *texts_: str) -> list[RequestFrame]:
    return [RequestFrame(request_id=f"{group}-{i}", consumer_group=group, text=text) for i, text in enumerate(texts_)]


@pytest.fixture
def parts() -> tuple[Dispatcher, FakeBroker, ReaderRegistry]:
    broker = FakeBroker()
    registry = ReaderRegistry()
    config = AppConfig(request_timeout_s=60, reserved_buffer_timeout_s=5, reserved_consumers="primary")
    return Dispatcher(broker, registry, config), broker, registry


async def test_dispatcher_routes_frames_to_their_collector(
    parts: tuple[Dispatcher, FakeBroker, ReaderRegistry],
) -> None:
    dispatcher, broker, registry = parts
    add_reader(registry, "r1", "gen", live=True)
    collector = dispatcher.submit(frames_for("gen", "one", "two"))
    assert [frame.request_id for frame, _ in broker.submitted] == ["gen-0", "gen-1"]
    assert dispatcher.in_flight == 2
    dispatcher.on_outputs([token("gen-1", 0, "b"), token("gen-0", 0, "a"), token("other", 0, "ignored")])
    dispatcher.on_outputs([final("gen-0", 1), final("gen-0", 1), token("gen-0", 1, "late")])  # duplicates dropped
    assert dispatcher.in_flight == 1
    assert not collector.done
    dispatcher.on_outputs([final("gen-1", 1)])
    assert collector.done
    items = await collector.next()
    assert texts(items) == [(1, "b"), (0, "a")]
    assert sum(isinstance(item.frame, FinalFrame) for item in items) == 2
    dispatcher.abort(collector)
    assert broker.aborted == []  # nothing left to abort


async def test_dispatcher_abort_cancels_unfinished_prompts(
    parts: tuple[Dispatcher, FakeBroker, ReaderRegistry],
) -> None:
    dispatcher, broker, registry = parts
    add_reader(registry, "r1", "gen", live=True)
    collector = dispatcher.submit(frames_for("gen", "one", "two"))
    dispatcher.on_outputs([final("gen-0", 0)])
    dispatcher.abort(collector)
    assert broker.aborted == ["gen-1"]
    assert dispatcher.in_flight == 0


async def test_live_group_uses_the_request_deadline(parts: tuple[Dispatcher, FakeBroker, ReaderRegistry]) -> None:
    dispatcher, broker, registry = parts
    add_reader(registry, "r1", "gen", live=True)
    collector = dispatcher.submit(frames_for("gen", "x"))
    ((_, queue_deadline),) = broker.submitted
    assert queue_deadline == collector.deadline
    assert 59 < collector.deadline - monotonic() <= 60


async def test_reserved_group_buffers_for_a_shorter_time(parts: tuple[Dispatcher, FakeBroker, ReaderRegistry]) -> None:
    dispatcher, broker, _ = parts
    collector = dispatcher.submit(frames_for("primary", "x"))
    ((_, queue_deadline),) = broker.submitted
    assert 4 < queue_deadline - monotonic() <= 5
    assert collector.deadline > queue_deadline


async def test_a_group_the_gateway_holds_buffers_like_a_reserved_one(
    parts: tuple[Dispatcher, FakeBroker, ReaderRegistry],
) -> None:
    dispatcher, broker, registry = parts
    add_reader(registry, "r1", "gen", live=False)  # its reader is being restarted
    broker.holding = lambda group: group == "gen"
    dispatcher.submit(frames_for("gen", "x"))
    ((_, queue_deadline),) = broker.submitted
    assert 4 < queue_deadline - monotonic() <= 5
    broker.holding = lambda group: False  # the restart was given up
    with pytest.raises(NoReadersAvailableError):
        dispatcher.submit(frames_for("gen", "y"))


async def test_unknown_group_is_not_found(parts: tuple[Dispatcher, FakeBroker, ReaderRegistry]) -> None:
    dispatcher, broker, registry = parts
    add_reader(registry, "r1", "gen", live=True)
    with pytest.raises(NotFoundError, match=r"consumer group 'ghost' does not exist") as caught:
        dispatcher.submit(frames_for("ghost", "x"))
    assert "gen" not in caught.value.message  # other users' group names are not told to a stranger
    assert broker.submitted == []


async def test_unknown_groups_share_one_metric_label(parts: tuple[Dispatcher, FakeBroker, ReaderRegistry]) -> None:
    dispatcher, _, registry = parts
    metrics = GatewayMetrics(registry, FakeBroker())
    dispatcher.accounting = Accounting(metrics)
    add_reader(registry, "r1", "gen", live=True)
    for name in ("ghost", "x" * 100_000, "evil\nforged"):
        with pytest.raises(NotFoundError) as caught:
            dispatcher.submit(frames_for(name, "x"))
        assert len(caught.value.message) < 300
    assert dict(metrics.rejections) == {("unknown", "not_found"): 3}


async def test_group_without_live_reader_fails_fast(parts: tuple[Dispatcher, FakeBroker, ReaderRegistry]) -> None:
    dispatcher, _, registry = parts
    add_reader(registry, "r1", "gen", live=False)
    with pytest.raises(NoReadersAvailableError, match="no live reader in consumer group 'gen'"):
        dispatcher.submit(frames_for("gen", "x"))
    registry.mark_dead("r1", "gone")
    assert registry.records["r1"].state is ReaderState.DEAD
    with pytest.raises(NoReadersAvailableError):
        dispatcher.submit(frames_for("gen", "x"))


async def test_broker_refusal_aborts_the_submitted_part(parts: tuple[Dispatcher, FakeBroker, ReaderRegistry]) -> None:
    dispatcher, broker, registry = parts
    add_reader(registry, "r1", "gen", live=True)
    with pytest.raises(OverloadedError):
        dispatcher.submit(frames_for("gen", "fine", "overload"))
    assert "gen-0" in broker.aborted  # the accepted prompt does not linger in the broker
    assert dispatcher.in_flight == 0


async def test_closing_dispatcher_refuses_work(parts: tuple[Dispatcher, FakeBroker, ReaderRegistry]) -> None:
    dispatcher, _, _ = parts
    dispatcher.closing = True
    with pytest.raises(ShuttingDownError):
        dispatcher.submit(frames_for("primary", "x"))


async def test_collector_drops_a_duplicate_final_frame() -> None:
    from liftoff.core.frames import FinalFrame
    from liftoff.gateway.dispatch import Collector

    collector = Collector(["a", "b"], monotonic() + 10)
    assert collector.push(0, FinalFrame(request_id="a", seq=0, finish_reason="stop"))
    assert not collector.push(0, FinalFrame(request_id="a", seq=0, finish_reason="stop"))
    assert not collector.done
    assert collector.remaining == 1


async def test_requests_a_groups_readers_cannot_serve_are_refused_before_queueing(
    parts: tuple[Dispatcher, FakeBroker, ReaderRegistry],
) -> None:
    dispatcher, broker, registry = parts
    add_reader(registry, "e1", "vectors", live=True, kind="EMBEDDING")
    with pytest.raises(InvalidRequestError, match=r"generation needs a CAUSAL .* 'vectors' serves EMBEDDING"):
        dispatcher.submit(frames_for("vectors", "hi"))
    embed = RequestFrame(request_id="x", consumer_group="vectors", kind=RequestKind.EMBED, payload={"inputs": ["a"]})
    dispatcher.submit([embed])
    assert [frame.request_id for frame, _ in broker.submitted] == ["x"]
    chat = RequestFrame(request_id="c", consumer_group="", kind=RequestKind.CHAT_TEMPLATE, reader_id="e1")
    with pytest.raises(InvalidRequestError, match="reader 'e1' serves a EMBEDDING model"):
        dispatcher.submit_to_reader(chat)
    tokenize = RequestFrame(request_id="t", consumer_group="", kind=RequestKind.TOKENIZE, reader_id="e1")
    dispatcher.submit_to_reader(tokenize)


async def test_a_group_mixing_model_types_takes_what_any_of_them_serves(
    parts: tuple[Dispatcher, FakeBroker, ReaderRegistry],
) -> None:
    dispatcher, broker, registry = parts
    add_reader(registry, "g1", "mixed", live=True)
    add_reader(registry, "e1", "mixed", live=True, kind="EMBEDDING")
    dispatcher.submit(frames_for("mixed", "hi"))
    dispatcher.submit([RequestFrame(request_id="x", consumer_group="mixed", kind=RequestKind.EMBED)])
    with pytest.raises(InvalidRequestError):
        dispatcher.submit([RequestFrame(request_id="y", consumer_group="mixed", kind=RequestKind.CLASSIFY)])
    assert len(broker.submitted) == 2


async def test_adapter_changes_go_to_generative_readers_with_their_own_deadline(
    parts: tuple[Dispatcher, FakeBroker, ReaderRegistry],
) -> None:
    """An API or encoder reader is told at once that it holds no adapters; a generative one gets the change, with
    the deadline the management API gives (lora_load_timeout_s and a grace), not request_timeout_s."""
    dispatcher, broker, registry = parts
    add_reader(registry, "api1", "hosted", live=True, kind="API")
    add_reader(registry, "e1", "vectors", live=True, kind="EMBEDDING")
    add_reader(registry, "g1", "gen", live=True)
    for reader_id, kind in (("api1", "API"), ("e1", "EMBEDDING")):
        frame = RequestFrame(request_id=f"add-{reader_id}", consumer_group="", kind=RequestKind.ADD_LORA,
                             reader_id=reader_id, payload={"name": "a", "source": "/a"})  # fmt: skip
        with pytest.raises(InvalidRequestError, match=f"LoRA adapters need a text generation reader .* {kind} model"):
            dispatcher.submit_to_reader(frame)
    frame = RequestFrame(request_id="add-g1", consumer_group="", kind=RequestKind.ADD_LORA, reader_id="g1")
    collector = dispatcher.submit_to_reader(frame, timeout_s=130)
    assert [sent.request_id for sent, _ in broker.submitted] == ["add-g1"]
    assert 129 < collector.deadline - monotonic() <= 130
