"""The embedded broker: the gateway itself queues requests and pushes them to readers connected over WebSocket.

Readers connect to the internal port (``/reader``), register, and receive :class:`RequestFrame` s up to their
capacity (plus a small prefetch); they pull more by finishing work. Requests of a consumer group go to the ready
reader of that group with the most free slots, so load balances across readers. One background task expires
queued requests at their deadline and evicts readers that went silent with requests in flight.

Who may connect is decided before this module sees the connection (the internal port's key check:
``reader_secret``). The capacity a reader declares is capped at the largest ``max_batch_size`` (a reader that
claimed more would be handed other readers' share of the queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections import deque

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from liftoff.broker.base import BrokerSettings, GatewayBroker
from liftoff.broker.embedded.state import ConnectedReader, EmbeddedJob
from liftoff.config.models import MAX_READER_BATCH
from liftoff.core.clock import monotonic
from liftoff.core.errors import (
    LiftoffError,
    NoReadersAvailableError,
    OverloadedError,
    ReaderDiedError,
    RequestTimeoutError,
)
from liftoff.core.frames import (
    MAX_QUIET_MS,
    DrainFrame,
    ErrorFrame,
    FinalFrame,
    HeartbeatFrame,
    LoadedFrame,
    LoadFailedFrame,
    OutputFrame,
    ReaderFrame,
    RegisterFrame,
    RequestFrame,
    ResultFrame,
    StopFrame,
    TokenFrame,
    WelcomeFrame,
    decode_reader_frames,
    error_frame,
)

logger = logging.getLogger(__name__)

CLOSE_DUPLICATE = 4409
CLOSE_PROTOCOL = 4400
CLOSE_EVICTED = 4000
_SWEEP_S = 0.05


class EmbeddedBroker(GatewayBroker):
    """Gateway-side broker over the internal port's WebSocket endpoint."""

    def __init__(self, settings: BrokerSettings) -> None:
        super().__init__(settings)
        self._jobs: dict[str, EmbeddedJob] = {}
        self._queues: dict[str, deque[EmbeddedJob]] = {}
        self._queued = 0
        self._deadlines: list[tuple[float, int, EmbeddedJob]] = []
        self._tiebreak = 0
        self._readers: dict[str, ConnectedReader] = {}
        self._sweeper: asyncio.Task[None] | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="liftoff-broker-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for reader in list(self._readers.values()):
            self._drop_reader(reader, "the gateway is shutting down", close_code=1001)

    # ---- gateway API --------------------------------------------------------------------------------------------

    def submit(self, frame: RequestFrame, queue_deadline: float) -> None:
        if self._queued >= self.settings.max_queued_requests:
            raise OverloadedError(f"{self._queued} requests are already waiting (max_queued_requests); try again later")
        job = EmbeddedJob(frame=frame, deadline=queue_deadline)
        if frame.reader_id:
            self._submit_direct(job)
            return
        self._jobs[frame.request_id] = job
        reader = self._pick(frame.consumer_group)
        if reader is not None:
            self._assign(job, reader)
        else:
            self._enqueue(job)

    def _submit_direct(self, job: EmbeddedJob) -> None:
        """A request for one reader (tokenize, chat template): no queue, no capacity."""
        reader_id = job.frame.reader_id
        reader = self._readers.get(reader_id)
        if reader is None or not reader.ready or reader.closed:
            raise NoReadersAvailableError(f"reader {reader_id!r} is not live")
        self._jobs[job.frame.request_id] = job
        self._assign(job, reader)

    def abort(self, request_id: str) -> None:
        job = self._jobs.pop(request_id, None)
        if job is None:
            return
        job.cancelled = True
        if job.reader is None:
            self._queued -= 1
        elif job.frame.reader_id:
            job.reader.finish(request_id)  # served outside the reader's batch: nothing to free there
        else:
            job.reader.abort(request_id)

    def evict_reader(self, reader_id: str, reason: str) -> None:
        reader = self._readers.get(reader_id)
        if reader is not None:
            self._lose(reader, reason, close_code=CLOSE_EVICTED)

    def stop_reader(self, reader_id: str, reason: str) -> None:
        reader = self._readers.get(reader_id)
        if reader is not None:
            reader.send([StopFrame(reason=reason)])
            self._lose(reader, reason, close_code=1000)

    def settle(self, group: str) -> None:
        self._fail_orphaned(group)

    def queue_depth(self, group: str | None = None) -> int:
        if group is None:
            return self._queued
        return sum(1 for job in self._queues.get(group, ()) if not job.cancelled)

    def in_flight(self, group: str | None = None) -> int:
        return sum(
            1
            for reader in self._readers.values()
            for job in reader.assigned.values()
            if not job.cancelled and (group is None or job.frame.consumer_group == group)
        )

    # ---- queueing and assignment --------------------------------------------------------------------------------

    def _enqueue(self, job: EmbeddedJob, *, front: bool = False) -> None:
        queue = self._queues.setdefault(job.frame.consumer_group, deque())
        if front:
            queue.appendleft(job)
        else:
            queue.append(job)
        self._queued += 1
        self._tiebreak += 1
        heapq.heappush(self._deadlines, (job.deadline, self._tiebreak, job))
        if len(self._deadlines) > 2 * self._queued + 1024:
            self._deadlines = [entry for entry in self._deadlines if entry[2].reader is None and not entry[2].cancelled]
            heapq.heapify(self._deadlines)

    def _pick(self, group: str) -> ConnectedReader | None:
        best: ConnectedReader | None = None
        best_free = 0
        for reader in self._readers.values():
            if group in reader.groups and reader.accepting:
                free = reader.free()
                if free > best_free or (free == best_free and best is not None and reader.served < best.served):
                    best, best_free = reader, free
        return best

    def _assign(self, job: EmbeddedJob, reader: ConnectedReader) -> None:
        job.reader = reader
        reader.assign(job)
        observe = self.queue_time_observer
        if observe is not None and not job.frame.attempt and not job.frame.reader_id:
            observe(job.frame.consumer_group, monotonic() - job.enqueued)

    def _pop_oldest(self, groups: tuple[str, ...]) -> EmbeddedJob | None:
        oldest: deque[EmbeddedJob] | None = None
        for group in groups:
            queue = self._queues.get(group)
            while queue and queue[0].cancelled:
                queue.popleft()
            if queue and (oldest is None or queue[0].enqueued < oldest[0].enqueued):
                oldest = queue
        if oldest is None:
            return None
        self._queued -= 1
        return oldest.popleft()

    def _pump(self, reader: ConnectedReader) -> None:
        while reader.accepting and reader.free() > 0:
            job = self._pop_oldest(reader.groups)
            if job is None:
                return
            self._assign(job, reader)

    def _pump_group(self, group: str) -> None:
        queue = self._queues.get(group)
        while queue:
            reader = self._pick(group)
            if reader is None:
                return
            job = self._pop_oldest((group,))
            if job is None:
                return
            self._assign(job, reader)

    # ---- failure handling ---------------------------------------------------------------------------------------

    def _fail(self, job: EmbeddedJob, error: LiftoffError) -> None:
        self._jobs.pop(job.frame.request_id, None)
        job.cancelled = True
        self.events.on_outputs([error_frame(job.frame.request_id, error, job.next_seq)])

    def _lose(self, reader: ConnectedReader, reason: str, *, close_code: int) -> None:
        """A reader is gone: retry what it had not started, fail what it had, then tell the gateway."""
        if self._readers.get(reader.reader_id) is not reader:
            return
        self._drop_reader(reader, reason, close_code=close_code)
        retry: list[EmbeddedJob] = []
        for job in reader.assigned.values():
            if job.cancelled:
                continue
            if job.started or job.frame.reader_id:
                self._fail(job, ReaderDiedError(f"reader {reader.reader_id} failed mid-request: {reason}"))
            elif job.frame.attempt >= self.settings.max_retries:
                self._fail(job, ReaderDiedError(f"reader {reader.reader_id} failed ({reason}) and retries ran out"))
            else:
                job.retry()
                retry.append(job)
        reader.assigned.clear()
        for job in reversed(retry):
            self._enqueue(job, front=True)
        for group in reader.groups:
            self._pump_group(group)
            self._fail_orphaned(group)
        self.events.on_reader_lost(reader.reader_id, reason)

    def _fail_orphaned(self, group: str) -> None:
        if self.buffers(group) or any(group in reader.groups and reader.accepting for reader in self._readers.values()):
            return
        queue = self._queues.pop(group, deque())
        for job in queue:
            if not job.cancelled:
                self._queued -= 1
                self._fail(job, NoReadersAvailableError(f"no live reader is left in consumer group '{group}'"))

    def _drop_reader(self, reader: ConnectedReader, reason: str, *, close_code: int) -> None:
        self._readers.pop(reader.reader_id, None)
        reader.close(close_code, reason)

    async def _sweep_forever(self) -> None:
        last = monotonic()
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = monotonic()
            self._expire(now)
            if now - last < self.settings.reader_message_timeout_ms / 2000.0:
                self._check_silence(now)
            # else this loop itself was held up (a long task on the gateway's event loop): the readers' messages
            # may be waiting unread, so silence is judged on the next tick, after they have been read.
            last = now

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, job = heapq.heappop(self._deadlines)
            if job.cancelled or job.reader is not None or job.frame.request_id not in self._jobs:
                continue
            self._queued -= 1
            group = job.frame.consumer_group
            if any(group in reader.groups and reader.accepting for reader in self._readers.values()):
                self._fail(job, RequestTimeoutError(f"the request waited too long in the queue of group '{group}'"))
            else:
                self._fail(job, NoReadersAvailableError(f"no reader of consumer group '{group}' became live in time"))

    def _check_silence(self, now: float) -> None:
        limit = self.settings.reader_message_timeout_ms / 1000.0
        for reader in list(self._readers.values()):
            silent = reader.silent_for(now)
            if silent > limit:
                self._lose(
                    reader, f"silent for {silent * 1000:.0f} ms with requests in flight", close_code=CLOSE_EVICTED
                )

    # ---- reader connections -------------------------------------------------------------------------------------

    async def serve_reader(self, websocket: WebSocket) -> None:
        """Run one reader connection (the internal port's ``/reader`` WebSocket endpoint)."""
        await websocket.accept()
        reader: ConnectedReader | None = None
        try:
            register = await self._handshake(websocket)
            if register is None:
                return
            reader = ConnectedReader(register, websocket)
            self._readers[reader.reader_id] = reader
            reader.send([self._welcome()])
            self.events.on_reader_register(register)
            if register.loaded:
                self._on_loaded(reader, LoadedFrame(model_type=register.info.model_type, capacity=register.capacity))
            while True:
                data = await websocket.receive_bytes()
                self._on_message(reader, decode_reader_frames(data))
        except (WebSocketDisconnect, RuntimeError):
            pass
        except Exception:
            logger.exception("reader connection failed")
        finally:
            if reader is not None:
                self._lose(reader, "the reader disconnected", close_code=1000)

    async def _handshake(self, websocket: WebSocket) -> RegisterFrame | None:
        try:
            frames = decode_reader_frames(await asyncio.wait_for(websocket.receive_bytes(), timeout=30))
        except (TimeoutError, ValueError) as exc:
            await websocket.close(CLOSE_PROTOCOL, f"expected a register frame: {exc}")
            return None
        if not frames or not isinstance(frames[0], RegisterFrame):
            await websocket.close(CLOSE_PROTOCOL, "the first frame must be a register frame")
            return None
        register = frames[0]
        if register.reader_id in self._readers:
            await websocket.close(CLOSE_DUPLICATE, f"reader id {register.reader_id!r} is already connected")
            return None
        return register

    def _welcome(self) -> WelcomeFrame:
        return WelcomeFrame(
            gateway_id=self.settings.gateway_id,
            reader_message_timeout_ms=self.settings.reader_message_timeout_ms,
            heartbeat_interval_ms=self.settings.heartbeat_interval_ms,
        )

    def _on_message(self, reader: ConnectedReader, frames: list[ReaderFrame]) -> None:
        reader.last_recv = monotonic()
        outputs: list[OutputFrame] = []
        for frame in frames:
            if isinstance(frame, TokenFrame | FinalFrame | ResultFrame | ErrorFrame):
                self._on_output(reader, frame, outputs)
            elif isinstance(frame, HeartbeatFrame):
                if frame.quiet_ms > 0:  # a long task announced: its silence is not death
                    reader.quiet_until = reader.last_recv + min(frame.quiet_ms, MAX_QUIET_MS) / 1000.0
                self.events.on_reader_heartbeat(reader.reader_id, frame)  # first: whether its groups hold asks it
                self._on_health(reader, bool(frame.unhealthy))
            elif isinstance(frame, LoadedFrame):
                self._on_loaded(reader, frame)
            elif isinstance(frame, LoadFailedFrame):
                self.events.on_reader_load_failed(reader.reader_id, frame.reason)
            elif isinstance(frame, DrainFrame):
                reader.draining = True
        if outputs:
            self.events.on_outputs(outputs)
        if reader.accepting and reader.free() > 0:
            self._pump(reader)

    def _on_output(self, reader: ConnectedReader, frame: OutputFrame, outputs: list[OutputFrame]) -> None:
        job = reader.assigned.get(frame.request_id)
        if job is None:
            return
        if isinstance(frame, TokenFrame):
            job.started = True
            job.next_seq = frame.seq + 1
        else:
            reader.finish(frame.request_id)
            if not job.cancelled:
                self._jobs.pop(frame.request_id, None)
        if not job.cancelled:
            outputs.append(frame)

    def _on_health(self, reader: ConnectedReader, unhealthy: bool) -> None:
        """A reader that cannot serve (its upstream is down) gets no new work until it can; its groups' queued
        requests then fail at once unless another reader can take them (as when a reader dies)."""
        if unhealthy == reader.unhealthy:
            return
        reader.unhealthy = unhealthy
        if unhealthy:
            for group in reader.groups:
                self._fail_orphaned(group)

    def _on_loaded(self, reader: ConnectedReader, frame: LoadedFrame) -> None:
        if frame.capacity > MAX_READER_BATCH:
            logger.warning("reader %s declared a capacity of %d; it gets %d (the largest max_batch_size)",
                           reader.reader_id, frame.capacity, MAX_READER_BATCH)  # fmt: skip
            frame = msgspec.structs.replace(frame, capacity=MAX_READER_BATCH)
        reader.capacity = max(0, frame.capacity)
        reader.ready = True
        self.events.on_reader_loaded(reader.reader_id, frame)
        self._pump(reader)
