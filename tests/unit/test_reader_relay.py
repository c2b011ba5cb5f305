"""``liftoff.reader.relay.Relay``: requests as tasks on the relay's loop, capacity, aborts, frames, health.

The backend is a double of the real :class:`RemoteBackend` contract that streams words with a delay (the upstream
itself is exercised in tests/integration and tests/models against real servers).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from liftoff.backends.base import ProgressCallback, RemoteBackend, StepOutput
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import NotSupportedError
from liftoff.core.frames import ErrorFrame, FinalFrame, RequestFrame, ResultFrame, TokenFrame
from liftoff.core.types import FinishReason, GenerationParams, ModelType, RequestKind
from liftoff.reader.relay import Relay


class Words(RemoteBackend):
    """Streams the prompt's words back, ``delay_s`` apart; records how many run at once."""

    name = "words"

    def __init__(self, capacity: int = 2, delay_s: float = 0.01) -> None:
        super().__init__(ReaderConfig(model_name="words", device="api", max_concurrency=capacity))
        self.capacity = capacity
        self.delay_s = delay_s
        self.running = 0
        self.most = 0
        self.closed_streams = 0
        self.unhealthy = ""

    @property
    def model_type(self) -> ModelType:
        return ModelType.API

    def load(self, progress: ProgressCallback) -> None:
        progress(1.0)

    async def open(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def watch(self) -> None:
        await asyncio.Event().wait()

    def health(self) -> str:
        return self.unhealthy

    async def generate(self, request_id: str, text: str, params: GenerationParams) -> AsyncGenerator[StepOutput, None]:
        if params.regex_string:
            raise NotSupportedError("regex_string is not supported here")
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            words = text.split()[: params.max_new_tokens]
            for word in words:
                await asyncio.sleep(self.delay_s)
                yield StepOutput(request_id, text=word + " ", n_tokens=1)
            yield StepOutput(request_id, finish_reason=FinishReason.STOP, completion_tokens=len(words))
        finally:
            self.running -= 1
            self.closed_streams += 1

    async def embed(self, inputs: list[str], truncate: bool | None) -> tuple[list[bytes], list[int]]:
        return [b"\x00\x00\x80\x3f" for _ in inputs], [len(text.split()) for text in inputs]


class Collected:
    """What the relay emitted, by request."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, frames: list[Any]) -> None:
        with self._lock:
            self.frames.extend(frames)
            self.calls += 1

    def of(self, request_id: str) -> list[Any]:
        with self._lock:
            return [frame for frame in self.frames if frame.request_id == request_id]

    def ended(self, request_id: str, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.of(request_id)[-1:] or [None]
            if isinstance(last[0], FinalFrame | ErrorFrame | ResultFrame):
                return last[0]
            time.sleep(0.005)
        raise AssertionError(f"request {request_id} did not end: {self.of(request_id)}")


@pytest.fixture
def relay_of() -> Any:
    started: list[Relay] = []

    def make(backend: Words) -> tuple[Relay, Collected]:
        out = Collected()
        relay = Relay(backend, out, "r1")
        relay.start()
        started.append(relay)
        return relay, out

    yield make
    for relay in started:
        relay.stop()


def request(request_id: str, text: str = "a b c", **params: Any) -> RequestFrame:
    return RequestFrame(request_id=request_id, consumer_group="g", text=text, params=GenerationParams(**params))


def test_a_stream_becomes_numbered_token_frames_and_a_final(relay_of: Any) -> None:
    relay, out = relay_of(Words())
    relay.submit(request("x"))
    final = out.ended("x")
    frames = out.of("x")
    assert [frame.text for frame in frames if isinstance(frame, TokenFrame)] == ["a ", "b ", "c "]
    assert [frame.seq for frame in frames] == [0, 1, 2, 3]
    assert final.finish_reason == FinishReason.STOP
    assert final.completion_tokens == 3
    assert final.reader_id == "r1"
    assert relay.stats()["tokens"] == 3


def test_at_most_capacity_run_at_once_and_the_rest_wait_their_turn(relay_of: Any) -> None:
    backend = Words(capacity=2)
    relay, out = relay_of(backend)
    for index in range(5):
        relay.submit(request(f"r{index}", "w " * 5))
    for index in range(5):
        out.ended(f"r{index}")
    assert backend.most == 2
    assert relay.in_flight == 0


def test_an_abort_cancels_the_stream_and_ends_the_request(relay_of: Any) -> None:
    backend = Words(delay_s=0.05)
    relay, out = relay_of(backend)
    relay.submit(request("long", "w " * 200, max_new_tokens=200))
    relay.submit(request("queued", "q"))  # capacity 2: runs beside it
    while not out.of("long"):
        time.sleep(0.005)
    relay.abort("long")
    final = out.ended("long")
    assert final.finish_reason == FinishReason.ABORTED
    assert final.seq == len(out.of("long")) - 1
    assert backend.closed_streams >= 1  # the upstream stream was closed, not left running
    assert out.ended("queued").finish_reason == FinishReason.STOP


def test_abort_all_and_a_request_waiting_for_a_slot(relay_of: Any) -> None:
    backend = Words(capacity=1, delay_s=0.05)
    relay, out = relay_of(backend)
    relay.submit(request("first", "w " * 100, max_new_tokens=100))
    relay.submit(request("second", "w " * 100, max_new_tokens=100))
    while not out.of("first"):
        time.sleep(0.005)
    relay.abort_all()
    assert out.ended("first").finish_reason == FinishReason.ABORTED
    assert out.ended("second").finish_reason == FinishReason.ABORTED
    assert out.of("second")[0].seq == 0  # it never started


def test_a_refusal_is_an_error_frame(relay_of: Any) -> None:
    relay, out = relay_of(Words())
    relay.submit(request("bad", regex_string="[a-z]"))
    error = out.ended("bad")
    assert isinstance(error, ErrorFrame)
    assert error.error_type == "not_supported"
    assert relay.stats()["upstream_failures"] == 1


def test_embeddings_are_one_result_frame(relay_of: Any) -> None:
    relay, out = relay_of(Words())
    frame = RequestFrame(request_id="e", consumer_group="g", kind=RequestKind.EMBED, payload={"inputs": ["a b", "c"]})
    relay.submit(frame)
    result = out.ended("e")
    assert result.data["tokens"] == [2, 1]
    assert result.data["rows"] == [b"\x00\x00\x80\x3f"] * 2
    pairs = RequestFrame(request_id="p", consumer_group="g", kind=RequestKind.EMBED, payload={"inputs": [["a", "b"]]})
    relay.submit(pairs)
    assert out.ended("p").error_type == "invalid_request"


def test_health_is_the_backends_and_frames_of_one_turn_leave_together(relay_of: Any) -> None:
    backend = Words(capacity=8, delay_s=0.02)
    relay, out = relay_of(backend)
    assert relay.health() == ""
    backend.unhealthy = "upstream down"
    assert relay.health() == "upstream down"
    for index in range(8):
        relay.submit(request(f"b{index}", "w " * 10))
    for index in range(8):
        out.ended(f"b{index}")
    assert out.calls < len(out.frames)  # streams stepping together are emitted together
