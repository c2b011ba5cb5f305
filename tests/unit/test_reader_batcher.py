"""The batcher thread: dynamic batching over a fake encoder backend (no model), observed through its frames."""

from __future__ import annotations

import queue
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from liftoff.backends.base import BackendContext, EncoderBackend, Encoding, ProgressCallback
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import ContextLengthExceededError
from liftoff.core.frames import ErrorFrame, FinalFrame, RequestFrame, ResultFrame
from liftoff.core.types import ModelType, RequestKind
from liftoff.reader.batcher import Batcher, split_input


class FakeEncoder(EncoderBackend):
    """Rows are [words, len(pair words)]; inputs over ``limit`` words are cut or refused; ``gate`` holds batches."""

    name = "fake"

    def __init__(self, config: ReaderConfig, limit: int = 8) -> None:
        super().__init__(config, BackendContext())
        self.limit = limit
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False

    @property
    def model_type(self) -> ModelType:
        return ModelType.EMBEDDING

    def load(self, progress: ProgressCallback) -> None:
        progress(1.0)

    def prepare(self, text: str, pair: str | None = None, *, truncate: bool | None = None) -> Encoding:
        words = len(text.split()) + len((pair or "").split())
        if words <= self.limit:
            return Encoding({"n": [words]}, words)
        if not (self.truncate if truncate is None else truncate):
            raise ContextLengthExceededError(f"{words} words, at most {self.limit}")
        return Encoding({"n": [self.limit]}, self.limit, truncated=True)

    def encode(self, batch: list[Encoding]) -> list[bytes]:
        self.gate.wait(5)
        self.batches.append(len(batch))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the device fell over")
        return [struct.pack("<2f", item.features["n"][0], len(batch)) for item in batch]


class Harness:
    """A started batcher and the frames it emits."""

    def __init__(self, backend: FakeEncoder) -> None:
        self.backend = backend
        self.frames: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.batcher = Batcher(backend, self._emit, "r1")
        self.batcher.start()

    def _emit(self, frames: list[Any]) -> None:
        for frame in frames:
            self.frames.put(frame)

    def submit(self, request_id: str, *inputs: object, truncate: bool | None = None) -> None:
        payload: dict[str, Any] = {"inputs": list(inputs)}
        if truncate is not None:
            payload["truncate"] = truncate
        self.batcher.submit(RequestFrame(request_id=request_id, consumer_group="g", kind=RequestKind.EMBED,
                                         payload=payload))  # fmt: skip

    def next(self) -> Any:
        return self.frames.get(timeout=5)


def _harness(duration_ms: int, batch: int = 4, **fields: Any) -> Iterator[Harness]:
    config = ReaderConfig(model_name="fake", device="cpu", max_batch_size=batch, batch_duration_millis=duration_ms,
                          **fields)  # fmt: skip
    harness = Harness(FakeEncoder(config))
    yield harness
    harness.batcher.stop()


@pytest.fixture
def slow() -> Iterator[Harness]:
    """Batches wait up to 60 s to fill: only a full batch (or a stop) runs them."""
    yield from _harness(60_000)


@pytest.fixture
def quick() -> Iterator[Harness]:
    yield from _harness(0)


def test_a_full_batch_runs_at_once_mixing_requests(slow: Harness) -> None:
    slow.submit("a", "one", "two words")
    slow.submit("b", "three little words", "four")
    frames = {frame.request_id: frame for frame in (slow.next(), slow.next())}
    assert set(frames) == {"a", "b"}
    assert slow.backend.batches == [4]
    a = frames["a"]
    assert isinstance(a, ResultFrame)
    assert a.data["tokens"] == [1, 2]
    assert a.data["batch_sizes"] == [4, 4]
    assert a.data["truncated"] == []
    assert [struct.unpack("<2f", row)[0] for row in a.data["rows"]] == [1.0, 2.0]


def test_inputs_wait_for_the_batch_duration_when_the_batch_is_not_full() -> None:
    for harness in _harness(50):
        harness.submit("a", "x")
        frame = harness.next()
        assert isinstance(frame, ResultFrame)
        assert frame.data["batch_sizes"] == [1]


def test_a_large_request_spans_several_batches_and_keeps_its_order(quick: Harness) -> None:
    quick.submit("big", *[" ".join(["w"] * n) for n in range(1, 8)])
    frame = quick.next()
    assert isinstance(frame, ResultFrame)
    assert frame.data["tokens"] == list(range(1, 8))
    assert quick.backend.batches == [4, 3]
    assert all(size <= 4 for size in frame.data["batch_sizes"])


def test_requests_arriving_while_a_batch_runs_share_the_next_batch(quick: Harness) -> None:
    quick.backend.gate.clear()
    quick.submit("first", "a")
    for index in range(3):
        quick.submit(f"r{index}", "b")
    quick.backend.gate.set()
    frames = [quick.next() for _ in range(4)]
    assert {frame.request_id for frame in frames} == {"first", "r0", "r1", "r2"}
    later = [frame for frame in frames if frame.request_id != "first"]
    assert max(frame.data["batch_sizes"][0] for frame in later) > 1, "waiting inputs were not batched together"


def test_truncation_follows_the_reader_and_the_request(quick: Harness) -> None:
    long = " ".join(["w"] * 20)
    quick.submit("cut", "short", long)
    frame = quick.next()
    assert frame.data["truncated"] == [1]
    assert frame.data["tokens"] == [1, 8]
    quick.submit("refused", "short", long, truncate=False)
    error = quick.next()
    assert isinstance(error, ErrorFrame)
    assert error.error_type == "context_length_exceeded"


def test_a_reader_that_refuses_long_inputs() -> None:
    for harness in _harness(0, truncate_inputs=False):
        harness.submit("r", " ".join(["w"] * 9))
        assert isinstance(harness.next(), ErrorFrame)
        harness.submit("ok", " ".join(["w"] * 9), truncate=True)
        assert harness.next().data["truncated"] == [0]


def test_abort_drops_waiting_inputs(slow: Harness) -> None:
    slow.submit("a", "x", "y")
    slow.batcher.abort("a")
    final = slow.next()
    assert isinstance(final, FinalFrame)
    assert final.finish_reason == "aborted"
    slow.submit("b", "1", "2", "3", "4")
    assert slow.next().request_id == "b"
    assert slow.backend.batches == [4]


def test_a_failed_batch_fails_its_requests_and_the_batcher_goes_on(quick: Harness) -> None:
    quick.backend.fail_next = True
    quick.submit("a", "x")
    error = quick.next()
    assert isinstance(error, ErrorFrame)
    assert "fell over" in error.message
    quick.submit("b", "y")
    assert isinstance(quick.next(), ResultFrame)


def test_pairs_and_empty_requests(quick: Harness) -> None:
    quick.submit("pair", ["a b", "c"])
    assert quick.next().data["tokens"] == [3]
    quick.submit("empty")
    assert quick.next().data["rows"] == []
    quick.submit("bad", ["a", "b", "c"])
    assert isinstance(quick.next(), ErrorFrame)


def test_split_input() -> None:
    assert split_input("a") == ("a", None)
    assert split_input(["a", "b"]) == ("a", "b")
    with pytest.raises(Exception, match="pair of strings"):
        split_input(["a", 1])
