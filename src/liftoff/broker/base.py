"""The Broker contract, in two halves: what a gateway calls (:class:`GatewayBroker`) and what a reader calls
(:class:`ReaderLink`). Every implementation keeps these signatures exactly.

Delivery is at least once. A request's output frames end with exactly one final frame (``FinalFrame`` or
``ErrorFrame``). Requests a lost reader had not started are re-queued (up to ``max_retries``); started ones end with
a ``reader_died`` error frame. A group with no live reader keeps its waiting requests (until their deadline) while
it *buffers*: it is reserved, or the gateway says so (``holding``: a reader of it is being restarted, or has
``buffer_requests``); otherwise they fail at once with 503.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from liftoff.core.frames import (
    GatewayFrame,
    HeartbeatFrame,
    LoadedFrame,
    OutputFrame,
    RegisterFrame,
    RequestFrame,
    WelcomeFrame,
)


@dataclass(frozen=True)
class BrokerSettings:
    """What a gateway-side broker needs to know from the server configuration."""

    gateway_id: str
    reserved_groups: frozenset[str]
    max_queued_requests: int
    max_retries: int
    reader_message_timeout_ms: int
    heartbeat_interval_ms: int


class BrokerEvents(Protocol):
    """What the gateway hears from its broker: outputs for its requests, and reader lifecycle events."""

    def on_outputs(self, frames: list[OutputFrame]) -> None:
        """Output frames of requests this gateway submitted."""

    def on_reader_register(self, frame: RegisterFrame) -> None:
        """A reader connected (new, or back after a disconnect)."""

    def on_reader_loaded(self, reader_id: str, frame: LoadedFrame) -> None:
        """A reader finished loading and takes work."""

    def on_reader_load_failed(self, reader_id: str, reason: str) -> None:
        """A reader could not load its model."""

    def on_reader_heartbeat(self, reader_id: str, frame: HeartbeatFrame) -> None:
        """A reader is alive."""

    def on_reader_lost(self, reader_id: str, reason: str) -> None:
        """A reader disconnected, or was evicted; its requests were re-queued or failed already."""

    def on_reader_removed(self, reader_id: str) -> None:
        """A reader was deleted elsewhere (through another gateway sharing the broker): forget it."""


class GatewayBroker(abc.ABC):
    """The gateway's half: queue requests per consumer group, route outputs back, track reader links."""

    # Whether other gateways share this broker's readers (Redis): then a gateway stops only the reader processes
    # it started itself, and a reader that was lost re-registers by itself instead of being stopped.
    shared = False

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self._events: BrokerEvents | None = None
        # told (consumer group, seconds) when a queued request is first given to a reader (for metrics)
        self.queue_time_observer: Callable[[str, float], None] | None = None
        # asked whether a group without a live reader keeps its waiting requests besides the reserved groups
        self.holding: Callable[[str], bool] = _holds_nothing

    def bind(self, events: BrokerEvents) -> None:
        """Set the receiver of outputs and reader events (once, before ``start``)."""
        self._events = events

    @property
    def events(self) -> BrokerEvents:
        """The bound event receiver."""
        if self._events is None:
            raise RuntimeError("broker used before bind()")
        return self._events

    @abc.abstractmethod
    async def start(self) -> None:
        """Start background tasks."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop background tasks and close reader links."""

    @abc.abstractmethod
    def submit(self, frame: RequestFrame, queue_deadline: float) -> None:
        """Queue a request on its consumer group; it fails if no reader takes it before ``queue_deadline``
        (monotonic seconds). Raises :class:`~liftoff.core.errors.OverloadedError` when the queues are full."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Cancel a request, queued or running; no more frames of it are delivered."""

    @abc.abstractmethod
    def evict_reader(self, reader_id: str, reason: str) -> None:
        """Treat a reader as dead: re-queue or fail its requests and close its link."""

    @abc.abstractmethod
    def stop_reader(self, reader_id: str, reason: str) -> None:
        """Ask a reader process to exit, after evicting it."""

    def forget_reader(self, reader_id: str) -> None:
        """A dead reader is forgotten (pruned): drop what the broker still keeps of it (nothing, unless shared)."""
        del reader_id

    def buffers(self, group: str) -> bool:
        """Whether ``group`` keeps its waiting requests while no reader of it is live (reserved, or ``holding``)."""
        return group in self.settings.reserved_groups or self.holding(group)

    @abc.abstractmethod
    def settle(self, group: str) -> None:
        """``group`` may have stopped buffering (a restart was given up, a reader deleted): if it no longer
        buffers and no live reader serves it, its waiting requests fail now with 503."""

    @abc.abstractmethod
    def queue_depth(self, group: str | None = None) -> int:
        """Requests waiting for a reader, in one group or in all."""

    @abc.abstractmethod
    def in_flight(self, group: str | None = None) -> int:
        """Requests assigned to readers and not finished, in one group or in all."""

    def reserved_groups(self, own: list[str]) -> list[str]:
        """``status.reserved_consumers``: this gateway's reserved groups (``own``), plus, on a shared broker,
        those of the other gateways."""
        return own


def _holds_nothing(group: str) -> bool:
    """The default ``holding``: only reserved groups buffer."""
    del group
    return False


class LinkClosedError(Exception):
    """The connection between a reader and its gateway is gone."""


class ReaderLink(abc.ABC):
    """The reader's half: register, receive work and send frames back."""

    # Whether the link is a connection to the gateway itself (a supervised reader exits when it closes), or to a
    # broker shared by many gateways (the reader reconnects, even when supervised).
    tied_to_gateway = True

    @abc.abstractmethod
    async def connect(self, register: RegisterFrame) -> WelcomeFrame:
        """Open the link and register; raises :class:`LinkClosedError` (or ``OSError``) on failure."""

    @abc.abstractmethod
    def send(self, frames: list[Any]) -> None:
        """Queue frames for sending (non-blocking; frames sent together are coalesced)."""

    @abc.abstractmethod
    async def receive(self) -> list[GatewayFrame]:
        """The next batch of frames from the gateway; raises :class:`LinkClosedError` when the link closes."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush what is queued and close the link."""
