"""The broker contract, run against the embedded broker and against Redis Streams on a real ``redis-server``.

Both must behave the same for delivery, routing by group, capacity, cancellation, deadlines, dead readers,
duplicates and the order of a stream's frames (see ``liftoff.broker.base``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from liftoff.broker.base import BrokerSettings
from liftoff.core.errors import NoReadersAvailableError, OverloadedError
from liftoff.core.frames import (
    AbortFrame,
    ErrorFrame,
    FinalFrame,
    HeartbeatFrame,
    LoadFailedFrame,
    RequestFrame,
    ResultFrame,
    StopFrame,
    TokenFrame,
)
from tests.integration.broker_harness import Harness, TestReader

BROKERS = ["embedded", "redis"]


def settings(**changes: object) -> BrokerSettings:
    values: dict[str, object] = {
        "gateway_id": f"gw-test-{uuid.uuid4().hex[:8]}",
        "reserved_groups": frozenset(),
        "max_queued_requests": 100,
        "max_retries": 1,
        "reader_message_timeout_ms": 20_000,
        "heartbeat_interval_ms": 200,
    }
    values.update(changes)
    return BrokerSettings(**values)  # type: ignore[arg-type]


async def make(request: pytest.FixtureRequest, **changes: object) -> Harness:
    kind: str = request.param if hasattr(request, "param") else request.node.callspec.params["kind"]
    url = request.getfixturevalue("redis_server").url if kind == "redis" else ""
    return await Harness(kind, settings(**changes), url).start()


@pytest.fixture(params=BROKERS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    h = await make(request)
    try:
        yield h
    finally:
        await h.close()


def tokens(request_id: str, count: int, start: int = 0) -> list[TokenFrame]:
    return [TokenFrame(request_id=request_id, seq=i, text=f"t{i} ") for i in range(start, start + count)]


# ---- delivery ---------------------------------------------------------------------------------------------------


async def test_a_request_reaches_a_reader_and_its_frames_come_back_in_order(harness: Harness) -> None:
    reader = await harness.reader()
    request_id = harness.submit("hello")
    (frame,) = await reader.frames(1)
    assert isinstance(frame, RequestFrame)
    assert (frame.request_id, frame.text, frame.consumer_group) == (request_id, "hello", "primary")
    for start in range(0, 60, 7):  # several sends, each a few frames
        reader.send(tokens(request_id, min(7, 60 - start), start))
    reader.send([FinalFrame(request_id=request_id, seq=60, finish_reason="length", reader_id=reader.reader_id)])
    final = await harness.final(request_id)
    assert isinstance(final, FinalFrame)
    frames = harness.events.outputs[request_id]
    assert [f.seq for f in frames] == list(range(61))
    assert "".join(f.text for f in frames if isinstance(f, TokenFrame)) == "".join(f"t{i} " for i in range(60))


async def test_requests_go_only_to_readers_of_their_group(harness: Harness) -> None:
    red = await harness.reader("red", groups=("red",))
    blue = await harness.reader("blue", groups=("blue",))
    sent = {harness.submit(f"to {group}", group): group for group in ("red", "blue", "red", "blue")}
    await red.frames(2)
    await blue.frames(2)
    await red.quiet(0.3)
    assert {f.request_id for f in red.requests()} == {rid for rid, g in sent.items() if g == "red"}
    assert {f.request_id for f in blue.requests()} == {rid for rid, g in sent.items() if g == "blue"}


async def test_a_reader_gets_no_more_than_its_capacity_and_a_small_prefetch(harness: Harness) -> None:
    reader = await harness.reader(capacity=2)
    request_ids = [harness.submit(f"p{i}") for i in range(6)]
    await reader.frames(3)
    await reader.quiet(0.5)
    assert len(reader.requests()) == 3  # capacity 2 + prefetch 1
    first = reader.requests()[0].request_id
    reader.send([FinalFrame(request_id=first, seq=0, finish_reason="stop")])
    await reader.frames(4)
    assert {f.request_id for f in reader.requests()} <= set(request_ids)
    # the Redis broker learns of a claim from the reader's next message: wait for it
    await harness.wait(lambda: harness.broker.in_flight("primary") == 3, "3 requests in flight")
    assert harness.broker.queue_depth("primary") == 2


async def test_load_is_shared_between_the_readers_of_a_group(harness: Harness) -> None:
    one = await harness.reader(capacity=2)
    two = await harness.reader(capacity=2)
    for i in range(6):
        harness.submit(f"p{i}")
    await harness.wait(lambda: len(one.received) + len(two.received) >= 6, "6 deliveries", within_s=5)
    await one.quiet(0.2)
    assert len(one.requests()) == 3
    assert len(two.requests()) == 3


async def test_a_per_reader_request_reaches_that_reader_only(harness: Harness) -> None:
    one = await harness.reader("one")
    two = await harness.reader("two")
    request_id = harness.submit("tokenize me", reader_id="two")
    (frame,) = await two.frames(1)
    assert isinstance(frame, RequestFrame)
    assert frame.request_id == request_id
    two.send([ResultFrame(request_id=request_id, seq=0, data={"tokens": ["a"]})])
    result = await harness.final(request_id)
    assert isinstance(result, ResultFrame)
    assert result.data == {"tokens": ["a"]}
    assert await one.quiet(0.2) == []
    with pytest.raises(NoReadersAvailableError):
        harness.submit("x", reader_id="nobody")


# ---- cancellation, deadlines, limits ----------------------------------------------------------------------------


async def test_an_aborted_running_request_reaches_the_reader_and_its_late_frames_are_dropped(harness: Harness) -> None:
    reader = await harness.reader()
    request_id = harness.submit("long")
    await reader.frames(1)
    reader.send(tokens(request_id, 2))
    await harness.wait(lambda: len(harness.events.outputs.get(request_id, [])) == 2, "two tokens")
    harness.broker.abort(request_id)
    frames = await reader.frames(2)
    assert frames[1] == AbortFrame(request_id=request_id)
    reader.send([*tokens(request_id, 2, start=2), FinalFrame(request_id=request_id, seq=4, finish_reason="abort")])
    other = harness.submit("after")  # the slot is free again
    await reader.frames(3)
    assert len(harness.events.outputs[request_id]) == 2
    assert other in {f.request_id for f in reader.requests()}


async def test_an_aborted_queued_request_is_never_delivered(harness: Harness) -> None:
    request_id = harness.submit("nobody is here yet")
    kept = harness.submit("this one stays")
    harness.broker.abort(request_id)
    reader = await harness.reader()
    await reader.frames(1)
    await reader.quiet(0.5)
    assert [f.request_id for f in reader.requests()] == [kept]
    assert harness.broker.queue_depth() == 0


async def test_a_request_no_reader_takes_fails_at_its_deadline(harness: Harness) -> None:
    request_id = harness.submit("alone", "nobody", deadline_s=0.3)
    error = await harness.final(request_id, within_s=5)
    assert isinstance(error, ErrorFrame)
    assert error.error_type == "unavailable"
    assert harness.broker.queue_depth() == 0


async def test_a_busy_group_times_out_its_queued_requests(harness: Harness) -> None:
    reader = await harness.reader(capacity=1)
    harness.submit("one")
    harness.submit("two")  # the prefetch slot
    late = harness.submit("three", deadline_s=0.3)
    await reader.frames(2)
    error = await harness.final(late, within_s=5)
    assert isinstance(error, ErrorFrame)
    assert error.error_type == "timeout"


@pytest.mark.parametrize("kind", BROKERS)
async def test_a_full_queue_refuses_new_requests(request: pytest.FixtureRequest, kind: str) -> None:
    harness = await make(request, max_queued_requests=2)
    try:
        harness.submit("a")
        harness.submit("b")
        with pytest.raises(OverloadedError):
            harness.submit("c")
    finally:
        await harness.close()


# ---- duplicates -------------------------------------------------------------------------------------------------


async def test_frames_after_the_final_frame_are_dropped(harness: Harness) -> None:
    reader = await harness.reader()
    request_id = harness.submit("x")
    await reader.frames(1)
    final = FinalFrame(request_id=request_id, seq=1, finish_reason="stop")
    reader.send([*tokens(request_id, 1), final])
    await harness.final(request_id)
    reader.send([final, *tokens(request_id, 1, start=2)])
    probe = harness.submit("probe")  # sent after the duplicates, on the same link: answered after them
    await reader.frames(2)
    reader.send([FinalFrame(request_id=probe, seq=0, finish_reason="stop")])
    await harness.final(probe)
    assert [type(f) for f in harness.events.outputs[request_id]] == [TokenFrame, FinalFrame]


# ---- reader lifecycle and failures ------------------------------------------------------------------------------


async def test_heartbeats_and_load_failures_reach_the_gateway(harness: Harness) -> None:
    reader = await harness.reader(loaded=False)
    assert reader.reader_id not in harness.events.live
    reader.send([HeartbeatFrame(timestamp_ms=123, active=0, progress=0.5)])
    await harness.wait(lambda: any(hb.progress == 0.5 for _, hb in harness.events.heartbeats), "the heartbeat")
    reader.send([LoadFailedFrame(reason="no such model")])
    await harness.wait(lambda: reader.reader_id in harness.events.load_failed, "the load failure")
    assert "no such model" in harness.events.load_failed[reader.reader_id]


async def one_started_one_waiting(harness: Harness, name: str) -> tuple[TestReader, str, str, TestReader]:
    """A reader holding two requests, the first of which has started answering, and a second reader of its group."""
    holder = await harness.reader(name, capacity=2)
    started, waiting = harness.submit("started"), harness.submit("waiting")
    await holder.frames(2)
    holder.send(tokens(started, 1))
    await harness.wait(lambda: started in harness.events.outputs, "the first token")
    survivor = await harness.reader("survivor", capacity=2)
    return holder, started, waiting, survivor


async def started_failed_and_waiting_moved(harness: Harness, started: str, waiting: str, survivor: TestReader) -> None:
    """The started request ended with ``reader_died``; the waiting one went to ``survivor``."""
    error = await harness.final(started)
    assert isinstance(error, ErrorFrame)
    assert error.error_type == "reader_died"
    (frame,) = await survivor.frames(1)
    assert isinstance(frame, RequestFrame)
    assert frame.request_id == waiting


async def test_a_dead_readers_started_requests_fail_and_the_others_run_elsewhere(harness: Harness) -> None:
    doomed, started, waiting, survivor = await one_started_one_waiting(harness, "doomed")
    await doomed.close()  # the reader goes away without finishing
    await started_failed_and_waiting_moved(harness, started, waiting, survivor)
    survivor.send([*tokens(waiting, 1), FinalFrame(request_id=waiting, seq=1, finish_reason="stop")])
    assert isinstance(await harness.final(waiting), FinalFrame)
    assert [f.seq for f in harness.events.outputs[waiting]] == [0, 1]
    await harness.wait(lambda: "doomed" in harness.events.lost, "the loss to be reported")


async def test_an_evicted_reader_is_treated_as_dead(harness: Harness) -> None:
    silent, started, waiting, survivor = await one_started_one_waiting(harness, "silent")
    harness.broker.evict_reader("silent", "silent for too long")
    await started_failed_and_waiting_moved(harness, started, waiting, survivor)
    silent.send(tokens(started, 2, start=1))  # too late: dropped
    survivor.send([FinalFrame(request_id=waiting, seq=0, finish_reason="stop")])
    assert isinstance(await harness.final(waiting), FinalFrame)
    assert len(harness.events.outputs[started]) == 2  # the token and the error


@pytest.mark.parametrize("kind", BROKERS)
async def test_without_retries_a_dead_readers_waiting_requests_fail(request: pytest.FixtureRequest, kind: str) -> None:
    harness = await make(request, max_retries=0)
    try:
        doomed = await harness.reader("doomed")
        await harness.reader("survivor")
        waiting = harness.submit("waiting")
        await harness.wait(lambda: any(r.received for r in harness.readers), "a delivery")
        holder = next(r for r in harness.readers if r.received)
        await holder.close()
        error = await harness.final(waiting)
        assert isinstance(error, ErrorFrame)
        assert error.error_type == "reader_died"
        assert doomed in harness.readers
    finally:
        await harness.close()


async def _only_reader_with_a_queued_request(harness: Harness) -> tuple[TestReader, str]:
    """A group's only reader, busy (one running, one prefetched), and the id of a request waiting behind them."""
    only = await harness.reader("only", capacity=1)
    harness.submit("running")
    harness.submit("prefetched")
    queued = harness.submit("queued")
    await only.frames(2)
    return only, queued


async def test_the_last_readers_death_fails_its_groups_waiting_requests_at_once(harness: Harness) -> None:
    only, queued = await _only_reader_with_a_queued_request(harness)
    await only.close()
    error = await harness.final(queued, within_s=5)
    assert isinstance(error, ErrorFrame)
    assert error.error_type in {"unavailable", "reader_died"}


async def test_stopping_a_reader_sends_it_a_stop_frame(harness: Harness) -> None:
    reader = await harness.reader()
    harness.broker.stop_reader(reader.reader_id, "the reader was deleted")
    frames = await reader.frames(1)
    assert frames[-1] == StopFrame(reason="the reader was deleted")


async def test_stopping_the_last_reader_fails_its_groups_waiting_requests_at_once(harness: Harness) -> None:
    _, queued = await _only_reader_with_a_queued_request(harness)
    harness.broker.stop_reader("only", "the reader was deleted")
    error = await harness.final(queued, within_s=5)
    assert isinstance(error, ErrorFrame)
    assert error.error_type == "unavailable"


async def test_a_group_the_gateway_holds_keeps_its_waiting_requests_for_a_reader_that_comes_back(
    harness: Harness,
) -> None:
    harness.broker.holding = lambda group: group == "primary"  # as while the gateway restarts its reader
    only, queued = await _only_reader_with_a_queued_request(harness)
    await only.close()
    await harness.wait(lambda: "only" in harness.events.lost, "the loss to be reported")
    harness.broker.settle("primary")  # still held: nothing fails
    back = await harness.reader("back", capacity=4)
    await harness.wait(lambda: any(f.request_id == queued for f in back.requests()), "the reader back to get it")
    back.send([FinalFrame(request_id=queued, seq=0, finish_reason="stop")])
    assert isinstance(await harness.final(queued), FinalFrame)


async def test_a_group_no_longer_held_fails_its_waiting_requests_when_it_settles(harness: Harness) -> None:
    holding = {"primary"}
    harness.broker.holding = lambda group: group in holding
    only, queued = await _only_reader_with_a_queued_request(harness)
    await only.close()
    await harness.wait(lambda: "only" in harness.events.lost, "the loss to be reported")
    assert harness.events.final(queued) is None
    holding.clear()  # the restart was given up
    harness.broker.settle("primary")
    error = await harness.final(queued, within_s=5)
    assert isinstance(error, ErrorFrame)
    assert error.error_type == "unavailable"
