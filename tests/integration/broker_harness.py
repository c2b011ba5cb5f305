"""One harness for both brokers: a gateway-side broker in this process, readers as real links to it.

The embedded broker is served by uvicorn on a free loopback port (readers connect over WebSocket, as in
production); the Redis broker talks to a real ``redis-server``. Tests drive the broker's API and the readers'
links directly, and watch what the gateway would hear through :class:`Recorder`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from liftoff.broker.base import BrokerSettings, GatewayBroker, LinkClosedError, ReaderLink
from liftoff.broker.embedded.gateway import EmbeddedBroker
from liftoff.broker.embedded.link import EmbeddedReaderLink
from liftoff.broker.redis.gateway import RedisBroker
from liftoff.broker.redis.link import RedisReaderLink
from liftoff.core import ids
from liftoff.core.clock import monotonic
from liftoff.core.frames import (
    ErrorFrame,
    FinalFrame,
    GatewayFrame,
    HeartbeatFrame,
    LoadedFrame,
    OutputFrame,
    RegisterFrame,
    RequestFrame,
    ResultFrame,
)
from liftoff.core.types import ReaderInfo

WAIT_S = 10.0


@dataclass
class Recorder:
    """The gateway's side of the events: every output and reader event, in order."""

    outputs: dict[str, list[OutputFrame]] = field(default_factory=dict)
    registered: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)
    load_failed: dict[str, str] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    heartbeats: list[tuple[str, HeartbeatFrame]] = field(default_factory=list)

    def on_outputs(self, frames: list[OutputFrame]) -> None:
        for frame in frames:
            self.outputs.setdefault(frame.request_id, []).append(frame)

    def on_reader_register(self, frame: RegisterFrame) -> None:
        self.registered.append(frame.reader_id)

    def on_reader_loaded(self, reader_id: str, frame: LoadedFrame) -> None:
        self.live.append(reader_id)

    def on_reader_load_failed(self, reader_id: str, reason: str) -> None:
        self.load_failed[reader_id] = reason

    def on_reader_heartbeat(self, reader_id: str, frame: HeartbeatFrame) -> None:
        self.heartbeats.append((reader_id, frame))

    def on_reader_lost(self, reader_id: str, reason: str) -> None:
        self.lost.setdefault(reader_id, reason)

    def on_reader_removed(self, reader_id: str) -> None:
        self.removed.append(reader_id)

    def final(self, request_id: str) -> OutputFrame | None:
        """The request's last frame, once it has one."""
        frames = self.outputs.get(request_id, [])
        return frames[-1] if frames and isinstance(frames[-1], FinalFrame | ErrorFrame | ResultFrame) else None


class TestReader:
    """A reader as the broker sees it: a real link, driven by the test instead of a model."""

    __test__ = False

    def __init__(self, link: ReaderLink, reader_id: str, groups: tuple[str, ...], capacity: int) -> None:
        self.link = link
        self.reader_id = reader_id
        self.groups = groups
        self.capacity = capacity
        self.received: list[GatewayFrame] = []
        self._pump: asyncio.Task[None] | None = None
        self.closed: str | None = None  # why the link closed, once it has

    def register_frame(self, *, loaded: bool = True) -> RegisterFrame:
        info = ReaderInfo(consumer_groups=list(self.groups), consumer_name=ids.consumer_name(self.reader_id),
                          device="cpu", model_name="test", model_type="CAUSAL", pids=[])  # fmt: skip
        config = {"model_name": "test", "device": "cpu"}
        return RegisterFrame(reader_id=self.reader_id, info=info, config=config, heartbeat_interval_ms=200,
                             loaded=loaded, capacity=self.capacity if loaded else 0)  # fmt: skip

    def start(self) -> None:
        """Receive in the background from now on (into ``received``)."""
        self._pump = asyncio.create_task(self._receive_forever())

    async def _receive_forever(self) -> None:
        try:
            while True:
                self.received.extend(await self.link.receive())
        except LinkClosedError as exc:
            self.closed = str(exc)

    async def link_closed(self, within_s: float = WAIT_S) -> str:
        """Wait until the link closes by itself; its reason."""
        deadline = monotonic() + within_s
        while self.closed is None:
            if monotonic() > deadline:
                raise AssertionError(f"the link of {self.reader_id} did not close")
            await asyncio.sleep(0.01)
        return self.closed

    async def frames(self, count: int = 1, within_s: float = WAIT_S) -> list[GatewayFrame]:
        """Wait until ``count`` frames have arrived in all (fails after ``within_s``)."""
        deadline = monotonic() + within_s
        while len(self.received) < count:
            if monotonic() > deadline:
                raise AssertionError(f"{self.reader_id} received {len(self.received)} frames, not {count}")
            await asyncio.sleep(0.01)
        return self.received

    async def quiet(self, seconds: float) -> list[GatewayFrame]:
        """Whatever has arrived after ``seconds`` more."""
        await asyncio.sleep(seconds)
        return self.received

    async def close(self) -> None:
        """Close the link (as a reader that goes away)."""
        await self.link.close()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

    def requests(self) -> list[RequestFrame]:
        return [frame for frame in self.received if isinstance(frame, RequestFrame)]

    def send(self, frames: list[Any]) -> None:
        self.link.send(frames)


class Harness:
    """A broker and the readers connected to it."""

    def __init__(self, kind: str, settings: BrokerSettings, redis_url: str = "") -> None:
        self.kind = kind
        self.settings = settings
        self.redis_url = redis_url
        self.events = Recorder()
        self.broker: GatewayBroker = (
            RedisBroker(settings, redis_url, max_memory=0) if kind == "redis" else EmbeddedBroker(settings)
        )
        self.broker.bind(self.events)
        self.readers: list[TestReader] = []
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> Harness:
        await self.broker.start()
        if isinstance(self.broker, EmbeddedBroker):
            await self._serve_embedded(self.broker)
        return self

    async def _serve_embedded(self, broker: EmbeddedBroker) -> None:
        async def endpoint(websocket: WebSocket) -> None:
            await broker.serve_reader(websocket)

        app = Starlette(routes=[WebSocketRoute("/reader", endpoint)])
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_config=None, ws="websockets-sansio")
        self._server = uvicorn.Server(config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]))
        await self.wait(lambda: self._server is not None and self._server.started, "uvicorn to start")

    def link(self) -> ReaderLink:
        if self.kind == "redis":
            return RedisReaderLink(self.redis_url)
        return EmbeddedReaderLink(f"127.0.0.1:{self.port}")

    async def reader(self, reader_id: str = "", groups: tuple[str, ...] = ("primary",), capacity: int = 2,
                     *, loaded: bool = True) -> TestReader:  # fmt: skip
        """Connect a reader and wait until the gateway has heard of it (as live, when ``loaded``)."""
        reader = TestReader(self.link(), reader_id or f"r-{uuid.uuid4().hex[:6]}", groups, capacity)
        await reader.link.connect(reader.register_frame(loaded=loaded))
        reader.start()
        self.readers.append(reader)
        seen = self.events.live if loaded else self.events.registered
        await self.wait(lambda: reader.reader_id in seen, f"{reader.reader_id} to register")
        return reader

    def submit(self, text: str = "hi", group: str = "primary", *, deadline_s: float = 30.0,
               reader_id: str = "") -> str:  # fmt: skip
        request_id = ids.new_request_id()
        frame = RequestFrame(request_id=request_id, consumer_group=group, text=text, reader_id=reader_id)
        self.broker.submit(frame, monotonic() + deadline_s)
        return request_id

    async def wait(self, predicate: Callable[[], object], what: str, within_s: float = WAIT_S) -> None:
        deadline = monotonic() + within_s
        while not predicate():
            if monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.01)

    async def final(self, request_id: str, within_s: float = WAIT_S) -> OutputFrame:
        await self.wait(lambda: self.events.final(request_id) is not None, f"the end of {request_id}", within_s)
        frame = self.events.final(request_id)
        assert frame is not None
        return frame

    async def round_trip(self, reader: TestReader, text: str = "hi") -> None:
        """Submit a request, check that ``reader`` gets it, answer it, and check that the answer comes back."""
        request_id = self.submit(text)
        await self.wait(
            lambda: any(f.request_id == request_id for f in reader.requests()), f"{reader.reader_id} to get it"
        )
        reader.send([FinalFrame(request_id=request_id, seq=0, finish_reason="stop")])
        assert isinstance(await self.final(request_id), FinalFrame)

    async def close(self) -> None:
        for reader in self.readers:
            with contextlib.suppress(Exception):
                await reader.close()
        await self.broker.close()
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            await self._serving
