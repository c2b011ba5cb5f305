"""The internal port (``liftoff.gateway.surfaces.internal``) and the real embedded broker (``liftoff.broker.embedded``)
in process: a reader played by the test connects to the internal port's app over an in-process WebSocket, registers,
loads and answers the requests that clients send to the other ports' apps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from liftoff.broker.embedded.gateway import EmbeddedBroker
from liftoff.core.clock import now_ms
from liftoff.core.frames import (
    AbortFrame,
    FinalFrame,
    HeartbeatFrame,
    LoadedFrame,
    RegisterFrame,
    RequestFrame,
    ResultFrame,
    TokenFrame,
    WelcomeFrame,
)
from liftoff.core.ids import consumer_name
from liftoff.core.types import ReaderInfo, ReaderState
from liftoff.gateway.apps import PORT_SURFACES, build_app
from liftoff.gateway.state import GatewayState
from tests.unit.asgi_websocket import ClosedError, ReaderSocket
from tests.unit.inprocess import asgi_client, build_state, make_config, sse_data
from tests.unit.test_surface_native import check_error, until

SECRET = "reader-secret-0123456789"
PATIENT = {"reader_message_timeout_ms": 30_000}  # a loaded test machine's pauses are not a silent reader's


class Embedded:
    """Every port's app of a gateway whose broker is the embedded one (readers connect to ``internal_port``)."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.apps = {key: build_app(key, state) for key in PORT_SURFACES}

    def post(self, path: str, body: Any, port_key: str = "port") -> asyncio.Task[Any]:
        async def send() -> Any:
            async with asgi_client(
                self.apps[port_key], f"http://localhost:{getattr(self.state.config, port_key)}"
            ) as c:
                return await c.post(path, json=body)

        return asyncio.create_task(send())

    def reader(self, headers: dict[str, str] | None = None) -> ReaderSocket:
        return ReaderSocket(self.apps["internal_port"], headers)

    def state_of(self, reader_id: str) -> ReaderState | None:
        record = self.state.registry.get(reader_id)
        return None if record is None else record.state


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[Embedded]:
    state, _ = build_state(make_config(tmp_path, request_timeout_s=5, **PATIENT), fake_broker=False)
    assert isinstance(state.broker, EmbeddedBroker)
    await state.broker.start()
    yield Embedded(state)
    await state.manager.shutdown()
    await state.broker.close()


def register(reader_id: str = "r1", *, loaded: bool = False, capacity: int = 0) -> RegisterFrame:
    info = ReaderInfo(
        consumer_groups=["primary"],
        consumer_name=consumer_name(reader_id),
        device="cpu",
        model_name="echo",
        model_type="CAUSAL",
        pids=[4242],
    )
    config = {"model_name": "echo", "device": "cpu"}
    return RegisterFrame(
        reader_id=reader_id, info=info, config=config, heartbeat_interval_ms=1000, loaded=loaded, capacity=capacity
    )


async def live_reader(gateway: Embedded, reader: ReaderSocket, reader_id: str = "r1") -> WelcomeFrame:
    """Register and load ``reader_id`` over ``reader``; the gateway's welcome."""
    await reader.send(register(reader_id))
    [welcome] = await reader.receive()
    assert isinstance(welcome, WelcomeFrame)
    assert gateway.state_of(reader_id) is ReaderState.LOADING
    await reader.send(LoadedFrame(model_type="CAUSAL", capacity=2), HeartbeatFrame(timestamp_ms=now_ms()))
    await until(lambda: gateway.state_of(reader_id) is ReaderState.LIVE)
    return welcome


async def request_of(reader: ReaderSocket) -> RequestFrame:
    [frame] = await reader.receive()
    assert isinstance(frame, RequestFrame)
    return frame


async def test_a_reader_registers_loads_and_serves_a_generation(embedded: Embedded) -> None:
    async with embedded.reader() as reader:
        welcome = await live_reader(embedded, reader)
        assert welcome.gateway_id == embedded.state.broker.settings.gateway_id
        answer = embedded.post("/generate", {"text": "hi there", "return_metadata": True})
        request = await request_of(reader)
        assert (request.consumer_group, request.text) == ("primary", "hi there")
        rid = request.request_id
        await reader.send(
            TokenFrame(request_id=rid, seq=0, text="hi"), TokenFrame(request_id=rid, seq=1, text=" there")
        )
        await reader.send(
            FinalFrame(
                request_id=rid, seq=2, finish_reason="stop", prompt_tokens=2, completion_tokens=2, reader_id="r1"
            )
        )
        response = await answer
    assert response.json() == {
        "text": "hi there",
        "metadata": {"prompt_tokens": 2, "completion_tokens": 2, "finish_reason": "stop", "reader_id": "r1"},
    }
    assert embedded.state_of("r1") is ReaderState.DEAD  # its link closed with the test's reader
    async with asgi_client(embedded.apps["management_port"], "http://localhost:3001") as http:
        status = (await http.get("/status")).json()["status"]
    assert list(status["dead_readers"]) == ["r1"]
    assert status["dead_readers"]["r1"]["pids"] == []


async def test_a_stream_through_the_embedded_broker(embedded: Embedded) -> None:
    async with embedded.reader() as reader:
        await live_reader(embedded, reader)
        answer = embedded.post(
            "/v1/completions", {"model": "primary", "prompt": "a b", "stream": True}, port_key="openai_port"
        )
        rid = (await request_of(reader)).request_id
        await reader.send(
            TokenFrame(request_id=rid, seq=0, text="a"),
            TokenFrame(request_id=rid, seq=1, text=" b"),
            FinalFrame(request_id=rid, seq=2, finish_reason="length"),
        )
        response = await answer
    events = sse_data(response.text)
    assert events[-1] == ("message", "[DONE]")
    assert len(events) == 3  # one chunk for both pieces (they came in one message), one with the finish reason


async def test_a_request_past_its_deadline_is_aborted_at_the_reader(tmp_path: Path) -> None:
    state, _ = build_state(make_config(tmp_path, request_timeout_s=0.2, **PATIENT), fake_broker=False)
    await state.broker.start()
    gateway = Embedded(state)
    try:
        async with gateway.reader() as reader:
            await live_reader(gateway, reader)
            answer = gateway.post("/generate", {"text": "never answered"})
            request = await request_of(reader)
            check_error(await answer, 504, "timeout")
            assert await reader.receive() == [AbortFrame(request_id=request.request_id)]
    finally:
        await state.manager.shutdown()
        await state.broker.close()


async def test_a_reader_lost_mid_request_fails_it_with_reader_died(embedded: Embedded) -> None:
    async with embedded.reader() as reader:
        await live_reader(embedded, reader)
        answer = embedded.post("/generate", {"text": "half"})
        rid = (await request_of(reader)).request_id
        await reader.send(TokenFrame(request_id=rid, seq=0, text="ha"))
        await until(lambda: embedded.state.broker.in_flight("primary") == 1)
    check_error(await answer, 503, "reader_died")
    assert embedded.state.registry.records["r1"].error == "the reader disconnected"


async def test_tokenizer_services_go_to_the_reader_named(embedded: Embedded) -> None:
    async with embedded.reader() as reader:
        await live_reader(embedded, reader)
        answer = embedded.post("/tokenize/r1", {"text": "Hello world"})
        request = await request_of(reader)
        assert (request.reader_id, request.kind, request.payload) == ("r1", "tokenize", {"text": "Hello world"})
        await reader.send(
            ResultFrame(request_id=request.request_id, seq=0, data={"tokens": ["Hello", " world"], "tokens_count": 2})
        )
        assert (await answer).json() == {"tokens": ["Hello", " world"], "tokens_count": 2}


async def test_handshakes_the_broker_refuses(embedded: Embedded) -> None:
    async with embedded.reader() as first:
        await first.send(register("twin", loaded=True, capacity=1))
        assert isinstance((await first.receive())[0], WelcomeFrame)
        assert embedded.state_of("twin") is ReaderState.LIVE  # registered as loaded: live at once
        async with embedded.reader() as second:
            await second.send(register("twin"))
            with pytest.raises(ClosedError) as duplicate:
                await second.receive()
    assert duplicate.value.code == 4409
    async with embedded.reader() as confused:
        await confused.send(HeartbeatFrame(timestamp_ms=now_ms()))
        with pytest.raises(ClosedError) as protocol:
            await confused.receive()
    assert protocol.value.code == 4400
    with pytest.raises(ClosedError) as page:
        async with embedded.reader({"origin": "http://localhost:3000"}):
            pass
    assert page.value.code == 4403


async def test_the_reader_secret_guards_the_internal_port(tmp_path: Path) -> None:
    state, _ = build_state(make_config(tmp_path, reader_secret=SECRET, **PATIENT), fake_broker=False)
    await state.broker.start()
    gateway = Embedded(state)
    try:
        for headers in ({}, {"authorization": "Bearer not-the-secret"}):
            with pytest.raises(ClosedError) as refused:
                async with gateway.reader(headers):
                    pass
            assert (refused.value.code, refused.value.reason) == (1008, "unauthorized")
        async with gateway.reader({"authorization": f"Bearer {SECRET}"}) as reader:
            await live_reader(gateway, reader)
    finally:
        await state.manager.shutdown()
        await state.broker.close()
