"""The batcher thread: dynamic batching for encoder readers (embeddings, classification).

Every request is split into its inputs, each tokenized on arrival (a refused input fails its whole request at
once). A batch runs when ``capacity`` inputs wait, or when ``batch_duration_s`` has passed since the oldest
waiting input arrived, whichever comes first (takeoff-spec §1.4); a batch takes the oldest inputs first, from
any number of requests, so a large request is spread over several batches and small ones ride along. When the
last input of a request is done, its answer goes back as one result frame: the rows (float32 bytes), the tokens
of each input, which inputs were truncated, and the size of the batch each input ran in.
"""

from __future__ import annotations

import logging
import queue
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from liftoff.backends.base import EncoderBackend, Encoding
from liftoff.core.clock import monotonic
from liftoff.core.errors import BackendError, InvalidRequestError, LiftoffError
from liftoff.core.frames import FinalFrame, RequestFrame, ResultFrame, error_frame
from liftoff.core.types import FinishReason
from liftoff.reader.engine import Emit
from liftoff.reader.worker import InboxWorker

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Answer:
    """One request: its inputs' results as they come."""

    frame: RequestFrame
    size: int
    rows: list[bytes] = field(init=False)
    tokens: list[int] = field(init=False)
    batch_sizes: list[int] = field(init=False)
    truncated: list[int] = field(default_factory=list)
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = [b""] * self.size
        self.tokens = [0] * self.size
        self.batch_sizes = [0] * self.size
        self.remaining = self.size

    def result(self) -> dict[str, Any]:
        return {"rows": self.rows, "tokens": self.tokens, "truncated": self.truncated, "batch_sizes": self.batch_sizes}


@dataclass(slots=True)
class _Item:
    """One input waiting for a batch."""

    answer: _Answer
    index: int
    encoding: Encoding
    arrived: float


def split_input(value: object) -> tuple[str, str | None]:
    """A text, or a ``[text, pair]`` sentence pair, from a request payload."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(part, str) for part in value):
        return value[0], value[1]
    raise InvalidRequestError("each input must be a string or a pair of strings [text, text_pair]", param="text")


class Batcher(InboxWorker):
    """Runs an encoder backend on a dedicated thread; thread-safe ``submit``/``abort``/``stop``."""

    def __init__(self, backend: EncoderBackend, emit: Emit, reader_id: str = "") -> None:
        super().__init__("liftoff-batcher")
        self._backend = backend
        self._emit = emit
        self._reader_id = reader_id
        self._answers: dict[str, _Answer] = {}
        self._items: deque[_Item] = deque()
        self.batches = 0  # batches run so far (for logs and tests)
        self._totals = {"batches": 0.0, "batch_inputs": 0.0, "batch_seconds": 0.0}

    def stats(self) -> dict[str, float]:
        """Running totals since start (read from another thread): batches, inputs over all batches, seconds."""
        return dict(self._totals)

    @property
    def in_flight(self) -> int:
        """Requests queued or waiting for a batch (read from another thread: approximate)."""
        return len(self._answers) + (not self._inbox.empty())

    # ---- batcher thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while self._collect():
            if self._items and self._due():
                self._run_batch()

    def _due(self) -> bool:
        full = len(self._items) >= self._backend.capacity
        return full or monotonic() >= self._items[0].arrived + self._backend.batch_duration_s

    def _collect(self) -> bool:
        """Wait for a command until the next batch is due, then apply every queued one; False means stop."""
        if self._items:
            timeout = max(0.0, self._items[0].arrived + self._backend.batch_duration_s - monotonic())
            if len(self._items) >= self._backend.capacity:
                timeout = 0.0
        else:
            timeout = 1.0
        try:
            command = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return True
        return self._apply_all(command)

    def _cancel_all(self) -> None:
        for request_id in list(self._answers):
            self._cancel(request_id)

    def _accept(self, frame: RequestFrame) -> None:
        """Tokenize every input of a request and queue them; any refused input fails the request."""
        inputs = frame.payload.get("inputs") or []
        truncate = frame.payload.get("truncate")
        try:
            encodings = [self._backend.prepare(*split_input(value), truncate=truncate) for value in inputs]
        except LiftoffError as exc:
            self._emit([error_frame(frame.request_id, exc)])
            return
        except Exception as exc:
            logger.exception("tokenizing request %s failed", frame.request_id)
            self._emit([error_frame(frame.request_id, BackendError(f"tokenizing failed: {exc}"))])
            return
        answer = _Answer(frame, len(encodings))
        if not encodings:
            self._emit([self._result(answer)])
            return
        self._answers[frame.request_id] = answer
        now = monotonic()
        self._items.extend(_Item(answer, index, encoding, now) for index, encoding in enumerate(encodings))

    def _cancel(self, request_id: str) -> None:
        answer = self._answers.pop(request_id, None)
        if answer is None:
            return
        self._items = deque(item for item in self._items if item.answer is not answer)
        self._emit([FinalFrame(request_id=request_id, seq=0, finish_reason=FinishReason.ABORTED,
                               reader_id=self._reader_id)])  # fmt: skip

    def _run_batch(self) -> None:
        count = min(len(self._items), self._backend.capacity)
        batch = [self._items.popleft() for _ in range(count)]
        self.batches += 1
        started = monotonic()
        try:
            rows = self._backend.encode([item.encoding for item in batch])
        except Exception as exc:
            logger.exception("a batch of %d inputs failed", count)
            self._fail({id(item.answer): item.answer for item in batch}.values(), exc)
            return
        done: list[Any] = []
        for item, row in zip(batch, rows, strict=True):
            answer = item.answer
            answer.rows[item.index] = row
            answer.tokens[item.index] = item.encoding.n_tokens
            answer.batch_sizes[item.index] = count
            if item.encoding.truncated:
                answer.truncated.append(item.index)
            answer.remaining -= 1
            if answer.remaining == 0 and self._answers.pop(answer.frame.request_id, None) is not None:
                done.append(self._result(answer))
        if done:
            self._emit(done)
        elapsed = monotonic() - started
        self._totals["batches"] += 1
        self._totals["batch_inputs"] += count
        self._totals["batch_seconds"] += elapsed
        logger.debug("batch %d: %d inputs in %.1f ms, waited %.1f ms; %d waiting", self.batches, count,
                     elapsed * 1000, (started - batch[0].arrived) * 1000, len(self._items))  # fmt: skip

    def _fail(self, answers: Any, exc: Exception) -> None:
        error = exc if isinstance(exc, LiftoffError) else BackendError(f"the backend failed: {exc}")
        frames: list[Any] = []
        for answer in answers:
            if self._answers.pop(answer.frame.request_id, None) is not None:
                self._items = deque(item for item in self._items if item.answer is not answer)
                frames.append(error_frame(answer.frame.request_id, error))
        self._emit(frames)

    def _result(self, answer: _Answer) -> ResultFrame:
        answer.truncated.sort()
        return ResultFrame(request_id=answer.frame.request_id, seq=0, data=answer.result())
