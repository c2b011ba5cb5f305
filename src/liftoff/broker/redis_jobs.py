"""Bookkeeping of the Redis broker's gateway half: one request this gateway submitted (:class:`RedisJob`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from liftoff.core.clock import monotonic
from liftoff.core.frames import RequestFrame


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
