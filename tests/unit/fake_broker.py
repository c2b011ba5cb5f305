"""A :class:`GatewayBroker` that serves its requests in process, as a broker and its readers would.

It implements the whole gateway half of the broker contract (liftoff.broker.base): per-group FIFO queues with
deadlines and a limit (429), requests to one reader, aborts, queue depths, lost readers (started requests fail with
``reader_died``, the others are queued again), and ``settle``. Readers join and leave through the events a real
broker sends (register, loaded, heartbeat, lost), so the gateway's registry, ``/status`` and health checks are the
real ones. Answers come one frame per event-loop turn (:mod:`tests.unit.fake_reader`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from liftoff.broker.base import BrokerSettings, GatewayBroker
from liftoff.core.clock import monotonic, now_ms
from liftoff.core.errors import (
    LiftoffError,
    NoReadersAvailableError,
    OverloadedError,
    ReaderDiedError,
    RequestTimeoutError,
)
from liftoff.core.frames import (
    FinalFrame,
    HeartbeatFrame,
    LoadedFrame,
    OutputFrame,
    RegisterFrame,
    RequestFrame,
    ResultFrame,
    TokenFrame,
    error_frame,
)
from liftoff.core.ids import consumer_name
from liftoff.core.types import ReaderInfo, RequestKind
from tests.unit.fake_reader import ANSWERS, FakeReader, words


@dataclass
class _Queued:
    frame: RequestFrame
    timer: asyncio.TimerHandle


class FakeBroker(GatewayBroker):
    """A :class:`GatewayBroker` whose readers are answered in process (see the module docstring)."""

    def __init__(self, settings: BrokerSettings) -> None:
        super().__init__(settings)
        self.readers: dict[str, FakeReader] = {}
        self.queues: dict[str, deque[_Queued]] = {}
        self.submitted: list[RequestFrame] = []
        self.aborted: list[str] = []
        self.stopped: list[tuple[str, str]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[asyncio.Handle] = set()
        self._deadlines: dict[str, float] = {}  # request → its queue deadline

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        for handle in self._pending:
            handle.cancel()
        for queue in self.queues.values():
            for queued in queue:
                queued.timer.cancel()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the fake broker was not started")
        return self._loop

    def _later(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback`` on a later turn of the event loop, as a reader's answer would arrive."""

        def run() -> None:
            self._pending.discard(handle)
            callback(*args)

        handle = self.loop.call_soon(run)
        self._pending.add(handle)

    # ---- readers: the events a real broker sends ----------------------------------------------------------------

    def connect(
        self,
        reader_id: str,
        groups: tuple[str, ...] = ("primary",),
        *,
        model_type: str = "CAUSAL",
        capacity: int = 4,
        loaded: bool = True,
        model_name: str = "echo",
        config: dict[str, Any] | None = None,
    ) -> FakeReader:
        """A reader registers (and, unless ``loaded`` is false, finishes loading and sends a heartbeat)."""
        reader = FakeReader(reader_id, groups, model_type, capacity)
        self.readers[reader_id] = reader
        info = ReaderInfo(
            consumer_groups=list(groups),
            consumer_name=consumer_name(reader_id),
            device="cpu",
            model_name=model_name,
            model_type=model_type,
            pids=[],
        )
        wire = config or {"model_name": model_name, "device": "cpu", "consumer_group": ",".join(groups)}
        self.events.on_reader_register(
            RegisterFrame(reader_id=reader_id, info=info, config=wire, heartbeat_interval_ms=1000)
        )
        if loaded:
            self.load(reader_id)
        return reader

    def load(self, reader_id: str) -> None:
        """The reader's model is loaded: it is live, says so in a heartbeat, and takes queued requests."""
        reader = self.readers[reader_id]
        reader.ready = True
        self.events.on_reader_loaded(reader_id, LoadedFrame(model_type=reader.model_type, capacity=reader.capacity))
        self.heartbeat(reader_id)
        for group in reader.groups:
            self._pump(group)

    def heartbeat(self, reader_id: str, **fields: Any) -> None:
        """A heartbeat of the reader (``fields``: those of :class:`HeartbeatFrame`)."""
        reader = self.readers[reader_id]
        fields.setdefault("active", len(reader.running))
        self.events.on_reader_heartbeat(reader_id, HeartbeatFrame(timestamp_ms=now_ms(), **fields))

    def disconnect(self, reader_id: str, reason: str = "the reader disconnected") -> None:
        """The reader's link drops: its started requests fail, the others go back to the head of their queue (up to
        ``max_retries`` times)."""
        reader = self.readers.pop(reader_id, None)
        if reader is None:
            return
        retry: list[RequestFrame] = []
        for request_id, frame in reader.running.items():
            if request_id in reader.started or frame.reader_id:
                died = ReaderDiedError(f"reader {reader_id} failed mid-request: {reason}")
                self._emit(error_frame(request_id, died, reader.started.get(request_id, 0)))
            elif frame.attempt >= self.settings.max_retries:
                self._emit(error_frame(request_id, ReaderDiedError(f"reader {reader_id} failed; retries ran out")))
            else:
                retry.append(msgspec.structs.replace(frame, attempt=frame.attempt + 1))
        reader.running.clear()
        for frame in reversed(retry):
            self._enqueue(frame, self._deadlines.get(frame.request_id, monotonic()), front=True)
        for group in reader.groups:
            self._pump(group)
            self.settle(group)
        self.events.on_reader_lost(reader_id, reason)

    # ---- the gateway's half -------------------------------------------------------------------------------------

    def submit(self, frame: RequestFrame, queue_deadline: float) -> None:
        if self.queue_depth() >= self.settings.max_queued_requests:
            raise OverloadedError(f"{self.queue_depth()} requests are already waiting; try again later")
        self.submitted.append(frame)
        self._deadlines[frame.request_id] = queue_deadline
        if frame.reader_id:
            reader = self.readers.get(frame.reader_id)
            if reader is None or not reader.ready:
                raise NoReadersAvailableError(f"reader {frame.reader_id!r} is not live")
            self._run(reader, frame)
            return
        reader = self._pick(frame.consumer_group)
        if reader is None:
            self._enqueue(frame, queue_deadline)
        else:
            self._run(reader, frame)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        for reader in self.readers.values():
            reader.running.pop(request_id, None)
        for queue in self.queues.values():
            for queued in [queued for queued in queue if queued.frame.request_id == request_id]:
                queued.timer.cancel()
                queue.remove(queued)

    def evict_reader(self, reader_id: str, reason: str) -> None:
        self.disconnect(reader_id, reason)

    def stop_reader(self, reader_id: str, reason: str) -> None:
        self.stopped.append((reader_id, reason))
        self.disconnect(reader_id, reason)

    def settle(self, group: str) -> None:
        if self.buffers(group) or self._pick(group, free=False) is not None:
            return
        for queued in self.queues.pop(group, deque()):
            queued.timer.cancel()
            self._emit(
                error_frame(
                    queued.frame.request_id,
                    NoReadersAvailableError(f"no live reader is left in consumer group '{group}'"),
                )
            )

    def queue_depth(self, group: str | None = None) -> int:
        if group is None:
            return sum(len(queue) for queue in self.queues.values())
        return len(self.queues.get(group, ()))

    def in_flight(self, group: str | None = None) -> int:
        return sum(
            1
            for reader in self.readers.values()
            for frame in reader.running.values()
            if group is None or frame.consumer_group == group
        )

    # ---- queues -------------------------------------------------------------------------------------------------

    def _pick(self, group: str, *, free: bool = True) -> FakeReader | None:
        for reader in self.readers.values():
            if reader.ready and group in reader.groups and (not free or len(reader.running) < reader.capacity):
                return reader
        return None

    def _enqueue(self, frame: RequestFrame, deadline: float, *, front: bool = False) -> None:
        timer = self.loop.call_later(max(0.0, deadline - monotonic()), self._expire, frame)
        queue = self.queues.setdefault(frame.consumer_group, deque())
        (queue.appendleft if front else queue.append)(_Queued(frame, timer))

    def _expire(self, frame: RequestFrame) -> None:
        queue = self.queues.get(frame.consumer_group, deque())
        for queued in [queued for queued in queue if queued.frame is frame]:
            queue.remove(queued)
            self._emit(error_frame(frame.request_id, RequestTimeoutError("the request waited too long in the queue")))

    def _pump(self, group: str) -> None:
        queue = self.queues.get(group)
        while queue and (reader := self._pick(group)) is not None:
            queued = queue.popleft()
            queued.timer.cancel()
            self._run(reader, queued.frame)

    # ---- the readers' answers -----------------------------------------------------------------------------------

    def _emit(self, frame: OutputFrame) -> None:
        self.events.on_outputs([frame])

    def _run(self, reader: FakeReader, frame: RequestFrame) -> None:
        reader.running[frame.request_id] = frame
        if frame.kind is RequestKind.GENERATE:
            self._later(self._step, reader, frame, 0)
        else:
            self._later(self._serve, reader, frame)

    def _finish(self, reader: FakeReader, frame: OutputFrame) -> None:
        reader.running.pop(frame.request_id, None)
        self._deadlines.pop(frame.request_id, None)
        self._emit(frame)
        for group in reader.groups:
            self._pump(group)

    def _step(self, reader: FakeReader, frame: RequestFrame, sent: int) -> None:
        """Send the next token of an echo generation (or its end)."""
        request_id = frame.request_id
        if reader.running.get(request_id) is not frame:
            return  # aborted, or its reader is gone
        behaviour, params = reader.behaviour, frame.params
        tokens = words(frame.text)
        budget = min(len(tokens), params.max_new_tokens)
        if sent == behaviour.stall_after:
            return
        if behaviour.fail is not None and sent == behaviour.fail_after:
            self._finish(reader, error_frame(request_id, behaviour.fail, seq=sent))
        elif sent < budget:
            counts = {"prompt_tokens": len(tokens), "completion_tokens": sent + 1} if params.running_counts else {}
            reader.started[request_id] = sent + 1
            self._emit(TokenFrame(request_id=request_id, seq=sent, text=tokens[sent], **counts))
            self._later(self._step, reader, frame, sent + 1)
        else:
            reason = "length" if budget < len(tokens) else "stop"
            self._finish(
                reader,
                FinalFrame(
                    request_id=request_id,
                    seq=sent,
                    finish_reason=reason,
                    prompt_tokens=len(tokens),
                    completion_tokens=sent,
                    reader_id=reader.reader_id,
                ),
            )

    def _serve(self, reader: FakeReader, frame: RequestFrame) -> None:
        """Answer a request that is not a generation with one result (or error) frame."""
        if reader.running.get(frame.request_id) is not frame:
            return
        try:
            data = ANSWERS[frame.kind](reader, frame.payload)
        except LiftoffError as exc:
            self._finish(reader, error_frame(frame.request_id, exc))
            return
        self._finish(reader, ResultFrame(request_id=frame.request_id, seq=0, data=data))
