"""The fate of a gateway's requests under the Redis broker: :class:`RedisJob` (one request) and :class:`JobBook`
(all of this gateway's, waiting or owned by a reader), with no Redis I/O of its own.

The gateway that sent a request decides what happens to it. A reader owns a request from its claim (or its first
output) on; only that reader's frames are delivered. When the owner dies, a request that had started answering
fails with ``reader_died``; one that had not waits again, for a live reader of its group to re-claim it (up to
``max_retries`` times), or fails at once when its group has no live reader and is not reserved.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from liftoff.broker.base import BrokerSettings
from liftoff.core.clock import monotonic
from liftoff.core.errors import LiftoffError, NoReadersAvailableError, ReaderDiedError
from liftoff.core.frames import ClaimedFrame, OutputFrame, RequestFrame, TokenFrame, error_frame


@dataclass(eq=False, slots=True)
class RedisJob:
    """A request of this gateway: waiting in its group's stream, or owned by the reader that claimed it."""

    frame: RequestFrame
    deadline: float
    enqueued: float = field(default_factory=monotonic)
    entry: str = ""  # the stream entry id, once Redis answered the XADD
    reader: str | None = None  # the reader that owns it (claimed it, or the target of a per-reader request)
    lost_reader: str | None = None  # the reader that owned it before it died
    started: bool = False
    cancelled: bool = False
    next_seq: int = 0

    @property
    def queued(self) -> bool:
        """Waiting for a reader to claim it."""
        return self.reader is None and not self.cancelled and not self.frame.reader_id


class Hooks(Protocol):
    """What the book needs from the broker: Redis operations and the gateway's events."""

    def forget_entry(self, job: RedisJob) -> None:
        """Take the job's entry out of its stream and out of any pending list."""

    def publish_abort(self, request_id: str) -> None:
        """Tell every reader to drop a request."""

    def emit(self, frames: list[OutputFrame]) -> None:
        """Deliver frames to the gateway."""

    def live_in(self, group: str) -> bool:
        """Whether a live reader serves ``group``."""

    def buffers(self, group: str) -> bool:
        """Whether ``group`` keeps its waiting requests while no reader of it is live."""

    def observe_queue_time(self, group: str, seconds: float) -> None:
        """A request waited ``seconds`` before a reader took it."""


class JobBook:
    """This gateway's requests by id, with the count and deadlines of those waiting."""

    def __init__(self, settings: BrokerSettings, hooks: Hooks) -> None:
        self.settings = settings
        self.hooks = hooks
        self.jobs: dict[str, RedisJob] = {}
        self.queued = 0
        self._deadlines: list[tuple[float, int, RedisJob]] = []
        self._tiebreak = 0

    def queue(self, job: RedisJob) -> None:
        """Count the job as waiting for a reader, with its queue deadline."""
        self.jobs[job.frame.request_id] = job
        job.reader = None
        self.queued += 1
        self._tiebreak += 1
        heapq.heappush(self._deadlines, (job.deadline, self._tiebreak, job))

    def pop(self, request_id: str) -> RedisJob | None:
        """Forget a request (cancelled); the job, if it was known."""
        job = self.jobs.pop(request_id, None)
        if job is not None:
            if job.queued:
                self.queued -= 1
            job.cancelled = True
        return job

    def fail(self, job: RedisJob, error: LiftoffError) -> None:
        """End a request with ``error``."""
        if self.pop(job.frame.request_id) is None:
            return
        self.hooks.forget_entry(job)
        self.hooks.emit([error_frame(job.frame.request_id, error, job.next_seq)])

    def expired(self, now: float) -> Iterator[RedisJob]:
        """The waiting jobs whose queue deadline has passed."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, job = heapq.heappop(self._deadlines)
            if job.queued and job.frame.request_id in self.jobs:
                yield job

    def owners(self) -> set[str]:
        """The readers that own requests of this gateway."""
        return {job.reader for job in self.jobs.values() if job.reader is not None}

    # ---- readers ------------------------------------------------------------------------------------------------

    def reader_gone(self, reader_id: str, reason: str) -> None:
        """A reader is dead or deleted: fail what it had started, leave the rest to be re-claimed."""
        for job in [job for job in self.jobs.values() if job.reader == reader_id]:
            if job.started or job.frame.reader_id:
                self.fail(job, ReaderDiedError(f"reader {reader_id} failed mid-request: {reason}"))
            elif job.frame.attempt >= self.settings.max_retries:
                self.fail(job, ReaderDiedError(f"reader {reader_id} failed ({reason}) and retries ran out"))
            else:
                job.lost_reader = reader_id
                self.queue(job)
        self.fail_orphans()

    def fail_orphans(self) -> None:
        """Fail at once the waiting requests of groups no live reader serves (groups that buffer keep them)."""
        for job in [job for job in self.jobs.values() if job.queued]:
            group = job.frame.consumer_group
            if not self.hooks.buffers(group) and not self.hooks.live_in(group):
                self.fail(job, NoReadersAvailableError(f"no live reader is left in consumer group '{group}'"))

    def on_claimed(self, claim: ClaimedFrame) -> None:
        """A reader says it took a request from its group's stream (``reclaimed``: from a dead reader)."""
        job = self.jobs.get(claim.request_id)
        if job is None or job.cancelled:
            self.hooks.publish_abort(claim.request_id)
            return
        if job.reader == claim.reader_id:
            if claim.reclaimed and job.started:  # it started again after a reconnect: the stream would repeat
                self.fail(job, ReaderDiedError(f"reader {job.reader} lost its work mid-request"))
                self.hooks.publish_abort(claim.request_id)
            return
        if job.reader is not None:  # re-claimed before this gateway saw its reader die
            if job.started:
                self.fail(job, ReaderDiedError(f"reader {job.reader} stopped answering mid-request"))
                self.hooks.publish_abort(claim.request_id)
                return
            job.lost_reader = job.reader
            self.queue(job)
        if job.lost_reader is not None or claim.reclaimed:
            if job.frame.attempt >= self.settings.max_retries:
                self.fail(job, ReaderDiedError(f"reader {job.lost_reader} failed and retries ran out"))
                self.hooks.publish_abort(claim.request_id)
                return
            job.frame = msgspec.structs.replace(job.frame, attempt=job.frame.attempt + 1)
        self.adopt(job, claim.reader_id)

    def adopt(self, job: RedisJob, reader_id: str) -> None:
        """A waiting job now belongs to ``reader_id``."""
        self.queued -= 1
        job.reader = reader_id
        if job.frame.attempt == 0:
            self.hooks.observe_queue_time(job.frame.consumer_group, monotonic() - job.enqueued)

    def on_replies(self, reader_id: str, frames: list[Any], outputs: list[OutputFrame]) -> None:
        """Frames from a reader: claims are settled, outputs of the requests it owns go to ``outputs``."""
        for frame in frames:
            if isinstance(frame, ClaimedFrame):
                self.on_claimed(frame)
                continue
            job = self.jobs.get(getattr(frame, "request_id", ""))
            if job is not None and job.queued and job.lost_reader in {None, reader_id}:
                # Its first output says who claimed it (a reader sends a claim alone only when no output comes at
                # once); or a reader declared dead too soon is still working on it, and nobody else is.
                self.adopt(job, reader_id)
            if job is None or job.reader != reader_id:
                continue  # finished, failed, or answered by a reader that no longer owns it
            if isinstance(frame, TokenFrame):
                job.started = True
                job.next_seq = frame.seq + 1
            else:
                del self.jobs[frame.request_id]
            outputs.append(frame)
