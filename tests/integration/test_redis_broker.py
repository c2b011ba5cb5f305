"""What only the Redis broker does: survive Redis going away, share readers between gateways, and find dead
readers and gateways through the shared registry (the contract both brokers keep is in test_broker_contract)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from liftoff.core.errors import BrokerUnavailableError
from liftoff.core.frames import (
    AbortFrame,
    ErrorFrame,
    FinalFrame,
    HeartbeatFrame,
    RequestFrame,
    StopFrame,
    TokenFrame,
    encode_frames,
)
from tests.integration.broker_harness import Harness
from tests.integration.test_broker_contract import settings
from tests.redis_server import RedisServer


@pytest.fixture
async def gateway(redis_server: RedisServer) -> AsyncIterator[Harness]:
    harness = await Harness("redis", settings(), redis_server.url).start()
    try:
        yield harness
    finally:
        await harness.close()


async def second_gateway(redis_server: RedisServer, **changes: object) -> Harness:
    return await Harness("redis", settings(**changes), redis_server.url).start()


async def test_a_lost_redis_fails_requests_at_once_and_everything_reconnects(
    gateway: Harness, redis_server: RedisServer
) -> None:
    reader = await gateway.reader("r1")
    running = gateway.submit("running")
    await reader.frames(1)
    redis_server.stop()
    error = await gateway.final(running, within_s=5)
    assert isinstance(error, ErrorFrame)
    assert error.error_type == "broker_unavailable"
    await gateway.wait(lambda: not gateway.broker._up, "the gateway to notice")  # type: ignore[attr-defined]
    with pytest.raises(BrokerUnavailableError, match="unreachable"):
        gateway.submit("while Redis is down")
    assert "lost Redis" in await reader.link_closed()
    redis_server.start()  # empty, as after a restart without persistence
    await gateway.wait(lambda: gateway.broker._up, "the gateway to reconnect", within_s=15)  # type: ignore[attr-defined]
    await gateway.round_trip(await gateway.reader("r1-again"), "after")


async def test_a_gateway_started_before_redis_serves_once_redis_is_up(tmp_path_factory: pytest.TempPathFactory) -> None:
    server = RedisServer(tmp_path_factory.mktemp("late-redis"))
    harness = await Harness("redis", settings(), server.url).start()
    try:
        with pytest.raises(BrokerUnavailableError):
            harness.submit("too early")
        server.start()
        await harness.wait(lambda: harness.broker._up, "the gateway to connect", within_s=15)  # type: ignore[attr-defined]
        await harness.round_trip(await harness.reader(), "now")
    finally:
        await harness.close()
        server.stop()


async def test_two_gateways_share_readers_and_see_the_same_registry(
    gateway: Harness, redis_server: RedisServer
) -> None:
    other = await second_gateway(redis_server, reserved_groups=frozenset({"batch"}))
    try:
        reader = await gateway.reader("shared")
        await other.wait(lambda: "shared" in other.events.live, "the other gateway to see the reader")
        from_other = other.submit("via the other gateway")
        from_first = gateway.submit("via the first gateway")
        await reader.frames(2)
        for request_id in (from_other, from_first):
            reader.send([TokenFrame(request_id=request_id, seq=0, text="x"),
                         FinalFrame(request_id=request_id, seq=1, finish_reason="stop")])  # fmt: skip
        assert isinstance(await other.final(from_other), FinalFrame)
        assert isinstance(await gateway.final(from_first), FinalFrame)
        assert from_first not in other.events.outputs  # each gateway hears only its own requests
        await gateway.wait(lambda: "batch" in gateway.broker.reserved_groups(["primary"]), "the shared reserved list")
        assert gateway.broker.reserved_groups(["primary"]) == ["primary", "batch"]
        other.broker.stop_reader("shared", "the reader was deleted")  # deleted through the other gateway
        await gateway.wait(lambda: "shared" in gateway.events.removed, "the deletion to reach the first gateway")
        assert isinstance((await reader.frames(3))[-1], type(reader.received[-1]))
    finally:
        await other.close()


async def test_a_reader_silent_with_requests_in_flight_is_declared_dead_and_registers_again(
    redis_server: RedisServer,
) -> None:
    harness = await Harness("redis", settings(reader_message_timeout_ms=300), redis_server.url).start()
    try:
        reader = await harness.reader("quiet")
        started = harness.submit("started")
        await reader.frames(1)
        reader.send([TokenFrame(request_id=started, seq=0, text="a")])
        error = await harness.final(started, within_s=5)  # no heartbeat, no frame: silent
        assert isinstance(error, ErrorFrame)
        assert error.error_type == "reader_died"
        assert "silent" in harness.events.lost["quiet"]
        reader.send([HeartbeatFrame(timestamp_ms=1)])  # it speaks again and learns that it was declared dead
        assert "declared this reader dead" in await reader.link_closed()
    finally:
        await harness.close()


async def test_a_reader_aborts_the_requests_of_a_gateway_that_is_gone(
    gateway: Harness, redis_server: RedisServer
) -> None:
    reader = await gateway.reader("orphaned")
    frame = RequestFrame(request_id="from-a-dead-gateway", consumer_group="primary", text="x")
    with redis_server.client() as client:  # a request whose gateway has no liveness key (it died)
        client.xadd("liftoff:q:primary", {"f": encode_frames([frame]), "gw": "gw-dead"})
    frames = await reader.frames(2, within_s=5)
    assert frames == [frame, AbortFrame(request_id="from-a-dead-gateway")]


async def test_the_streams_hold_only_what_is_waiting_or_running(gateway: Harness, redis_server: RedisServer) -> None:
    reader = await gateway.reader(capacity=4)
    request_ids = [gateway.submit(f"p{i}") for i in range(5)]
    await reader.frames(5)
    for request_id in request_ids:
        reader.send([FinalFrame(request_id=request_id, seq=0, finish_reason="stop")])
    for request_id in request_ids:
        await gateway.final(request_id)
    with redis_server.client() as client:
        await gateway.wait(lambda: client.xlen("liftoff:q:primary") == 0, "the queue stream to empty")
        assert client.xpending("liftoff:q:primary", "primary")["pending"] == 0
        reply = f"liftoff:r:{gateway.settings.gateway_id}"
        await gateway.wait(lambda: client.xlen(reply) <= 1, "the reply stream to be trimmed")


async def test_entries_that_are_not_liftoffs_are_dropped_and_everything_goes_on(
    gateway: Harness, redis_server: RedisServer
) -> None:
    with redis_server.client() as client:  # junk in the queue, the reply stream and the registry
        client.xadd("liftoff:q:primary", {"f": b"\x01not msgpack frames", "gw": "x"})
        client.xadd("liftoff:q:primary", {"something": "else"})
        client.xadd(f"liftoff:r:{gateway.settings.gateway_id}", {"f": b"\xc1", "rd": "nobody"})
        client.sadd("liftoff:readers", "junk")
        client.hset("liftoff:reader:junk", mapping={"register": b"\x00\x01", "state": "live"})
    await gateway.round_trip(await gateway.reader("after-junk"), "still works")
    assert "junk" not in gateway.events.registered
    with redis_server.client() as client:
        await gateway.wait(lambda: client.xlen("liftoff:q:primary") == 0, "the junk entries to be dropped")


async def test_consumers_of_dead_readers_are_deleted_once_they_hold_nothing(
    gateway: Harness, redis_server: RedisServer
) -> None:
    from liftoff.broker.redis.common import connect
    from liftoff.broker.redis.reclaim import forget_dead_consumers

    gone = await gateway.reader("gone")
    stays = await gateway.reader("stays")
    await gone.close()
    client = connect(redis_server.url)
    try:

        async def consumers() -> int:  # a reader is a consumer from its first XREADGROUP on
            return len(await client.xinfo_consumers("liftoff:q:primary", "primary"))

        assert await consumers() == 2
        assert await forget_dead_consumers(client, "primary", idle_ms=0) == 1
        left = {c["name"].decode() for c in await client.xinfo_consumers("liftoff:q:primary", "primary")}
        assert left == {stays.register_frame().info.consumer_name}
    finally:
        await client.aclose()


async def test_a_stop_left_for_an_earlier_process_of_a_reader_id_is_ignored(
    gateway: Harness, redis_server: RedisServer
) -> None:
    with redis_server.client() as client:  # the reader "again" was deleted while its process was already gone
        stop = encode_frames([StopFrame(reason="the reader was deleted")])
        client.xadd("liftoff:ctl:again", {"f": stop, "to": "again@elsewhere:1"})
    reader = await gateway.reader("again")  # created anew with the same id
    await gateway.round_trip(reader, "hello")  # it serves: the old stop was not for it
    assert not any(isinstance(frame, StopFrame) for frame in reader.received)
    gateway.broker.stop_reader("again", "deleted for real")
    frames = await reader.frames(2)
    assert frames[-1] == StopFrame(reason="deleted for real")


def test_an_entry_is_acknowledged_only_by_the_consumer_that_holds_it(redis_server: RedisServer) -> None:
    from liftoff.broker.redis.common import ACK_IF_MINE

    with redis_server.client() as client:
        client.xgroup_create("liftoff:q:g", "g", id="0", mkstream=True)
        entry = client.xadd("liftoff:q:g", {"f": b"x"})
        client.xreadgroup("g", "old", {"liftoff:q:g": ">"})
        client.xclaim("liftoff:q:g", "g", "new", 0, [entry])  # re-claimed: "new" holds it now
        assert client.eval(ACK_IF_MINE, 1, "liftoff:q:g", "g", entry, "old") == 0
        assert client.xpending("liftoff:q:g", "g")["pending"] == 1
        assert client.eval(ACK_IF_MINE, 1, "liftoff:q:g", "g", entry, "new") == 1
        assert client.xpending("liftoff:q:g", "g")["pending"] == 0
        assert client.xlen("liftoff:q:g") == 0
