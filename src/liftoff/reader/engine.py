"""The engine thread: owns a backend and runs the continuous-batching loop.

Commands (admit, abort) arrive on a thread-safe inbox and are applied between steps; every step's outputs become
frames handed to ``emit`` (which crosses back to the asyncio loop). Requests beyond the backend's capacity wait
in a local FIFO and are admitted as slots free up. A request that needs slow work first (compiling its grammar:
:meth:`GenerativeBackend.preparation`) gets it on the preparation thread (:mod:`liftoff.reader.preparer`) and joins
the FIFO when it is done, so the running sequences keep stepping meanwhile; one that waits longer than its budget fails.

Faults stay with the request that caused them: a request the backend refuses, whose preparation fails, or whose
output cannot be handled (stop strings, counts) ends alone with an error frame, as does a sequence whose token the
sampler could not choose (see :mod:`liftoff.backends.sampling`). Only a failure of the model's forward pass itself
fails the sequences that were in it.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from liftoff.backends.base import GenerativeBackend, Preparation, StepOutput
from liftoff.core.clock import monotonic, now_ms
from liftoff.core.errors import BackendError, InvalidRequestError, LiftoffError
from liftoff.core.frames import ErrorFrame, FinalFrame, HeartbeatFrame, RequestFrame, TokenFrame, error_frame
from liftoff.core.types import LORA_KINDS, FinishReason
from liftoff.reader.lora_changes import LoraChanges, LoraLoaded
from liftoff.reader.preparer import Preparer
from liftoff.reader.stops import StopScanner
from liftoff.reader.worker import InboxWorker

logger = logging.getLogger(__name__)

Emit = Callable[[list[Any]], None]


@dataclass(slots=True)
class _Tracked:
    """A request the engine follows token by token: stop strings, running token counts."""

    frame: RequestFrame
    scanner: StopScanner | None = field(init=False)
    tokens: int = 0
    prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        stops = self.frame.params.stop
        self.scanner = StopScanner(stops) if stops else None


@dataclass(slots=True)
class _Preparing:
    """A request whose preparation runs (or waits its turn) on the preparation thread."""

    frame: RequestFrame
    preparation: Preparation
    deadline: float


@dataclass(frozen=True, slots=True)
class _Prepared:
    """Inbox command: a request's preparation ended (``error`` None when it succeeded)."""

    request_id: str
    error: BaseException | None


class Engine(InboxWorker):
    """Runs ``backend`` on a dedicated thread; thread-safe ``submit``/``abort``/``stop``."""

    def __init__(self, backend: GenerativeBackend, emit: Emit, reader_id: str = "") -> None:
        super().__init__("liftoff-engine")
        self._reader_id = reader_id
        self._backend = backend
        self._emit = emit
        self._waiting: deque[RequestFrame] = deque()
        self._preparing: dict[str, _Preparing] = {}
        self._preparer = Preparer(lambda request_id, error: self._inbox.put(_Prepared(request_id, error)))
        self._loras = LoraChanges(backend, emit, self._inbox.put)  # adapters added and removed at runtime
        self._seq: dict[str, int] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._totals = {"steps": 0.0, "step_rows": 0.0, "step_seconds": 0.0, "tokens": 0.0}

    def stats(self) -> dict[str, float]:
        """Running totals since start (read from another thread): steps, rows over all steps, seconds, tokens."""
        return dict(self._totals)

    @property
    def in_flight(self) -> int:
        """Requests admitted or waiting, and adapter changes (read from another thread: approximate)."""
        return len(self._seq) + len(self._loras.pending)

    # ---- engine thread ------------------------------------------------------------------------------------------

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the engine thread and the preparation thread."""
        super().stop(timeout)
        self._preparer.stop()

    def _run(self) -> None:
        while self._collect(block=not (self._waiting or self._backend.active())):
            if self._preparing:
                self._expire_preparations()
            if self._loras.pending:
                self._loras.expire()
            self._admit_waiting()
            if self._backend.active():
                self._step()

    def _collect(self, *, block: bool) -> bool:
        """Apply every queued command, first waiting for one when idle (until the next preparation's deadline at
        most); False means stop."""
        try:
            command = self._inbox.get(timeout=self._idle_wait_s()) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        return self._apply_all(command)

    def _idle_wait_s(self) -> float:
        deadlines = [entry.deadline for entry in self._preparing.values()]
        lora = self._loras.next_deadline()
        if lora is not None:
            deadlines.append(lora)
        if not deadlines:
            return 1.0
        return min(1.0, max(0.001, min(deadlines) - monotonic()))

    def _apply(self, command: object) -> bool:
        if isinstance(command, _Prepared):
            self._on_prepared(command)
            return True
        if isinstance(command, LoraLoaded):
            self._loras.on_loaded(command)
            return True
        return super()._apply(command)

    def _accept(self, frame: RequestFrame) -> None:
        if frame.kind in LORA_KINDS:
            self._loras.accept(frame)
            return
        self._seq[frame.request_id] = 0
        if frame.params.stop or frame.params.running_counts:
            self._tracked[frame.request_id] = _Tracked(frame)
        try:
            preparation = self._backend.preparation(frame.params)
        except LiftoffError as exc:
            self._emit([self._error_frame(frame.request_id, exc)])
            return
        except Exception as exc:
            logger.exception("preparing request %s failed", frame.request_id)
            self._emit([self._error_frame(frame.request_id, BackendError(f"the backend failed: {exc}"))])
            return
        if preparation is None:
            self._waiting.append(frame)
            return
        self._preparing[frame.request_id] = _Preparing(frame, preparation, monotonic() + preparation.timeout_s)
        if preparation.quiet_s:  # say so before the reader may go quiet (see HeartbeatFrame.quiet_ms)
            self._emit([HeartbeatFrame(timestamp_ms=now_ms(), quiet_ms=round(preparation.quiet_s * 1000))])
        self._preparer.submit(frame.request_id, preparation)

    def _on_prepared(self, done: _Prepared) -> None:
        """A preparation ended: the request joins the queue, or fails with the preparation's error."""
        entry = self._preparing.pop(done.request_id, None)
        if entry is None:  # it timed out, or was cancelled, meanwhile
            return
        if done.error is None:
            self._waiting.append(entry.frame)
            return
        error = done.error
        if not isinstance(error, LiftoffError):
            error = BackendError(f"{entry.preparation.what} failed: {type(error).__name__}: {error}")
        self._emit([self._error_frame(done.request_id, error)])

    def _expire_preparations(self) -> None:
        now = monotonic()
        late = [entry for entry in self._preparing.values() if entry.deadline <= now]
        for entry in late:
            request_id = entry.frame.request_id
            del self._preparing[request_id]
            self._preparer.cancel(request_id)
            budget = entry.preparation.timeout_s
            error = InvalidRequestError(
                f"the request took longer than {budget:g} s {entry.preparation.what} (this reader's "
                "grammar_compile_timeout_s): simplify it, or raise the limit"
            )
            self._emit([self._error_frame(request_id, error)])

    def _cancel_all(self) -> None:
        self._loras.cancel_all()
        for request_id in list(self._seq):
            self._cancel(request_id)

    def _cancel(self, request_id: str) -> None:
        if self._loras.cancel(request_id) or request_id not in self._seq:
            return
        if self._preparing.pop(request_id, None) is not None:
            self._preparer.cancel(request_id)
        else:
            self._drop_waiting_or_running(request_id)
        self._tracked.pop(request_id, None)
        seq = self._seq.pop(request_id)
        final = FinalFrame(
            request_id=request_id, seq=seq, finish_reason=FinishReason.ABORTED, reader_id=self._reader_id
        )
        self._emit([final])

    def _drop_waiting_or_running(self, request_id: str) -> None:
        for index, frame in enumerate(self._waiting):
            if frame.request_id == request_id:
                del self._waiting[index]
                return
        self._abort_in_backend(request_id)

    def _admit_waiting(self) -> None:
        out: list[Any] = []
        while self._waiting and self._backend.active() < self._backend.capacity:
            frame = self._waiting.popleft()
            try:
                self._backend.admit(frame.request_id, frame.text, frame.params)
            except LiftoffError as exc:
                out.append(self._error_frame(frame.request_id, exc))
            except Exception as exc:
                logger.exception("backend refused request %s", frame.request_id)
                out.append(self._error_frame(frame.request_id, BackendError(f"the backend failed: {exc}")))
        if out:
            self._emit(out)

    def _step(self) -> None:
        rows = self._backend.active()
        started = time.perf_counter()
        try:
            outputs = self._backend.step()
        except Exception as exc:
            logger.exception("backend step failed; failing the %d running requests", self._backend.active())
            error = BackendError(f"the model's forward pass failed: {exc}")
            outputs = [StepOutput(request_id, error=error) for request_id in self._running_ids()]
            for request_id in self._running_ids():
                self._abort_in_backend(request_id)
        totals = self._totals
        totals["steps"] += 1
        totals["step_rows"] += rows
        totals["step_seconds"] += time.perf_counter() - started
        totals["tokens"] += sum(out.n_tokens for out in outputs)
        self._emit(self._frames(outputs))

    def _running_ids(self) -> list[str]:
        waiting = {frame.request_id for frame in self._waiting}
        return [rid for rid in self._seq if rid not in waiting and rid not in self._preparing]

    def _frames(self, outputs: list[StepOutput]) -> list[Any]:
        """The frames of a step's outputs; a failure while making one request's frames (stop strings, counts) ends
        that request alone, with an error frame."""
        frames: list[Any] = []
        for out in outputs:
            if out.request_id not in self._seq:
                continue
            try:
                frames.extend(self._frames_of(out))
            except Exception as exc:
                logger.exception("request %s failed while its output was handled", out.request_id)
                frames.append(self._drop(out, BackendError(f"handling the output failed: {type(exc).__name__}: {exc}")))
        return frames

    def _frames_of(self, out: StepOutput) -> list[Any]:
        rid = out.request_id
        if out.error is not None:
            return [self._error_frame(rid, out.error)]
        tracked = self._tracked.get(rid) if self._tracked else None
        if tracked is not None:
            return self._tracked_frames(out, tracked)
        frames: list[Any] = []
        if out.text:
            frames.append(TokenFrame(request_id=rid, seq=self._next_seq(rid), text=out.text, n_tokens=out.n_tokens))
        if out.finish_reason is not None:
            frames.append(self._final(rid, out.finish_reason, out.prompt_tokens, out.completion_tokens))
        return frames

    def _drop(self, out: StepOutput, error: LiftoffError) -> ErrorFrame:
        """End a request whose output could not be handled: out of the backend (if still there), an error frame."""
        if out.finish_reason is None:
            self._abort_in_backend(out.request_id)
        return self._error_frame(out.request_id, error)

    def _abort_in_backend(self, request_id: str) -> None:
        try:
            self._backend.abort(request_id)
        except Exception:
            logger.exception("the backend failed to abort request %s", request_id)

    def _final(self, request_id: str, reason: FinishReason, prompt_tokens: int, completion_tokens: int) -> FinalFrame:
        self._tracked.pop(request_id, None)
        return FinalFrame(
            request_id=request_id,
            seq=self._seq.pop(request_id),
            finish_reason=reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            reader_id=self._reader_id,
        )

    def _tracked_frames(self, out: StepOutput, tracked: _Tracked) -> list[Any]:
        """Frames of a followed request: text up to its first stop string (then a ``stop`` final), with counts."""
        rid = out.request_id
        tracked.tokens += out.n_tokens
        text, hit = tracked.scanner.feed(out.text) if tracked.scanner is not None else (out.text, False)
        if not hit and out.finish_reason is not None and tracked.scanner is not None:
            text += tracked.scanner.flush()
        frames: list[Any] = []
        if text:
            frames.append(self._token_frame(rid, text, out.n_tokens, tracked))
        if hit:
            if out.finish_reason is None:
                self._abort_in_backend(rid)  # free the slot now
            prompt = out.prompt_tokens or self._prompt_count(tracked)
            frames.append(self._final(rid, FinishReason.STOP, prompt, out.completion_tokens or tracked.tokens))
        elif out.finish_reason is not None:
            frames.append(self._final(rid, out.finish_reason, out.prompt_tokens, out.completion_tokens))
        return frames

    def _token_frame(self, request_id: str, text: str, n_tokens: int, tracked: _Tracked) -> TokenFrame:
        counts: dict[str, int] = {}
        if tracked.frame.params.running_counts:
            counts = {"prompt_tokens": self._prompt_count(tracked), "completion_tokens": tracked.tokens}
        return TokenFrame(request_id=request_id, seq=self._next_seq(request_id), text=text, n_tokens=n_tokens, **counts)

    def _prompt_count(self, tracked: _Tracked) -> int:
        if tracked.prompt_tokens is None:
            tracked.prompt_tokens = self._prompt_tokens(tracked.frame)
        return tracked.prompt_tokens

    def _prompt_tokens(self, frame: RequestFrame) -> int:
        """The prompt's token count before the request ends (a backend reports its counts only at the end)."""
        try:
            count = self._backend.prompt_length(frame.text, frame.params)
        except Exception:
            logger.exception("could not count the prompt tokens of %s", frame.request_id)
            return 0
        limit = frame.params.prompt_max_tokens
        return min(count, limit) if limit else count

    def _next_seq(self, request_id: str) -> int:
        seq = self._seq[request_id]
        self._seq[request_id] = seq + 1
        return seq

    def _error_frame(self, request_id: str, exc: LiftoffError) -> ErrorFrame:
        self._tracked.pop(request_id, None)
        seq = self._seq.pop(request_id, 0)
        return error_frame(request_id, exc, seq)
