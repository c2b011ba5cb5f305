"""Dispatch: hand requests to the broker and route their output frames back to a per-request :class:`Collector`.

A collector gathers the frames of one user request (a user batch is several broker requests, one per prompt) in
a single buffer with one wake-up event, so a surface reads everything that arrived in one go. Errors travel as
frames, like data. Deadlines are enforced here as well as in the broker: no wait is unbounded. What requests and
frames count for (metrics, the request log) is :mod:`liftoff.gateway.accounting`'s business: dispatch only tells it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

from liftoff.broker.base import GatewayBroker
from liftoff.config.models import AppConfig
from liftoff.core.clock import monotonic
from liftoff.core.errors import (
    BackendError,
    InvalidRequestError,
    LiftoffError,
    NoReadersAvailableError,
    NotFoundError,
    RequestCancelledError,
    RequestTimeoutError,
    ShuttingDownError,
    error_from_type,
)
from liftoff.core.frames import (
    ENCODE_ERRORS,
    ErrorFrame,
    FinalFrame,
    OutputFrame,
    RequestFrame,
    ResultFrame,
    TokenFrame,
    encode_frame,
)
from liftoff.core.types import NEEDS, SERVES, ReaderState, RequestKind
from liftoff.gateway.accounting import MAX_GROUP_SHOWN, Accounting, Tally
from liftoff.management.registry import ReaderRegistry

UNKNOWN_GROUP = "unknown"  # the metric label of every consumer group no reader serves


def shown(group: str) -> str:
    """A client's group name, quoted and cut, for an error message."""
    return repr(group if len(group) <= MAX_GROUP_SHOWN else group[:MAX_GROUP_SHOWN] + "...")


@dataclass(slots=True)
class Item:
    """One frame of one prompt of a collector."""

    index: int
    frame: OutputFrame


class Collector:
    """The hand-off between the dispatcher and a surface for one user request.

    Waiting costs one future per wake-up and one timer per request (the deadline), no tasks.
    """

    __slots__ = ("_finished", "_loop", "_next_seq", "_timer", "_waiter", "cancelled", "deadline", "expired", "pending",
                 "remaining", "request_ids", "tally")  # fmt: skip

    def __init__(self, request_ids: list[str], deadline: float, tally: Tally | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.request_ids = request_ids
        self.deadline = deadline
        self.tally = tally  # what its frames count for (None: nothing)
        self.pending: deque[Item] = deque()
        self.remaining = len(request_ids)
        self.cancelled = False
        self.expired = False
        self._next_seq = [0] * len(request_ids)
        self._finished = [False] * len(request_ids)
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def done(self) -> bool:
        """Every prompt has its final frame."""
        return self.remaining == 0

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def push(self, index: int, frame: OutputFrame) -> bool:
        """Add a frame; return True when it was the prompt's last. Duplicate frames are dropped."""
        if isinstance(frame, TokenFrame):
            if frame.seq < self._next_seq[index]:
                return False
            self._next_seq[index] = frame.seq + 1
            self.pending.append(Item(index, frame))
            self._wake()
            return False
        if self._finished[index]:
            return False
        self._finished[index] = True
        self.pending.append(Item(index, frame))
        self.remaining -= 1
        if self.remaining == 0:
            self.close()
        self._wake()
        return True

    def cancel(self) -> None:
        """Wake the reader of this collector with a cancellation (client gone)."""
        self.cancelled = True
        self._wake()

    def _expire(self) -> None:
        self.expired = True
        self._wake()

    def close(self) -> None:
        """Drop the deadline timer (the request is over)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def next(self) -> list[Item]:
        """Everything that arrived since the last call; [] once finished. Raises on deadline or cancel."""
        while not self.pending:
            if self.cancelled:
                raise RequestCancelledError("the client disconnected")
            if self.remaining == 0:
                return []
            if self.expired or monotonic() >= self.deadline:
                if self.tally is not None:
                    self.tally.timed_out()
                raise RequestTimeoutError("the request did not finish before its deadline")
            if self._timer is None:
                self._timer = self._loop.call_later(self.deadline - monotonic(), self._expire)
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = list(self.pending)
        self.pending.clear()
        return items


def raise_if_error(item: Item) -> None:
    """Raise the error an error frame carries."""
    if isinstance(item.frame, ErrorFrame):
        raise error_from_type(item.frame.error_type, item.frame.message)


async def gather(collector: Collector) -> tuple[list[list[str]], list[FinalFrame | None]]:
    """Every prompt's text pieces and final frame; raises the first error."""
    texts: list[list[str]] = [[] for _ in collector.request_ids]
    finals: list[FinalFrame | None] = [None] * len(collector.request_ids)
    while items := await collector.next():
        for item in items:
            frame = item.frame
            if isinstance(frame, TokenFrame):
                texts[item.index].append(frame.text)
            elif isinstance(frame, FinalFrame):
                finals[item.index] = frame
            else:
                raise_if_error(item)
    return texts, finals


async def result_of(collector: Collector) -> dict[str, Any]:
    """The data of a request's result frame (a service or an encoder answer); raises its error."""
    while items := await collector.next():
        for item in items:
            raise_if_error(item)
            if isinstance(item.frame, ResultFrame):
                return item.frame.data
    raise BackendError("the reader ended the request without a result")


class Dispatcher:
    """Submits requests to the broker and routes their frames to collectors."""

    def __init__(self, broker: GatewayBroker, registry: ReaderRegistry, config: AppConfig,
                 accounting: Accounting | None = None) -> None:  # fmt: skip
        self.broker = broker
        self.registry = registry
        self.config = config
        self.accounting = accounting or Accounting()
        self.closing = False
        self._routes: dict[str, tuple[Collector, int]] = {}

    @property
    def in_flight(self) -> int:
        """Broker requests waiting for their final frame."""
        return len(self._routes)

    def _check_kind(self, group: str, kind: RequestKind) -> None:
        """A 400 when the group's live readers are all of a model type that cannot serve ``kind``."""
        types = self.registry.live_model_types(group)
        if types and not any(kind in SERVES.get(model_type, frozenset()) for model_type in types):
            served = ", ".join(sorted(types))
            raise InvalidRequestError(
                f"{NEEDS[kind]}, and consumer group '{group}' serves {served} models", param="consumer_group"
            )

    def _label(self, group: str) -> str:
        """``group`` as a metric label: a name a client made up never becomes a series of its own."""
        return group if self.broker.buffers(group) or self.registry.knows(group) else UNKNOWN_GROUP

    def _queue_deadline(self, group: str, deadline: float) -> float:
        """How long a request may wait for a reader: its deadline; while the group has no live reader, up to
        ``reserved_buffer_timeout_s`` if the group buffers (reserved, a reader of it restarting or with
        ``buffer_requests``), else it is refused."""
        if self.registry.has_live(group):
            return deadline
        if self.broker.buffers(group):
            return min(deadline, monotonic() + self.config.reserved_buffer_timeout_s)
        if self.registry.knows(group):
            raise NoReadersAvailableError(
                f"no live reader in consumer group '{group}'; its readers are loading or dead"
            )
        raise NotFoundError(
            f"consumer group {shown(group)} does not exist; check the name (GET /v1/models on the OpenAI port lists "
            "the groups with a live reader)",
            param="consumer_group",
        )

    def submit(self, frames: list[RequestFrame]) -> Collector:
        """Queue every frame (all of one consumer group) and return their collector."""
        if self.closing:
            raise ShuttingDownError("the server is shutting down")
        deadline = monotonic() + self.config.request_timeout_s
        group = frames[0].consumer_group
        self.accounting.submitting(group, len(frames))
        try:
            queue_deadline = self._queue_deadline(group, deadline)
            self._check_kind(group, frames[0].kind)
            collector = self._enqueue(frames, deadline, queue_deadline, group)
        except LiftoffError as exc:
            self.accounting.refused(self._label(group), exc.error_type)
            raise
        self.accounting.accepted(group, len(frames))
        return collector

    def submit_to_reader(self, frame: RequestFrame, timeout_s: float | None = None) -> Collector:
        """Send a request to one reader (``frame.reader_id``): 404 if unknown, 503 if not live; it must end within
        ``timeout_s`` (default ``request_timeout_s``)."""
        if self.closing:
            raise ShuttingDownError("the server is shutting down")
        record = self.registry.get(frame.reader_id)
        if record is None:
            raise NotFoundError(f"reader {frame.reader_id!r} does not exist", param="reader_id")
        if record.state is not ReaderState.LIVE:
            raise NoReadersAvailableError(f"reader {frame.reader_id!r} is {record.state.value}, not live")
        if frame.kind not in SERVES.get(record.info.model_type, frozenset()):
            raise InvalidRequestError(
                f"{NEEDS[frame.kind]}, and reader {frame.reader_id!r} serves a {record.info.model_type} model",
                param="reader_id",
            )
        deadline = monotonic() + (self.config.request_timeout_s if timeout_s is None else timeout_s)
        return self._enqueue([frame], deadline, deadline)

    def _enqueue(
        self, frames: list[RequestFrame], deadline: float, queue_deadline: float, group: str = ""
    ) -> Collector:
        """Route every frame to one new collector and hand it to the broker; on a refusal, abort them all."""
        for frame in frames:
            _check_encodable(frame)
        collector = Collector([frame.request_id for frame in frames], deadline, self.accounting.tally(group))
        for index, frame in enumerate(frames):
            self._routes[frame.request_id] = (collector, index)
            try:
                self.broker.submit(frame, queue_deadline)
            except LiftoffError:
                self.abort(collector)
                raise
        return collector

    def abort(self, collector: Collector) -> None:
        """Cancel every unfinished prompt of a collector."""
        collector.close()
        for request_id in collector.request_ids:
            if self._routes.pop(request_id, None) is not None:
                self.broker.abort(request_id)

    def on_outputs(self, frames: list[OutputFrame]) -> None:
        """Route output frames from the broker to their collectors."""
        routes = self._routes
        for frame in frames:
            route = routes.get(frame.request_id)
            if route is None:
                continue
            collector, index = route
            if collector.tally is not None:
                collector.tally.frame(frame)
            if collector.push(index, frame):
                del routes[frame.request_id]


def _check_encodable(frame: RequestFrame) -> None:
    """A 400 now for a request a broker could not carry (rather than a lost frame later)."""
    try:
        encode_frame(frame)
    except ENCODE_ERRORS as exc:
        raise InvalidRequestError(f"the request holds a value that cannot be sent to a reader: {exc}") from None


def is_final(frame: OutputFrame) -> bool:
    """Whether a frame ends its request."""
    return isinstance(frame, FinalFrame | ResultFrame | ErrorFrame)
