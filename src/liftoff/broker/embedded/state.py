"""Bookkeeping of the embedded broker: a queued or assigned request (:class:`EmbeddedJob`) and a connected reader
(:class:`ConnectedReader`) with its outgoing frame buffer and writer task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.websockets import WebSocket

from liftoff.core.clock import monotonic
from liftoff.core.frames import AbortFrame, RegisterFrame, RequestFrame, encode_frames

logger = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class EmbeddedJob:
    """A request inside the broker: queued (``reader`` is None) or assigned to a reader."""

    frame: RequestFrame
    deadline: float
    enqueued: float = field(default_factory=monotonic)
    reader: ConnectedReader | None = None
    started: bool = False
    cancelled: bool = False
    next_seq: int = 0

    def retry(self) -> None:
        """Prepare the job to be queued again after its reader was lost before starting it."""
        self.frame = msgspec.structs.replace(self.frame, attempt=self.frame.attempt + 1)
        self.reader = None
        self.started = False


class ConnectedReader:
    """One connected reader: its groups, capacity, assigned jobs, and a coalescing writer."""

    def __init__(self, register: RegisterFrame, websocket: WebSocket) -> None:
        self.reader_id = register.reader_id
        self.groups = tuple(register.info.consumer_groups)
        self.capacity = 0
        self.ready = False
        self.draining = False
        self.unhealthy = False  # the reader says it cannot serve now (an API reader's upstream is down)
        self.closed = False
        self.served = 0
        self.assigned: dict[str, EmbeddedJob] = {}
        self.last_recv = monotonic()
        self.quiet_until = 0.0  # the end of a silence the reader announced (HeartbeatFrame.quiet_ms)
        self._busy_since = 0.0
        self._websocket = websocket
        self._outbox: list[Any] = []
        self._wake = asyncio.Event()
        self._closing: tuple[int, str] | None = None
        self._writer = asyncio.create_task(self._write_forever(), name=f"liftoff-reader-writer-{self.reader_id}")

    @property
    def accepting(self) -> bool:
        """Whether new work may be assigned."""
        return self.ready and not self.draining and not self.unhealthy and not self.closed

    def free(self) -> int:
        """Slots left: capacity plus a small prefetch, minus what is assigned (direct requests included)."""
        return self.capacity + max(1, self.capacity // 4) - len(self.assigned)

    def assign(self, job: EmbeddedJob) -> None:
        """Hand a job to this reader."""
        if not self.assigned:
            self._busy_since = monotonic()
        self.assigned[job.frame.request_id] = job
        self.served += 1
        self.send([job.frame])

    def finish(self, request_id: str) -> None:
        """The reader sent the last frame of a job."""
        self.assigned.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Tell the reader to drop a job; it stays assigned until the reader confirms."""
        self.send([AbortFrame(request_id=request_id)])

    def silent_for(self, now: float) -> float:
        """Seconds since the reader last spoke while it had work; 0 when it has none."""
        if not self.assigned:
            return 0.0
        return now - max(self.last_recv, self._busy_since, self.quiet_until)

    def send(self, frames: list[Any]) -> None:
        """Queue frames; the writer task sends everything queued in one message."""
        if self.closed:
            return
        self._outbox.extend(frames)
        self._wake.set()

    def close(self, code: int, reason: str) -> None:
        """Flush queued frames, then close the WebSocket."""
        if self.closed:
            return
        self.closed = True
        self._closing = (code, reason[:120])
        self._wake.set()

    async def _write_forever(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._outbox:
                    batch, self._outbox = self._outbox, []
                    await self._websocket.send_bytes(encode_frames(batch))
                if self._closing is not None:
                    await self._websocket.close(*self._closing)
                    return
        except Exception as exc:  # the socket went away under us; the receive side reports the loss
            logger.debug("writer of reader %s stopped: %s", self.reader_id, exc)
            with contextlib.suppress(Exception):  # and if it did not, closing it makes the receive side see a loss
                await self._websocket.close(1011, "the gateway could not write to this reader")
        finally:
            self.closed = True
            with contextlib.suppress(Exception):
                self._outbox.clear()
