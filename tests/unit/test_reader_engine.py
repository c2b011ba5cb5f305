"""``liftoff.reader.engine.Engine`` driving an ``EchoBackend`` on its thread: frames, capacity, aborts, errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from liftoff.backends.base import GenerativeBackend, StepOutput
from liftoff.backends.echo import EchoBackend
from liftoff.config.models import ReaderConfig
from liftoff.core.frames import ErrorFrame, FinalFrame, RequestFrame, TokenFrame
from liftoff.core.types import GenerationParams
from liftoff.reader.engine import Engine

READER_ID = "reader-1"
FOREVER = GenerationParams(ignore_eos=True, max_new_tokens=10**9)


class Frames:
    """A thread-safe list of every emitted frame, with waiting."""

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._cond = threading.Condition()
        self.batches = 0

    def emit(self, frames: list[Any]) -> None:
        with self._cond:
            self._items.extend(frames)
            self.batches += 1
            self._cond.notify_all()

    def all(self) -> list[Any]:
        with self._cond:
            return list(self._items)

    def of(self, request_id: str) -> list[Any]:
        return [frame for frame in self.all() if getattr(frame, "request_id", None) == request_id]

    def wait(self, predicate: Callable[[list[Any]], bool], timeout: float = 5.0) -> list[Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self._items), timeout):
                raise AssertionError(f"timed out; frames so far: {self._items!r}")
            return list(self._items)

    def wait_final(self, request_id: str, timeout: float = 5.0) -> Any:
        """Wait for the last frame (final or error) of a request."""

        def ended(items: list[Any]) -> bool:
            return any(isinstance(f, FinalFrame | ErrorFrame) and f.request_id == request_id for f in items)

        self.wait(ended, timeout)
        return next(f for f in self.of(request_id) if isinstance(f, FinalFrame | ErrorFrame))

    def tokens(self, request_id: str) -> list[TokenFrame]:
        return [frame for frame in self.of(request_id) if isinstance(frame, TokenFrame)]


def request(request_id: str, text: str, params: GenerationParams | None = None) -> RequestFrame:
    return RequestFrame(request_id=request_id, consumer_group="primary", text=text, params=params or GenerationParams())


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


StartEngine = Callable[..., tuple[Engine, Frames]]


@pytest.fixture
def start_engine() -> Iterator[StartEngine]:
    """Start engines over echo backends (or a given backend); every one is stopped afterwards."""
    engines: list[Engine] = []

    def start(batch: int = 8, backend: GenerativeBackend | None = None, **fields: Any) -> tuple[Engine, Frames]:
        if backend is None:
            config = ReaderConfig.model_validate(
                {"model_name": "echo", "device": "cpu", "max_batch_size": batch, **fields}
            )
            backend = EchoBackend(config)
        frames = Frames()
        engine = Engine(backend, frames.emit, reader_id=READER_ID)
        engines.append(engine)
        engine.start()
        return engine, frames

    yield start
    for engine in engines:
        engine.stop()


def test_tokens_have_consecutive_seqs_and_final_carries_counts(start_engine: StartEngine) -> None:
    engine, frames = start_engine()
    engine.submit(request("q", "one two three"))
    final = frames.wait_final("q")
    tokens = frames.tokens("q")
    assert [token.seq for token in tokens] == [0, 1, 2]
    assert "".join(token.text for token in tokens) == "one two three"
    assert all(token.n_tokens == 1 for token in tokens)
    assert isinstance(final, FinalFrame)
    assert final.seq == 3  # the final frame continues the sequence numbers
    assert final.finish_reason == "stop"
    assert (final.prompt_tokens, final.completion_tokens) == (3, 3)
    assert final.reader_id == READER_ID
    assert frames.of("q")[-1] is final


def test_length_finish(start_engine: StartEngine) -> None:
    engine, frames = start_engine()
    engine.submit(request("q", "one two three", GenerationParams(max_new_tokens=2)))
    final = frames.wait_final("q")
    assert [token.seq for token in frames.tokens("q")] == [0, 1]
    assert final.seq == 2
    assert final.finish_reason == "length"
    assert final.completion_tokens == 2


def test_concurrent_requests_number_their_own_frames(start_engine: StartEngine) -> None:
    engine, frames = start_engine()
    texts = {f"q{index}": " ".join(f"w{index}.{word}" for word in range(index + 2)) for index in range(5)}
    for request_id, text in texts.items():
        engine.submit(request(request_id, text))
    for request_id, text in texts.items():
        final = frames.wait_final(request_id)
        tokens = frames.tokens(request_id)
        assert [token.seq for token in tokens] == list(range(len(tokens)))
        assert "".join(token.text for token in tokens) == text
        assert final.seq == len(tokens)


def test_requests_beyond_capacity_wait_and_are_admitted_later(start_engine: StartEngine) -> None:
    engine, frames = start_engine(batch=1)
    engine.submit(request("a", "one two three"))
    engine.submit(request("b", "four five"))
    frames.wait_final("b")
    order = frames.all()
    final_a = next(i for i, f in enumerate(order) if f.request_id == "a" and isinstance(f, FinalFrame))
    first_b = next(i for i, f in enumerate(order) if f.request_id == "b")
    assert first_b > final_a  # b only started once a freed the single slot
    assert "".join(token.text for token in frames.tokens("b")) == "four five"
    assert [token.seq for token in frames.tokens("b")] == [0, 1]


def test_requests_within_capacity_run_together(start_engine: StartEngine) -> None:
    engine, frames = start_engine(batch=2, backend_options={"token_delay_ms": 1})
    engine.submit(request("a", " ".join(["word"] * 30)))
    engine.submit(request("b", "four five six"))
    frames.wait_final("a")
    frames.wait_final("b")
    order = frames.all()
    final_a = next(i for i, f in enumerate(order) if f.request_id == "a" and isinstance(f, FinalFrame))
    first_b = next(i for i, f in enumerate(order) if f.request_id == "b")
    assert first_b < final_a


def test_abort_running_request(start_engine: StartEngine) -> None:
    engine, frames = start_engine(backend_options={"token_delay_ms": 1})
    engine.submit(request("q", "la la", FOREVER))
    frames.wait(lambda items: sum(f.request_id == "q" for f in items) >= 3)
    engine.abort("q")
    final = frames.wait_final("q")
    assert isinstance(final, FinalFrame)
    assert final.finish_reason == "aborted"
    assert final.reader_id == READER_ID
    engine.submit(request("barrier", "x"))  # once this is done, the engine has stepped past the abort
    frames.wait_final("barrier")
    assert frames.of("q")[-1] == final  # nothing after the final frame
    assert final.seq == len(frames.tokens("q"))


def test_abort_waiting_request(start_engine: StartEngine) -> None:
    config = ReaderConfig(model_name="echo", device="cpu", max_batch_size=1, backend_options={"token_delay_ms": 1})
    backend = EchoBackend(config)
    engine, frames = start_engine(backend=backend)
    engine.submit(request("running", "la la", FOREVER))
    frames.wait(lambda items: any(f.request_id == "running" for f in items))
    engine.submit(request("waiting", "never started", FOREVER))
    engine.abort("waiting")
    final = frames.wait_final("waiting")
    assert isinstance(final, FinalFrame)
    assert final.finish_reason == "aborted"
    assert final.seq == 0
    engine.abort("running")
    assert frames.wait_final("running").finish_reason == "aborted"
    engine.submit(request("barrier", "x"))  # takes the single slot only if the aborted request is really gone
    assert frames.wait_final("barrier").finish_reason == "stop"
    assert frames.of("waiting") == [final]
    assert backend.active() == 0


def test_abort_of_unknown_or_finished_request_emits_nothing(start_engine: StartEngine) -> None:
    engine, frames = start_engine()
    engine.submit(request("done", "a b"))
    frames.wait_final("done")
    before = len(frames.of("done"))
    engine.abort("done")
    engine.abort("ghost")
    engine.submit(request("barrier", "x"))
    frames.wait_final("barrier")
    assert len(frames.of("done")) == before
    assert frames.of("ghost") == []


def test_abort_all(start_engine: StartEngine) -> None:
    engine, frames = start_engine(batch=1, backend_options={"token_delay_ms": 1})
    engine.submit(request("a", "la", FOREVER))
    engine.submit(request("b", "la", FOREVER))
    frames.wait(lambda items: any(f.request_id == "a" for f in items))
    engine.abort_all()
    assert frames.wait_final("a").finish_reason == "aborted"
    assert frames.wait_final("b").finish_reason == "aborted"
    assert frames.tokens("b") == []


def test_admit_error_becomes_error_frame(start_engine: StartEngine) -> None:
    engine, frames = start_engine(max_sequence_length=3)
    engine.submit(request("long", "a b c d e"))
    error = frames.wait_final("long")
    assert isinstance(error, ErrorFrame)
    assert error.error_type == "context_length_exceeded"
    assert error.seq == 0
    assert "max_sequence_length is 3" in error.message
    assert frames.of("long") == [error]
    engine.submit(request("short", "a"))  # the engine keeps serving
    assert frames.wait_final("short").finish_reason == "stop"


class _Faulty(EchoBackend):
    """Refuses prompts containing 'crash' with a plain exception; fails a step when a prompt has 'explode'."""

    def __init__(self, config: ReaderConfig) -> None:
        super().__init__(config)
        self.explode = False

    def admit(self, request_id: str, text: str, params: GenerationParams) -> None:
        if "crash" in text:
            raise RuntimeError("boom at admit")
        super().admit(request_id, text, params)
        self.explode = "explode" in text

    def step(self) -> list[StepOutput]:
        if self.explode:
            self.explode = False
            raise RuntimeError("boom at step")
        return super().step()


def test_unexpected_admit_error_becomes_generation_error(
    start_engine: StartEngine, caplog: pytest.LogCaptureFixture
) -> None:
    engine, frames = start_engine(backend=_Faulty(ReaderConfig(model_name="echo", device="cpu")))
    engine.submit(request("bad", "crash now"))
    error = frames.wait_final("bad")
    assert isinstance(error, ErrorFrame)
    assert error.error_type == "generation_error"
    assert "boom at admit" in error.message
    engine.submit(request("good", "fine"))
    assert frames.wait_final("good").finish_reason == "stop"
    assert "backend refused request bad" in caplog.text


def test_step_failure_fails_running_requests(start_engine: StartEngine, caplog: pytest.LogCaptureFixture) -> None:
    backend = _Faulty(ReaderConfig(model_name="echo", device="cpu"))
    engine, frames = start_engine(backend=backend)
    engine.submit(request("doomed", "explode here"))
    error = frames.wait_final("doomed")
    assert isinstance(error, ErrorFrame)
    assert error.error_type == "generation_error"
    assert "boom at step" in error.message
    assert backend.active() == 0
    engine.submit(request("after", "still works"))
    assert frames.wait_final("after").finish_reason == "stop"
    assert "backend step failed" in caplog.text


def test_in_flight_counts_admitted_and_waiting(start_engine: StartEngine) -> None:
    engine, frames = start_engine(batch=1, backend_options={"token_delay_ms": 1})
    engine.submit(request("a", "la", FOREVER))
    engine.submit(request("b", "la", FOREVER))
    eventually(lambda: engine.in_flight == 2)
    engine.abort_all()
    frames.wait_final("b")
    assert engine.in_flight == 0


def test_stop_ends_the_thread() -> None:
    frames = Frames()
    engine = Engine(EchoBackend(ReaderConfig(model_name="echo", device="cpu")), frames.emit)
    before = {thread.ident for thread in threading.enumerate() if thread.name == "liftoff-engine"}
    engine.start()
    engine.submit(request("q", "a"))
    frames.wait_final("q")
    engine.stop()
    after = {thread.ident for thread in threading.enumerate() if thread.name == "liftoff-engine"}
    assert after <= before
    engine.stop()  # a second stop is harmless
