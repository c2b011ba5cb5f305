"""The relay: how a reader serves a :class:`~liftoff.backends.base.RemoteBackend` (``device: api``).

There is no batch to step. Each request is a task on an asyncio loop that runs on the relay's own thread (so the
reader's link and heartbeats never wait on the upstream, and the upstream's streams never wait on each other); at
most ``capacity`` run at once and the others wait their turn in arrival order. Aborting a request cancels its task,
which closes its upstream stream, and the upstream stops generating for it. ``submit``, ``abort`` and ``stop``
keep :class:`InboxWorker`'s thread-safe contract by handing their command to the loop (``call_soon_threadsafe``).
Frames produced in one turn of the loop (many streams' chunks) leave in one ``emit`` call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from liftoff.backends.base import RemoteBackend, StepOutput
from liftoff.core.errors import BackendError, InvalidRequestError, LiftoffError
from liftoff.core.frames import FinalFrame, RequestFrame, ResultFrame, TokenFrame, error_frame
from liftoff.core.types import FinishReason, RequestKind
from liftoff.reader.engine import Emit
from liftoff.reader.worker import ABORT_ALL, STOP, InboxWorker

logger = logging.getLogger(__name__)


class Relay(InboxWorker):
    """Runs a remote backend's requests concurrently on a loop of its own; thread-safe ``submit``/``abort``."""

    def __init__(self, backend: RemoteBackend, emit: Emit, reader_id: str = "") -> None:
        super().__init__("liftoff-relay")
        self._backend = backend
        self._emit = emit
        self._reader_id = reader_id
        self._loop = asyncio.new_event_loop()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(backend.capacity)
        self._ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._outbox: list[Any] = []
        self._broken = ""  # why the relay cannot serve at all (its connections could not be opened)
        self._totals = {"upstream_requests": 0.0, "tokens": 0.0, "upstream_failures": 0.0}

    def stats(self) -> dict[str, float]:
        """Running totals since start: requests sent upstream, tokens streamed back, requests that failed."""
        return dict(self._totals)

    @property
    def in_flight(self) -> int:
        """Requests running or waiting for a slot."""
        return len(self._tasks)

    def health(self) -> str:
        """Why the upstream cannot serve now ("" when it can)."""
        return self._broken or self._backend.health()

    # ---- any thread ---------------------------------------------------------------------------------------------

    def submit(self, frame: RequestFrame) -> None:
        self._post(frame)

    def abort(self, request_id: str) -> None:
        self._post(request_id)

    def abort_all(self) -> None:
        self._post(ABORT_ALL)

    def stop(self, timeout: float = 5.0) -> None:
        if self._running:
            self._post(STOP)
            self._thread.join(timeout)
            self._running = False

    def _post(self, command: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: the relay stopped
            self._loop.call_soon_threadsafe(self._command, command)

    # ---- the relay's loop ---------------------------------------------------------------------------------------

    def _command(self, command: object) -> None:
        if command is STOP:
            self._stopping.set()
        else:
            self._apply(command)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._relay_forever())
        finally:
            self._loop.close()

    async def _relay_forever(self) -> None:
        try:
            await self._backend.open()
        except Exception as exc:  # requests then fail at once instead of waiting for a loop that never serves
            logger.exception("the API backend could not open its connections")
            self._broken = f"the API backend could not open its connections: {exc}"
            self._ready.set()
            await self._stopping.wait()
            self._cancel_all()
            return
        watcher = asyncio.create_task(self._backend.watch(), name="liftoff-upstream-watch")
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            watcher.cancel()
            self._cancel_all()
            await asyncio.gather(watcher, *self._tasks.values(), return_exceptions=True)
            self._flush()
            await self._backend.aclose()

    def _accept(self, frame: RequestFrame) -> None:
        request_id = frame.request_id
        if request_id in self._tasks:
            return  # a duplicate delivery of a request already running
        task = self._loop.create_task(self._serve(frame))
        self._tasks[request_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(request_id, None))

    def _cancel(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    def _cancel_all(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()

    def _send(self, frame: Any) -> None:
        """Queue a frame; everything queued in this turn of the loop is emitted together."""
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox.append(frame)

    def _flush(self) -> None:
        if self._outbox:
            frames, self._outbox = self._outbox, []
            self._emit(frames)

    # ---- one request --------------------------------------------------------------------------------------------

    async def _serve(self, frame: RequestFrame) -> None:
        request_id = frame.request_id
        seq = [0]  # frames sent so far (the next frame's seq)
        try:
            await self._ready.wait()
            if self._broken:
                raise BackendError(self._broken)
            async with self._slots:
                self._totals["upstream_requests"] += 1
                if frame.kind is RequestKind.EMBED:
                    await self._embed(frame)
                else:
                    await self._generate(frame, seq)
        except asyncio.CancelledError:
            self._send(FinalFrame(request_id=request_id, seq=seq[0], finish_reason=FinishReason.ABORTED,
                                  reader_id=self._reader_id))  # fmt: skip
        except LiftoffError as exc:
            self._totals["upstream_failures"] += 1
            self._send(error_frame(request_id, exc, seq[0]))
        except Exception as exc:
            logger.exception("relaying request %s failed", request_id)
            self._totals["upstream_failures"] += 1
            self._send(error_frame(request_id, BackendError(f"the API backend failed: {exc}"), seq[0]))

    async def _generate(self, frame: RequestFrame, seq: list[int]) -> None:
        counts = frame.params.running_counts
        stream = self._backend.generate(frame.request_id, frame.text, frame.params)
        async with contextlib.aclosing(stream):  # closed here, with its upstream request, not when collected
            async for out in stream:
                if out.text:
                    self._totals["tokens"] += out.n_tokens
                    self._send(_token_frame(out, seq[0], counts=counts))
                    seq[0] += 1
                if out.finish_reason is not None:
                    self._send(FinalFrame(request_id=out.request_id, seq=seq[0], finish_reason=out.finish_reason,
                                          prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                                          reader_id=self._reader_id))  # fmt: skip
                    return

    async def _embed(self, frame: RequestFrame) -> None:
        inputs = frame.payload.get("inputs") or []
        if not all(isinstance(text, str) for text in inputs):
            raise InvalidRequestError("each input of an embedding must be a string", param="text")
        rows: list[bytes] = []
        tokens: list[int] = []
        if inputs:
            rows, tokens = await self._backend.embed(list(inputs), frame.payload.get("truncate"))
        data = {"rows": rows, "tokens": tokens, "truncated": [], "batch_sizes": [len(inputs)] * len(inputs)}
        self._send(ResultFrame(request_id=frame.request_id, seq=0, data=data))


def _token_frame(out: StepOutput, seq: int, *, counts: bool) -> TokenFrame:
    if counts:
        return TokenFrame(request_id=out.request_id, seq=seq, text=out.text, n_tokens=out.n_tokens,
                          prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens)  # fmt: skip
    return TokenFrame(request_id=out.request_id, seq=seq, text=out.text, n_tokens=out.n_tokens)
